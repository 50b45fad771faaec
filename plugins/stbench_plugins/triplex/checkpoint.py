"""The target encoder's weights from a local file, including the Ciga self-supervised ResNet-18.

TRIPLEX initialises its ResNet-18 with Ciga et al.'s self-supervised histopathology weights
("tenpercent_resnet18.ckpt", a PyTorch Lightning checkpoint). Its parameters sit under
``state_dict`` with the names of torchvision's ResNet-18 behind a ``model.`` and/or ``resnet.`` prefix,
and a classifier ``fc`` the target encoder does not use. torchvision's and timm's ResNet-18 share
parameter names, so after removing the prefixes the weights load strictly into timm's ``resnet18``.

A plain timm state dict (no prefixes) loads the same way. Files are read with
:func:`stbench.weights.load_state_dict_safely` (tensors only, no code from the file runs); a Lightning
checkpoint whose extra entries are not plain containers is refused with the one-line conversion recipe.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from stbench.images.encoder import file_digest
from stbench.weights import load_into, load_state_dict_safely, strip_prefixes  # noqa: F401 (strip_prefixes re-exported)

def load_backbone_file(model: nn.Module, path, *, arch: str, option: str) -> str:
    """Load ``path`` (a Ciga-style Lightning checkpoint or a plain state dict) into ``model``; returns
    the weights id (the file's digest). Missing, unexpected or misshapen keys are one-line errors."""
    path = Path(path).expanduser()
    sd = strip_prefixes(load_state_dict_safely(path, option))
    load_into(model, sd, path, f"method triplex's backbone (timm {arch})")
    return file_digest(path)
