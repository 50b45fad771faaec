"""TRIPLEX: target, neighbour and global views of a spot, fused by cross-attention (METHODS.md §6).

Paper: Chung, Ha, Kim, Lee, Yun, Kim, "Accurate Spatial Gene Expression Prediction by Integrating
Multi-Resolution Features", CVPR 2024, arXiv:2403.07592; code github.com/NEXGEM/TRIPLEX (paper-era
commits ac50e05 + 4d2a929). Specification: METHODS.md §6, shared blocks §3 (``stbench.nn``), AMB-14/15.
No code of the repository is reproduced here.

The network (width D = ``dim``):

* **target tokens** T_t: the method's own timm CNN (``backbone``, default ``resnet18``) up to its last
  stage without pooling (h×w tokens of width c: 7×7 = 49 at 224 px), then Linear(c → D) when c ≠ D;
  every parameter trained;
* **neighbour tokens** T_n: the run's frozen encoder features of the 5×5 grid of sub-patches
  (``slide.features["neighbour"]``), Linear(d → D) when d ≠ D, then :class:`stbench.nn.NeighborEncoder`
  (relative-position bias, key mask of sub-patches outside the image, final LayerNorm);
* **global token** t_g: the frozen spot features of every spot of the slide, Linear(d → D), then
  :class:`stbench.nn.GlobalEncoder` (1 block → PEG on ``slide.grid`` → depth2 − 1 blocks → LN); training
  re-encodes, with gradient, every slide present in a minibatch;
* **fusion**: one shared :class:`stbench.nn.CrossEncoder` with query t_g: f1 = Cross(t_g, T_t),
  f2 = Cross(t_g, T_n, mask), z = LN(f1 + f2);
* **heads** Linear(D → G): ŷ_f(z), ŷ_t(mean T_t), ŷ_n(mean T_n, masked tokens included), ŷ_g(t_g); with
  ``clamp`` all four are clamped at ≥ 0 (the current code; the paper-era code does not: AMB-14, default
  False);
* **loss** L = MSE(ŷ_f, y) + Σ_b [(1 − α) MSE(ŷ_b, y) + α MSE(ŷ_f, ŷ_b)], α = 0.3, no stop-gradient.

Named settings (``setting``) fill the depth/heads/mlp_ratio/dropout fields left unset (None): ``her2``
(default), ``cscc``, ``bc2`` (the paper-era configs) and ``her2_2024_09`` (the 2024-09 her2st config,
AMB-15). A field set explicitly wins. Build a new config for another setting rather than
``dataclasses.replace`` (whose copy keeps the first setting's filled values).

Training (paper-era): Adam lr 1e-4, StepLR(50 epochs, ×0.9), 200 epochs, batches of 128 spots pooled
across training slides, H/V flips and a 90° turn of the target patch (p = ½ each), early stopping
(patience 20) on the inner-validation mean PCC with the best weights kept. ``optimizer=adamw_plateau``:
AdamW + ReduceLROnPlateau(×0.1, patience 10) on that PCC (the current code). Prompt fine-tuning (§9.1) runs
through :class:`stbench.torch_method.TorchMethod` with TRIPLEX's lr 1e-6 (``finetune_lr``).
Inference: the global branch once per slide, then every spot in chunks; the output is ŷ_f.

Deviations and choices:

* Epoch selection on inner validation (training patients), not on the test fold (AMB-5).
* fp16 is not used (the harness trains in float32).
* Images enter as [0, 1] (paper-era ``ToTensor``); ``input_norm=imagenet`` uses ImageNet mean/std.
* Training uses spots whose target patch (frozen: spot features) lies inside the image; prediction covers
  every spot.
* Weights: ``backbone_weights`` takes Ciga's self-supervised ResNet-18 checkpoint
  ("tenpercent_resnet18.ckpt": its ``model.``/``resnet.`` name prefixes are removed, see
  :mod:`stbench_plugins.triplex.checkpoint`) or any timm state dict; None uses timm's weights when they are in
  the local Hugging Face cache (ImageNet, not the paper's); ``random`` is labelled random-init.

Option beyond the paper: ``backbone=frozen``: the target tokens are the cached spot features
(``slide.features["spot"]``, one token, Linear(d → D)); there are no patches and no augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stbench import hookimpl
from stbench.errors import ConfigError
from stbench.specs import MethodSpec

#: (fusion, global, neighbour) = (…1, …2, …3) per named setting: METHODS.md §6 table and AMB-15
SETTINGS = {
    "her2": dict(depth1=1, depth2=3, depth3=3, heads1=4, heads2=16, heads3=16, mlp_ratio1=4.0, mlp_ratio2=4.0,
                 mlp_ratio3=1.0, dropout1=0.2, dropout2=0.1, dropout3=0.3),
    "cscc": dict(depth1=2, depth2=2, depth3=4, heads1=8, heads2=16, heads3=16, mlp_ratio1=4.0, mlp_ratio2=1.0,
                 mlp_ratio3=1.0, dropout1=0.1, dropout2=0.1, dropout3=0.3),
    "bc2": dict(depth1=3, depth2=3, depth3=4, heads1=16, heads2=8, heads3=8, mlp_ratio1=4.0, mlp_ratio2=2.0,
                mlp_ratio3=4.0, dropout1=0.4, dropout2=0.1, dropout3=0.3),
    "her2_2024_09": dict(depth1=1, depth2=5, depth3=4, heads1=4, heads2=8, heads3=4, mlp_ratio1=4.0, mlp_ratio2=4.0,
                         mlp_ratio3=4.0, dropout1=0.4, dropout2=0.3, dropout3=0.3),
}
OPTIMIZERS = ("adam_step", "adamw_plateau")
INPUT_NORMS = ("none", "imagenet")


@dataclass
class TRIPLEXConfig:
    #: named setting filling the depth/heads/mlp_ratio/dropout fields left at None (see SETTINGS)
    setting: str = "her2"
    # -- encoders -------------------------------------------------------------------------------------
    #: a timm CNN for the target patch (its last stage, unpooled, gives the tokens), or "frozen"
    backbone: str = "resnet18"
    #: a local .safetensors/.pth state dict, "random" (labelled), or None: timm's weights if cached locally
    backbone_weights: Optional[str] = None
    #: target patch side in µm and in pixels (§6: 224 px at 0.5 µm/px)
    spot_um: float = 112.0
    input_px: int = 224
    #: "none" ([0, 1], paper-era) or "imagenet" mean/std
    input_norm: str = "none"
    # -- transformer (None: the setting's value) ---------------------------------------------------------
    dim: int = 512
    depth1: Optional[int] = None
    depth2: Optional[int] = None
    depth3: Optional[int] = None
    heads1: Optional[int] = None
    heads2: Optional[int] = None
    heads3: Optional[int] = None
    mlp_ratio1: Optional[float] = None
    mlp_ratio2: Optional[float] = None
    mlp_ratio3: Optional[float] = None
    dropout1: Optional[float] = None
    dropout2: Optional[float] = None
    dropout3: Optional[float] = None
    #: weight of the distillation term of the loss
    alpha: float = 0.3
    #: clamp all four heads at >= 0 (the current code); False = paper-era (AMB-14)
    clamp: bool = False
    # -- training (paper-era unless said) ----------------------------------------------------------------
    #: spots per batch, pooled across the training slides
    batch_size: int = 128
    #: maximum number of epochs
    epochs: int = 200
    #: early stopping on the inner-validation mean PCC after this many epochs without improvement; 0: never
    patience: int = 20
    #: random H flip, V flip and 90° turn of the target patch, each p = ½
    augment: bool = True
    lr: float = 1e-4
    #: StepLR period in epochs and factor (adam_step)
    step_size: int = 50
    gamma: float = 0.9
    #: "adam_step" (Adam + StepLR, paper-era) or "adamw_plateau" (AdamW + ReduceLROnPlateau, current code)
    optimizer: str = "adam_step"
    #: AdamW weight decay, ReduceLROnPlateau factor and patience (adamw_plateau)
    weight_decay: float = 0.01
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    #: prompt fine-tuning learning rate (TRIPLEX: 1e-6)
    finetune_lr: float = 1e-6
    # -- practicalities (not in the sources) ----------------------------------------------------------------
    #: standardise the frozen features with training statistics (the sources feed them raw)
    standardise_features: bool = False
    #: start every head's bias at the training mean expression (helps few-epoch CPU runs)
    init_bias_to_mean: bool = False
    #: spots per forward pass at prediction and validation time
    eval_chunk: int = 512

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ConfigError(f"triplex: unknown setting {self.setting!r}; choose one of {', '.join(SETTINGS)} "
                              "(key methods.triplex.setting)")
        for key, value in SETTINGS[self.setting].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key, allowed in (("optimizer", OPTIMIZERS), ("input_norm", INPUT_NORMS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"triplex: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r} "
                                  f"(key methods.triplex.{key})")
        if self.depth2 < 2:
            raise ConfigError(f"triplex: depth2 (global encoder) must be at least 2, got {self.depth2!r} "
                              "(key methods.triplex.depth2)")
        for key in ("depth1", "depth3", "epochs", "batch_size", "input_px", "dim", "eval_chunk", "step_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"triplex: {key} must be at least 1, got {getattr(self, key)!r} (key methods.triplex.{key})")
        for key in ("heads1", "heads2", "heads3"):
            h = getattr(self, key)
            if h < 1 or self.dim % h:
                raise ConfigError(f"triplex: {key}={h!r} must divide dim={self.dim} (key methods.triplex.{key})")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"triplex: alpha must be in [0, 1], got {self.alpha!r} (key methods.triplex.alpha)")


#: the fields a named setting fills
SETTING_FIELDS = tuple(SETTINGS["her2"])
assert all(set(s) == set(SETTING_FIELDS) for s in SETTINGS.values())


def triplex_needs(config) -> set:
    """Neighbour and global (spot) features always; target patches unless the target is frozen too."""
    base = {"expression", "coords", "neighbour_features", "image_features", "slide_context"}
    return base if config.backbone == "frozen" else base | {"image_patches"}


def triplex_patches(config) -> tuple:
    from stbench.images.patches import PatchRequest

    return (PatchRequest("spot", config.spot_um, config.input_px),)


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="triplex",
            factory="stbench_plugins.triplex.model:TRIPLEX",
            config=TRIPLEXConfig,
            needs=triplex_needs,
            patches=triplex_patches,
            test_settings=dict(backbone="test_resnet", backbone_weights="random", input_px=32, dim=16, depth1=1,
                               depth2=2, depth3=1, heads1=2, heads2=2, heads3=2, epochs=2, batch_size=16),
            description="target/neighbour/global views fused by cross-attention with a fine-tuned ResNet-18 (TRIPLEX)",
            reference="Chung et al., CVPR 2024, arXiv:2403.07592; code github.com/NEXGEM/TRIPLEX (ac50e05)",
        )
    )
