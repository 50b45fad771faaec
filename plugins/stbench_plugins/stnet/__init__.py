"""ST-Net: a fully fine-tuned DenseNet-121 that regresses a spot's expression from its H&E patch.

Paper: He, Bergenstråhle, Stenbeck, Abid, Andersson, Borg, Maaskola, Lundeberg, Zou, "Integrating spatial
gene expression and breast tumour morphology via deep learning", Nature Biomedical Engineering 4, 827-834
(2020), doi:10.1038/s41551-020-0578-x. Code: bryanhe/ST-Net (commit 43022c1). The benchmark
re-implementation that TRIPLEX and PHG2ST compare against: NEXGEM/TRIPLEX ``src/model/st_net`` with
``config/ST/*/StNet.yaml``. Specification: METHODS.md §4 (method), §9.1 (prompt fine-tuning), §1.2
(patches). No code of either repository is reproduced here.

The network: a timm CNN (``backbone``, default ``densenet121``) with its classifier removed
(``num_classes=0``: global-pooled features, 1024 for DenseNet-121) and a Linear(features → G) head, every
parameter trained.

Two recipes (``recipe``), because the sources disagree (AMB-11). **The harness default is**
``recipe=triplex``, the re-implementation whose numbers the TRIPLEX and PHG2ST tables report (PHG2ST
says baselines "follow the training settings from their original papers", but its pipeline is
TRIPLEX's):

============== ============================================ ============================================
field           ``triplex`` (default)                        ``original`` (ST-Net's own code)
============== ============================================ ============================================
optimizer       AdamW, lr 1e-4, weight decay 0.01             SGD, lr 1e-6, momentum 0.9, no weight decay
scheduler       ReduceLROnPlateau(×0.1, patience 10) on the   none
                inner-validation mean PCC
batch_size      128                                           32
epochs          at most 1000, early stopping patience 20 on   50, no early stopping
                the inner-validation mean PCC
select_on       ``pcc``: the best mean PCC's weights           ``loss``: the epoch with the lowest summed
                                                              squared error on inner validation
loss            ``mse``: mean over spots and genes            ``sse``: Σ over spots and genes ÷ G
head_init       ``default`` (PyTorch's Linear init)           ``mean``: zero weights, bias = the training
                                                              mean expression
input_norm      ``imagenet`` mean/std                         ``estimated``: per-channel mean/std of
                                                              ``norm_batches`` (12) random training
                                                              batches, in [0, 1] scale
clamp           outputs clamped at ≥ 0 (in the forward        no clamp
                pass, so the loss sees them too, as the
                re-implementation's model does)
tta             none                                          the mean over the 8 dihedral transforms of
                                                              the patch (``stbench.images.augment``)
============== ============================================ ============================================

Both recipes train with random left-right and up-down flips and a 90° turn, each with probability ½
(``augment``). A recipe fills every one of those fields that is left unset; a field set explicitly
(``--set methods.stnet.lr=...`` or a preset file) wins, and the resolved values are what the run records
in ``run.json`` (``methods.stnet``). A config is resolved when it is built: derive a config for another
recipe by building a new one (``STNetConfig(recipe=...)``), not with ``dataclasses.replace`` (whose copy
keeps the first recipe's filled values).

Deviations and choices:

* **Epoch selection on inner validation** (Harness decision 3). ST-Net's code chose the epoch by a 4-fold
  cross-validation inside the training patients (lowest summed squared error), then retrained on all
  training patients and used that epoch's checkpoint. Here the epoch with the lowest summed squared error
  on the fold's inner-validation slides (training patients) is kept: one training run instead of five.
  ``summary()`` labels it (``epoch_selection``). The TRIPLEX re-implementation early-stops on the test
  fold (AMB-5); here it stops on inner validation. With no validation slides (``inner_val: false``) every
  epoch runs, the last one is kept and a warning says so.
* **Validation** scores the spots whose patch lies inside the image (``mask``), with the prediction the
  model will make on test slides (TTA included where the recipe has it). Mean PCC =
  ``stbench.metrics.pcc`` per validation slide, then the mean over slides.
* **Backbone and weights**: timm's ``densenet121`` (the sources use torchvision's DenseNet-121 ImageNet
  weights). Weights come from ``backbone_weights`` (a local timm-compatible state dict), else timm's
  weights if already in the local Hugging Face cache, else the run stops before reading data with a
  one-line error; ``random`` trains from random initialisation (labelled ``random-init``).
* **Patches**: 112 µm spot patches (224 px at HEST's 0.5 µm/px, §1.2) resized to ``input_px`` (224).
  ST-Net's own code cut 224 *pixels* at the slide's native resolution (about 224 µm on the HER2+ images);
  set ``spot_um`` to reproduce that field of view.
* **Expression units** are the benchmark's normalisation, not ST-Net's ``--norm`` transform (N-STNet),
  so the ``mean`` head starts at the training mean in the benchmark's units.
* Training uses the spots whose patch lies in the image (``mask``); prediction covers every spot (masked
  patches are white filler). A batch of one spot (a last partial batch) runs BatchNorm layers on their
  running statistics, since one sample has no batch statistics.
* **Prompt fine-tuning** (§9.1, :class:`stbench.torch_method.TorchMethod`): every parameter, the recipe's
  loss on the prompt spots (inside the image), its optimiser and augmentation, ``lr`` = the training lr.

Option beyond the paper: ``backbone=frozen`` replaces the trainable CNN by the run's cached frozen
encoder features of each spot patch (``images.encoder``, e.g. ``hefeat``), standardised with training
statistics; the Linear head, loss, optimiser, scheduler and selection are unchanged. It has no patches,
so no augmentation and no TTA (the features are of the untransformed patch); labelled in ``summary()``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from stbench import hookimpl
from stbench.errors import ConfigError
from stbench.specs import MethodSpec

#: every field a recipe fills when it is left unset (None)
RECIPES = {
    # NEXGEM/TRIPLEX config/ST/*/StNet.yaml + default.yaml (what TRIPLEX and PHG2ST report): METHODS.md §4
    "triplex": dict(optimizer="adamw", lr=1e-4, weight_decay=0.01, momentum=0.0, batch_size=128, epochs=1000,
                    patience=20, scheduler="plateau", select_on="pcc", loss="mse", head_init="default",
                    input_norm="imagenet", clamp=True, tta=False),
    # bryanhe/ST-Net 43022c1 README, bin/cross_validate.py, stnet/parser.py, stnet/cmd/run_spatial.py
    "original": dict(optimizer="sgd", lr=1e-6, weight_decay=0.0, momentum=0.9, batch_size=32, epochs=50,
                     patience=0, scheduler="none", select_on="loss", loss="sse", head_init="mean",
                     input_norm="estimated", clamp=False, tta=True),
}
#: allowed values of the fields that name a choice
CHOICES = {"optimizer": ("adamw", "sgd"), "scheduler": ("plateau", "none"), "select_on": ("pcc", "loss"),
           "loss": ("mse", "sse"), "head_init": ("default", "mean"), "input_norm": ("imagenet", "estimated")}


@dataclass
class STNetConfig:
    #: "triplex" (the TRIPLEX/PHG2ST re-implementation, the default: AMB-11) or "original" (ST-Net's code);
    #: fills every field below that is left at None
    recipe: str = "triplex"
    # -- network (METHODS.md §4) --------------------------------------------------------------------
    #: a timm CNN name (its pooled features feed the Linear head), or "frozen" (the run's encoder features)
    backbone: str = "densenet121"
    #: a local .safetensors/.pth state dict of ImageNet weights, "random" (labelled), or None: timm's
    #: weights if they are already in the local Hugging Face cache
    backbone_weights: Optional[str] = None
    #: side of the spot patch in µm, and the backbone's input in pixels (§1.2: 112 µm at 224 px)
    spot_um: float = 112.0
    input_px: int = 224
    # -- recipe-controlled (None: the recipe's value; see RECIPES) ------------------------------------
    #: "adamw" or "sgd"
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    #: SGD momentum (unused by AdamW)
    momentum: Optional[float] = None
    batch_size: Optional[int] = None
    #: maximum number of epochs
    epochs: Optional[int] = None
    #: early stopping after this many epochs without improvement on inner validation; 0: never
    patience: Optional[int] = None
    #: "plateau" (ReduceLROnPlateau on the select_on metric) or "none"
    scheduler: Optional[str] = None
    #: what inner validation ranks epochs on: "pcc" (mean PCC over slides, higher) or "loss" (lower)
    select_on: Optional[str] = None
    #: "mse" (mean over spots and genes) or "sse" (Σ over spots and genes ÷ G, ST-Net)
    loss: Optional[str] = None
    #: "default" (PyTorch's Linear init) or "mean" (zero weights, bias = training mean expression)
    head_init: Optional[str] = None
    #: "imagenet" mean/std, or "estimated" per-channel mean/std of norm_batches training batches
    input_norm: Optional[str] = None
    #: clamp outputs at >= 0 (in the forward pass)
    clamp: Optional[bool] = None
    #: average predictions over the 8 dihedral transforms of the patch
    tta: Optional[bool] = None
    # -- fixed settings ------------------------------------------------------------------------------
    #: ReduceLROnPlateau factor and patience (with scheduler=plateau)
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    #: training batches whose pixels estimate the input mean/std (with input_norm=estimated)
    norm_batches: int = 12
    #: random left-right flip, up-down flip and 90° turn, each with probability ½ (both recipes)
    augment: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"stnet: unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)} "
                              "(key methods.stnet.recipe)")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"stnet: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r} "
                                  f"(key methods.stnet.{key})")
        for key in ("batch_size", "epochs", "input_px", "norm_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stnet: {key} must be at least 1, got {getattr(self, key)!r} (key methods.stnet.{key})")
        for key in ("patience", "plateau_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"stnet: {key} must be >= 0, got {getattr(self, key)!r} (key methods.stnet.{key})")
        if not self.lr > 0:
            raise ConfigError(f"stnet: lr must be positive, got {self.lr!r} (key methods.stnet.lr)")


#: the fields a recipe controls (all of RECIPES' keys; every recipe fills all of them)
RECIPE_FIELDS = tuple(f.name for f in fields(STNetConfig) if f.name in RECIPES["triplex"])
assert all(set(r) == set(RECIPE_FIELDS) for r in RECIPES.values())


def stnet_needs(config) -> set:
    """A trainable CNN reads image patches; the frozen variant reads the run's encoder features."""
    if config.backbone == "frozen":
        return {"expression", "image_features"}
    return {"expression", "image_patches"}


def stnet_patches(config) -> tuple:
    from stbench.images.patches import PatchRequest

    return (PatchRequest("spot", config.spot_um, config.input_px),)


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="stnet",
            factory="stbench_plugins.stnet.model:STNet",
            config=STNetConfig,
            needs=stnet_needs,
            patches=stnet_patches,
            # timm's test_efficientnet: a 0.1 M-parameter CNN with BatchNorm, the smallest timm CNN
            test_settings=dict(backbone="test_efficientnet", backbone_weights="random", input_px=32, epochs=2,
                               batch_size=16),
            description="a fully fine-tuned DenseNet-121 regressing spot expression from its patch (ST-Net)",
            reference="He et al., Nat Biomed Eng 2020, doi:10.1038/s41551-020-0578-x; code github.com/bryanhe/ST-Net "
                      "(43022c1); benchmark recipe of github.com/NEXGEM/TRIPLEX",
        )
    )
