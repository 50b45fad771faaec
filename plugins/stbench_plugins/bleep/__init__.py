"""BLEEP: contrastive image–expression embedding, prediction by retrieval of reference spots.

Paper: Xie et al., "Spatially Resolved Gene Expression Prediction from H&E Histology Images via
Bi-modal Contrastive Learning", NeurIPS 2023; code bowang-lab/BLEEP (2395967). Specification:
METHODS.md §5, and §9.1 / AMB-11 to AMB-13 for its place in the PHG2ST protocol.

The model: a trainable timm CNN (global average pool) and two projection heads, image (features → P)
and spot (G → P), each ``stbench.nn.PromptProjection(..., residual=True)`` (z0 = Linear(x);
LayerNorm(Dropout(Linear(GELU(z0))) + z0)), dropout 0.1; trained with the symmetric soft-target
contrastive loss at temperature τ = 1 (:func:`stbench_plugins.bleep.model.bleep_loss`), no L2
normalisation in training. Prediction: embed the query patch with the image head and every reference
spot (all spots of the fold's training patients, training and inner-validation slides, in the
benchmark's normalisation) with the spot head, L2-normalise both, take the top ``k`` = 50 by cosine
similarity and average their expression vectors (:mod:`stbench_plugins.bleep.retrieval`).

Two recipes; ``recipe`` fills every recipe field left unset (``None``), a field set explicitly wins, and
the resolved values are what the run records (run.json, config.yaml):

* ``triplex`` (default; the TRIPLEX benchmark's re-implementation, the pipeline behind the PHG2ST
  numbers, AMB-11): ResNet-18, P = 512, AdamW lr 1e-4 (torch's weight decay 0.01), batch 128, at most
  1,000 epochs, early stopping with patience 20 on the inner-validation loss, best checkpoint kept.
  TRIPLEX starts from Ciga et al.'s self-supervised histopathology ResNet-18; give it as a local timm
  ``resnet18`` state dict with ``backbone_weights=PATH`` (None reads ImageNet weights from the local
  timm cache; ``random`` is random initialisation, labelled in tables).
* ``original`` (the BLEEP repository): ResNet-50, P = 256, AdamW lr 1e-3, weight decay 1e-3, batch 256
  with ``drop_last``, 150 epochs, the checkpoint with the lowest inner-validation contrastive loss.
  The epoch count of the paper is in none of the sources (the repository's ``--max_epochs`` default is
  4; AMB-12): 150 is the harness's choice.

Choices and deviations:

* Augmentation: horizontal and vertical flips and a 90° turn, each with probability ½ (together the
  uniform draw over the 8 symmetries that the original's flips + rotation in {0, 90, 180, −90} give);
  ImageNet normalisation of RGB patches. The original read patches with OpenCV, i.e. BGR, and still
  applied the RGB ImageNet statistics (AMB-1); here patches are RGB.
* Patches: ``spot_um`` = 112 µm (224 px at 0.5 µm/px, METHODS.md §1.2) resized to ``input_px``.
  Training uses the spots whose patch lies in the image; every spot is predicted.
* Model selection uses inner-validation slides of the training patients (the original's random 20 % of
  training spots and TRIPLEX's test fold are not used, Harness decision 3); the final model is the
  selected checkpoint and the reference set holds all training patients' spots.
* ``k`` larger than the reference set: all reference spots are used.
* ``aggregate``: ``average`` (default, both repositories), ``simple`` (the top-1 spot) or
  ``weighted_average`` (top ``k`` weighted by exp(−(‖e_rj − e_q‖² − ‖e_r1 − e_q‖² + 1)) on the
  unnormalised embeddings, METHODS.md §5).
* ``match_on=unprojected`` reproduces TRIPLEX's bug (the query is the backbone's un-projected feature
  vector, matched against projected spot embeddings; it needs feature width = P). Never the default.
* Prompts: BLEEP is not fine-tuned on prompt spots (PHG2ST, §9.1): its spec says ``finetune=False``.
  Whether PHG2ST put the test slide's prompt spots into the retrieval database is not stated (AMB-13);
  the default is no, and ``prompts_in_reference=true`` adds them (a labelled variant).

Options beyond the paper: ``backbone=frozen`` (the run's cached image features, standardised with
training statistics, replace the trainable CNN; everything after it is unchanged).
"""

from dataclasses import dataclass
from typing import Optional

from stbench import hookimpl
from stbench.errors import ConfigError
from stbench.specs import MethodSpec

#: what each recipe sets (METHODS.md §5); ``patience`` 0 = no early stopping (the best checkpoint is kept)
RECIPES = {
    "triplex": dict(backbone="resnet18", projection_dim=512, lr=1e-4, weight_decay=0.01, batch_size=128,
                    drop_last=False, epochs=1000, patience=20),
    "original": dict(backbone="resnet50", projection_dim=256, lr=1e-3, weight_decay=1e-3, batch_size=256,
                     drop_last=True, epochs=150, patience=0),
}
AGGREGATES = ("average", "simple", "weighted_average")
MATCH_ON = ("projected", "unprojected")


@dataclass
class BLEEPConfig:
    #: "triplex" (TRIPLEX's re-implementation, the default) or "original" (the BLEEP repository): fills
    #: every field below that is left None
    recipe: str = "triplex"
    # -- image encoder (§5 architecture) -------------------------------------------------------------
    #: a timm CNN name (recipe: resnet18 / resnet50), or "frozen" (the run's cached image features)
    backbone: Optional[str] = None
    #: a local .safetensors/.pth state dict, "random" (labelled), or None: the local timm cache
    backbone_weights: Optional[str] = None
    #: side of the spot patch in µm and the backbone's input in pixels
    spot_um: float = 112.0
    input_px: int = 224
    # -- projection heads and loss -------------------------------------------------------------------
    #: P, the width of both projection heads (recipe: 512 / 256)
    projection_dim: Optional[int] = None
    dropout: float = 0.1
    temperature: float = 1.0
    # -- training (recipe fields) ----------------------------------------------------------------------
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    #: drop the last incomplete training batch (recipe: false / true)
    drop_last: Optional[bool] = None
    #: maximum number of epochs (recipe: 1000 / 150)
    epochs: Optional[int] = None
    #: epochs without a lower inner-validation loss before stopping; 0 = never stop early (recipe: 20 / 0)
    patience: Optional[int] = None
    # -- retrieval (§5 inference) --------------------------------------------------------------------
    k: int = 50
    #: "average" (unweighted mean of the top k), "simple" (top 1) or "weighted_average"
    aggregate: str = "average"
    #: "projected" (the paper) or "unprojected" (TRIPLEX's bug: un-projected image features as the query)
    match_on: str = "projected"
    #: add the test slide's prompt spots to the reference set at prediction time (AMB-13; labelled)
    prompts_in_reference: bool = False
    #: fp16 autocast in training and embedding, on CUDA only (the loss is computed in float32)
    amp: bool = True

    def __post_init__(self):
        recipe = RECIPES.get(self.recipe)
        if recipe is None:
            raise ConfigError(f"bleep: unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)} "
                              "(key methods.bleep.recipe)")
        for key, value in recipe.items():
            if getattr(self, key) is None:
                setattr(self, key, value)


def bleep_needs(config) -> set:
    """The trainable CNN reads image patches; the frozen variant reads the run's cached image features."""
    return {"expression", "image_features" if config.backbone == "frozen" else "image_patches"}


def bleep_patches(config) -> tuple:
    from stbench.images.patches import PatchRequest

    return (PatchRequest("spot", config.spot_um, config.input_px),)


@hookimpl
def stbench_register_methods(register):
    register(
        MethodSpec(
            name="bleep",
            factory="stbench_plugins.bleep.model:BLEEP",
            config=BLEEPConfig,
            needs=bleep_needs,
            patches=bleep_patches,
            # PHG2ST: "Fine-tuning was applied on all comparison methods except BLEEP" (§9.1)
            finetune=False,
            # timm's test_resnet: 96-d pooled features, 0.37 M parameters
            test_settings=dict(backbone="test_resnet", backbone_weights="random", input_px=32, projection_dim=16,
                               epochs=2, batch_size=16, k=8),
            description="contrastive image/expression embedding, prediction by top-k retrieval (BLEEP)",
            reference="Xie et al., NeurIPS 2023; code github.com/bowang-lab/BLEEP (2395967)",
        )
    )
