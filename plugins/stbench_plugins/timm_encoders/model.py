"""Frozen timm backbones as stbench encoders.

Weights are resolved by :mod:`stbench.weights` (local files only, never unpickling code): a file given
with ``--encoder-weights PATH``, ``--encoder-weights random``, or the arch's timm weights already in the
local cache. UNI reads ``$STBENCH_UNI_WEIGHTS`` and has no cache fallback.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F

from stbench.images.encoder import Encoder
# re-exported: the loader lived here before it became the public core helper stbench.weights
from stbench.weights import (UNI_ARCH, UNI_HELP, UNI_TIMM_KWARGS, create_timm_model, find_cached_timm_weights,  # noqa: F401
                             load_state_dict_safely, uni_weights)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: how CUDA ("CUDA out of memory") and CPU ("DefaultCPUAllocator: can't allocate memory") report OOM
OOM_MESSAGES = ("out of memory", "can't allocate memory")


# -- the encoder -------------------------------------------------------------------------------------------

class TimmEncoder(Encoder):
    """A frozen timm backbone (``num_classes=0``: pooled features) that owns its preprocessing.

    ``mean``/``std`` default to the arch's timm pretrained config (e.g. (0.5, 0.5, 0.5) for the augreg
    ViTs), which is what its timm weights were trained with.
    """

    def __init__(self, name: str, arch: str, weights, input_size: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 timm_kwargs: Optional[dict] = None, weights_help: str = "", use_timm_cache: bool = True):
        self.name = name
        self.arch = arch
        pretrained = timm.models.get_pretrained_cfg(arch)
        cfg = pretrained.to_dict() if pretrained is not None else {}
        model, self.weights_id, self.weights_source = create_timm_model(
            arch, weights, label=f"encoder {name}", option="--encoder-weights", weights_help=weights_help,
            use_timm_cache=use_timm_cache, timm_kwargs=timm_kwargs)
        self.input_size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.dim = int(model.num_features)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 autocast halves memory and time on GPU; CPUs gain little from it, so stay in fp32 there
        self.precision = "float16" if self.device.type == "cuda" else "float32"
        self.model = model.eval().requires_grad_(False).to(self.device)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(mean or cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(shape).to(self.device)
        self._std = torch.tensor(std or cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(shape).to(self.device)

    def describe(self) -> dict:
        return {**super().describe(), "arch": self.arch, "weights_source": self.weights_source,
                "device": self.device.type, "precision": self.precision, "batch_size": self.batch_size}

    def encode(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"encoder {self.name} expects uint8 patches of shape (B, H, W, 3); "
                             f"got {patches.dtype} {patches.shape}")
        out = np.empty((len(patches), self.dim), dtype=np.float32)
        start = 0
        while start < len(patches):
            stop = min(start + self.batch_size, len(patches))
            try:
                out[start:stop] = self._forward(patches[start:stop])
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not any(m in str(exc).lower() for m in OOM_MESSAGES) or self.batch_size <= 1:
                    raise
                # batch size adapts to memory: halve, retry this chunk, and keep the smaller size afterwards
                self.batch_size = max(1, self.batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start = stop
        return out

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-2:] != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            x = (x - self._mean) / self._std
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
                feats = self.model(x)
            return feats.float().cpu().numpy()


# -- factories: the harness calls ``factory(weights)`` -------------------------------------------------------

def resnet18(weights) -> TimmEncoder:
    return TimmEncoder("resnet18", "resnet18", weights)


def resnet50(weights) -> TimmEncoder:
    return TimmEncoder("resnet50", "resnet50", weights)


def densenet121(weights) -> TimmEncoder:
    return TimmEncoder("densenet121", "densenet121", weights)


def vit_small(weights) -> TimmEncoder:
    return TimmEncoder("vit_small", "vit_small_patch16_224", weights)


def uni(weights) -> TimmEncoder:
    """UNI (Chen et al., Nature Medicine 2024): ViT-L/16 built as in its model card, ImageNet normalisation."""
    return TimmEncoder("uni", UNI_ARCH, uni_weights(weights), input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       timm_kwargs=UNI_TIMM_KWARGS, weights_help=UNI_HELP, use_timm_cache=False)
