"""Loading model weights from local files only, safely: the public helper for encoders and for methods
that train their own backbone.

Weights come from exactly one of three places, and the returned ``weights_id`` says which (feature
caches and result tables are keyed and labelled on it):

* a local file (``--encoder-weights PATH``, or a method's ``backbone_weights``) → the file's content hash;
* ``random`` → ``"random-init"`` (seeded, so repeatable; the harness labels such results);
* nothing → the arch's timm weights *if they are already in the local Hugging Face or torch hub cache*
  (never downloaded: runs must not depend on the network) → the cached file's content hash.
  UNI has no such fallback: its weights are gated and are not a timm pretrained tag.

Checkpoints are read without unpickling code (``.safetensors``, or torch's ``weights_only`` loader).
This module imports torch and timm; only code that builds a model imports it.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch

from stbench.errors import ConfigError, DataError
from stbench.images.encoder import file_digest

UNI_ENV = "STBENCH_UNI_WEIGHTS"
UNI_HELP = (
    f", e.g. UNI's pytorch_model.bin: request access at huggingface.co/MahmoodLab/UNI (gated: accept the "
    f"CC-BY-NC-ND 4.0 licence), download pytorch_model.bin, then pass it or set {UNI_ENV}=PATH"
)
#: UNI (Chen et al., Nat Med 2024) as its model card builds it in timm
UNI_ARCH = "vit_large_patch16_224"
UNI_TIMM_KWARGS = dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: classifier heads: a num_classes=0 model has none, so a checkpoint's head weights are dropped, not refused
HEAD_PREFIXES = ("head.", "fc.", "classifier.")


# -- loading a state dict ----------------------------------------------------------------------------

def load_state_dict_safely(path, option: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint's ``{name: tensor}`` mapping, read without executing any code stored in the file.

    ``.safetensors`` holds only tensors by design; pickled formats go through torch's ``weights_only``
    unpickler, which refuses anything but tensors and plain containers. Every failure is a one-line
    :class:`DataError` naming the file and the fix; ``option`` names where the path came from (e.g.
    ``--encoder-weights`` or ``methods.hyperst.backbone_weights``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"weights file not found: {path} (check the path given{f' with {option}' if option else ''})")
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


def uni_weights(weights):
    """UNI's weights: what was given, else ``$STBENCH_UNI_WEIGHTS`` (which must then be a file)."""
    if weights is None and os.environ.get(UNI_ENV):
        weights = os.environ[UNI_ENV]
        if not Path(weights).expanduser().is_file():
            raise DataError(f"{UNI_ENV} points at {weights}, which is not a file; fix or unset {UNI_ENV}")
    return weights


def _option_name(option: str) -> str:
    """``--set methods.x.backbone_weights={}`` -> ``--set methods.x.backbone_weights``."""
    return option.replace("{}", "").rstrip("= ")


def resolve_weights(arch: str, weights, *, label: str, option: str, weights_help: str = "",
                    use_timm_cache: bool = True) -> tuple[Optional[Path], str]:
    """Where ``arch``'s weights come from, without building anything: ``(path, source)`` with ``path``
    None for ``"random"``. Missing weights and missing files are one-line errors, so a method can check
    its backbone's weights when it is configured, before any data is read."""
    if isinstance(weights, str) and weights == "random":
        return None, "random"
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DataError(f"weights file not found: {path} (check the path given with {_option_name(option)})")
        return path, "file"
    pretrained = timm.models.get_pretrained_cfg(arch)
    cfg = pretrained.to_dict() if pretrained is not None else {}
    path = find_cached_timm_weights(cfg) if use_timm_cache else None
    if path is None:
        how = option if "{}" in option else option + " {}"  # "--encoder-weights {}", "--set key={}"
        raise ConfigError(
            f"{label} has no weights: pass {how.format('PATH')} (a .safetensors or .pth state dict{weights_help}), "
            f"or {how.format('random')} to run with random initialisation (results are labelled 'random-init')"
        )
    return path, "timm-cache"


def create_timm_model(arch: str, weights, *, label: str, option: str, weights_help: str = "",
                      use_timm_cache: bool = True, timm_kwargs: Optional[dict] = None, num_classes: int = 0):
    """Build timm ``arch`` with weights from ``weights`` (a local file, ``"random"`` or None).

    Returns ``(model, weights_id, source)``; ``source`` is ``"file"``, ``"random"`` or
    ``"timm-cache"``. ``label`` names the thing in messages (``encoder uni``, ``method hyperst's
    backbone``) and ``option`` the setting that takes a path (``--encoder-weights``, or with ``{}`` where
    the value goes: ``--set methods.hyperst.backbone_weights={}``). Missing weights,
    unreadable files and checkpoints that do not fit are one-line errors; a missing file is reported
    before the model is built (a ViT-L takes seconds to initialise).
    """
    path, source = resolve_weights(arch, weights, label=label, option=option, weights_help=weights_help,
                                   use_timm_cache=use_timm_cache)
    state_dict = load_state_dict_safely(path, _option_name(option)) if path is not None else None
    # a fixed seed makes random-init repeatable (and so cacheable under "random-init"); fork_rng keeps
    # the caller's global RNG stream untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **(timm_kwargs or {}))
    if path is None:
        return model, "random-init", source
    load_into(model, state_dict, path, f"{label} (timm {arch})")
    return model, file_digest(path), source


#: name prefixes of checkpoints saved around the model (PyTorch Lightning modules, e.g. the Ciga et al.
#: self-supervised ResNet-18 "tenpercent_resnet18.ckpt"), removed in this order
WRAPPER_PREFIXES = ("model.", "resnet.")


def strip_prefixes(state_dict: dict, prefixes=WRAPPER_PREFIXES) -> dict:
    """Remove each of ``prefixes`` (in order) from the names that carry it; other names stay as they are."""
    out = dict(state_dict)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in out):
            out = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in out.items()}
    return out


def load_into(model: torch.nn.Module, sd: dict, path: Path, what: str) -> None:
    """Load strictly, after dropping a classifier head the model does not have. A checkpoint whose names
    all sit behind a wrapper's prefix (``model.``, ``resnet.``: Lightning) is unwrapped first."""
    expected = model.state_dict()
    if not any(k in expected for k in sd):
        sd = strip_prefixes(sd)
    sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(HEAD_PREFIXES)}
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" in expected and pos.shape != expected["pos_embed"].shape:
        # a ViT checkpoint trained at another input size: resample its position embeddings to this
        # model's patch grid, as timm does when it loads its own weights
        from timm.layers import resample_abs_pos_embed

        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            sd = {**sd, "pos_embed": resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)}
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
        raise DataError(f"{path} does not fit {what}: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)
