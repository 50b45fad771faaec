"""``resnet18``, ``resnet50``, ``densenet121``, ``vit_small``, ``uni``: frozen timm backbones as image encoders.

No weights are ever downloaded. Each encoder takes ``--encoder-weights PATH`` (a ``.safetensors`` or
``.pth`` state dict, read without unpickling code) or ``--encoder-weights random`` (seeded random init,
labelled ``random-init``). Without either, the ImageNet encoders use their timm weights if an earlier
download left them in the local Hugging Face (or torch hub) cache; UNI reads ``STBENCH_UNI_WEIGHTS``.

This module only registers names: torch and timm are imported by ``model`` when an encoder is built, so
``stbench list`` stays fast.
"""

from stbench import hookimpl
from stbench.specs import EncoderSpec

UNI_REFERENCE = (
    'Chen R.J. et al., "Towards a general-purpose foundation model for computational pathology", '
    "Nature Medicine 30, 850-862 (2024), doi:10.1038/s41591-024-02857-3"
)

_LOCAL = "--encoder-weights FILE, else timm's {tag} weights if already in the local HF cache"

#: name -> (timm arch, description, extra). The factory is ``model:<name>``.
ENCODERS = {
    "resnet18": ("resnet18", "ResNet-18, 512-d, ImageNet-1k; weights: " + _LOCAL.format(tag="resnet18.a1_in1k"), {}),
    "resnet50": ("resnet50", "ResNet-50, 2048-d, ImageNet-1k; weights: " + _LOCAL.format(tag="resnet50.a1_in1k"), {}),
    "densenet121": ("densenet121",
                    "DenseNet-121, 1024-d, ImageNet-1k; weights: " + _LOCAL.format(tag="densenet121.ra_in1k"), {}),
    "vit_small": ("vit_small_patch16_224",
                  "ViT-S/16, 384-d, ImageNet-21k→1k; weights: "
                  + _LOCAL.format(tag="vit_small_patch16_224.augreg_in21k_ft_in1k"), {}),
    "uni": ("vit_large_patch16_224",
            "UNI ViT-L/16 pathology foundation model, 1024-d (Chen et al., Nat Med 2024); weights: "
            "huggingface.co/MahmoodLab/UNI (gated, CC-BY-NC-ND 4.0) via --encoder-weights or STBENCH_UNI_WEIGHTS",
            {"reference": UNI_REFERENCE, "weights_url": "https://huggingface.co/MahmoodLab/UNI",
             "licence": "CC-BY-NC-ND 4.0 (gated: accept the terms on the model page)"}),
}


@hookimpl
def stbench_register_encoders(register):
    for name, (arch, description, extra) in ENCODERS.items():
        register(EncoderSpec(
            name=name,
            factory=f"stbench_plugins.timm_encoders.model:{name}",
            description=description,
            extra={"arch": arch, **extra},
        ))
