"""Frozen timm backbones as stbench encoders, and a loader that never unpickles arbitrary objects.

Weights come from exactly one of three places, and ``weights_id`` says which (the feature cache is keyed
on it):

* a local file given with ``--encoder-weights PATH`` → the file's content hash;
* ``--encoder-weights random`` → ``"random-init"`` (seeded, so repeatable; the harness labels such results);
* nothing → the arch's timm weights *if they are already in the local Hugging Face or torch hub cache*
  (never downloaded here: runs must not depend on the network) → the cached file's content hash.
  UNI has no such fallback: its weights are gated and are not a timm pretrained tag.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F

from stbench.errors import ConfigError, DataError
from stbench.images.encoder import Encoder, file_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: classifier heads: a num_classes=0 model has none, so a checkpoint's head weights are dropped, not refused
HEAD_PREFIXES = ("head.", "fc.", "classifier.")

#: how CUDA ("CUDA out of memory") and CPU ("DefaultCPUAllocator: can't allocate memory") report OOM
OOM_MESSAGES = ("out of memory", "can't allocate memory")

UNI_ENV = "STBENCH_UNI_WEIGHTS"
UNI_HELP = (
    f", e.g. UNI's pytorch_model.bin: request access at huggingface.co/MahmoodLab/UNI (gated: accept the "
    f"CC-BY-NC-ND 4.0 licence), download pytorch_model.bin, then pass it or set {UNI_ENV}=PATH"
)


# -- loading a state dict ----------------------------------------------------------------------------

def load_state_dict_safely(path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``{name: tensor}`` mapping, read without executing any code stored in the file.

    ``.safetensors`` holds only tensors by design; pickled formats go through torch's ``weights_only``
    unpickler, which refuses anything but tensors and plain containers. Every failure is a one-line
    :class:`DataError` naming the file and the fix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"encoder weights file not found: {path} (check the path given with --encoder-weights)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError: truncated or not safetensors at all
            raise DataError(f"{path} is not a valid .safetensors file ({_first_line(exc)}); re-download or re-export it") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # torch warns about unusual pickle protocols before refusing them; our error says it all
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch words every refusal alike; a file that starts like neither torch.save's zip nor a
            # pickle is garbage (an HTML error page, a text file), not a checkpoint with foreign objects
            with open(path, "rb") as fh:
                head = fh.read(4)
            if not (head.startswith(b"PK") or head.startswith(b"\x80")):
                raise DataError(f"{path} is not a PyTorch weights file (it starts with {head!r}); "
                                f"re-download it or use a .safetensors file") from None
            raise DataError(
                f"{path} holds arbitrary Python objects; stbench loads only plain tensors: convert it with "
                f"`python -c \"import torch, safetensors.torch as s; sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', sd); "
                f"s.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\"` "
                f"(only if you trust where it came from) or use a .safetensors file"
            ) from None
        except Exception as exc:  # a truncated download, a corrupt zip...
            raise DataError(f"{path} is not a PyTorch weights file ({type(exc).__name__}: {_first_line(exc)}); "
                            f"re-download it or use a .safetensors file") from None
    else:
        raise DataError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
                        f"use a .safetensors file or a state dict saved as {'/'.join(PICKLE_SUFFIXES)}")

    # training checkpoints often wrap the weights: {"state_dict": ..., "epoch": ...} or {"model": ...}
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise DataError(f"{path} does not hold a mapping of parameter names to tensors (found {_kind(obj)}); "
                        f"pass a state dict (model.state_dict()) saved as .safetensors or .pth")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(obj) -> str:
    if isinstance(obj, dict):
        bad = next(((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        return "an empty dict" if bad is None else f"entry {bad[0]!r} of type {type(bad[1]).__name__}"
    return type(obj).__name__


def _list(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- the local cache of timm's own weights -------------------------------------------------------------

def find_cached_timm_weights(cfg: dict) -> Optional[Path]:
    """The arch's default pretrained file if a previous download left it in a local cache, else None.

    ``cfg`` is the arch's timm pretrained config. Looks only at files on disk (no request is ever made,
    whatever HF_HUB_OFFLINE says): the Hugging Face hub cache (where timm >= 0.9 downloads) and torch
    hub's checkpoints folder (older timm). Any failure means "not found": the caller then asks the user.
    """
    try:
        hub_id = cfg.get("hf_hub_id")
        if hub_id:
            from huggingface_hub import try_to_load_from_cache

            repo_id, _, revision = hub_id.partition("@")
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            for name in names:
                found = try_to_load_from_cache(repo_id, name, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):  # may also be a "known missing" sentinel
                    return Path(found)
        url = cfg.get("url")
        if url:
            legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
            # .npz (original JAX ViT weights) needs timm's converter; we only take plain state dicts
            if legacy.is_file() and legacy.suffix in (".safetensors",) + PICKLE_SUFFIXES:
                return legacy
    except Exception:
        pass
    return None


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

        # settle where the weights come from before building the model: a missing-weights error should
        # not cost the seconds a ViT-L takes to initialise
        if isinstance(weights, str) and weights == "random":
            path, self.weights_source = None, "random"
        elif weights is not None:
            path, self.weights_source = Path(weights).expanduser(), "file"
        else:
            path, self.weights_source = (find_cached_timm_weights(cfg) if use_timm_cache else None), "timm-cache"
            if path is None:
                raise ConfigError(
                    f"encoder {name} has no weights: pass --encoder-weights PATH (a .safetensors or .pth state dict"
                    f"{weights_help}), or --encoder-weights random to run with random initialisation "
                    f"(results are labelled 'random-init')"
                )

        state_dict = load_state_dict_safely(path) if path is not None else None  # file errors before the build

        # a fixed seed makes random-init features repeatable (and so cacheable under "random-init");
        # fork_rng keeps the caller's global RNG stream untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, num_classes=0, **(timm_kwargs or {}))
        if path is None:
            self.weights_id = "random-init"
        else:
            self._load(model, state_dict, path)
            self.weights_id = file_digest(path)

        self.input_size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.dim = int(model.num_features)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 autocast halves memory and time on GPU; CPUs gain little from it, so stay in fp32 there
        self.precision = "float16" if self.device.type == "cuda" else "float32"
        self.model = model.eval().requires_grad_(False).to(self.device)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(mean or cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(shape).to(self.device)
        self._std = torch.tensor(std or cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(shape).to(self.device)

    def _load(self, model: torch.nn.Module, sd: dict, path: Path) -> None:
        """Load strictly, after dropping the classifier head a num_classes=0 model does not have."""
        expected = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(HEAD_PREFIXES)}
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in sd.items()
                       if k in expected and v.shape != expected[k].shape]
        problems = []
        if missing:
            problems.append(f"missing keys {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_list(unexpected)}")
        if wrong_shape:
            problems.append(f"shape mismatches (file vs model) {_list(wrong_shape)}")
        if problems:
            raise DataError(f"{path} does not fit encoder {self.name} (timm {self.arch}): {'; '.join(problems)}")
        model.load_state_dict(sd, strict=True)

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
    if weights is None and os.environ.get(UNI_ENV):
        weights = os.environ[UNI_ENV]
        if not Path(weights).expanduser().is_file():
            raise DataError(f"{UNI_ENV} points at {weights}, which is not a file; fix or unset {UNI_ENV}")
    return TimmEncoder(
        "uni", "vit_large_patch16_224", weights, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        weights_help=UNI_HELP, use_timm_cache=False,
    )
