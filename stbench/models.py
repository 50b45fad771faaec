"""Saved models: a fitted method kept on disk with what it needs to be used again, loaded without
unpickling anything.

``stbench run --save-models`` writes, per method and fold, ``RUN_DIR/models/<method>/fold<k>/`` (and with
``--fit-all`` ``models/<method>/all/``, fitted on every section)::

    model.safetensors   the fitted state's arrays (Method.get_state), tensors only by design
    model.json          everything else, as JSON: the method and its resolved config, the gene panel,
                        the normalisation, the encoder identity (name and weights hash, as the feature
                        cache keys it), the image settings, the dataset's spot geometry, the sections it
                        was fitted and validated on, the protocol, the method's own metadata, and the
                        SHA-256 of model.safetensors

Loading (:func:`load`) reads only JSON and safetensors, checks the weights file against the recorded
SHA-256, and refuses in one line a model whose panel, normalisation or encoder does not match what the
caller will feed it. Writing is atomic and ordered: ``model.json`` is removed first and written last, so
a model directory counts as saved (:func:`is_saved`) only when both files belong together.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stbench import atomic
from stbench.errors import ConfigError, DataError
from stbench.method import FittedState, Method

#: bump when the layout of model.json changes meaning
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "model.json"
#: the scope of a model fitted on every section (no test fold): models/<method>/all
ALL = "all"


def model_dir(run_dir: Path, method: str, scope: str) -> Path:
    """``RUN_DIR/models/<method>/<scope>``; ``scope`` is ``fold<k>`` or ``all``."""
    return Path(run_dir) / "models" / method / scope


def fold_scope(index: int) -> str:
    return f"fold{index}"


def cannot_save(name: str, method_class: type) -> ConfigError:
    return ConfigError(f"method {name} cannot save its fitted state ({method_class.__name__} implements no "
                       "get_state/set_state); leave it out of --methods or run without --save-models")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_json(value: Any, where: str) -> None:
    """Metadata must be plain JSON (no NaN: JSON has none; no objects): fail at save time, not at load."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            _check_json(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value} is not valid JSON; store None instead")
    elif not (value is None or isinstance(value, (str, bool, int))):
        raise TypeError(f"{where}: {type(value).__name__} is not JSON; convert it (e.g. float(), .tolist())")


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays in method metadata become Python numbers and lists; NaN becomes None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------
# saving


def is_saved(directory: Path) -> bool:
    """A complete model: ``model.json`` parses and the weights file has the size it records (the full
    SHA-256 is checked when the model is loaded)."""
    try:
        record = json.loads((Path(directory) / RECORD_FILE).read_text(encoding="utf-8"))
        return (Path(directory) / WEIGHTS_FILE).stat().st_size == record["weights"]["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save(directory: Path, method: Method, record: dict) -> dict:
    """Save ``method``'s fitted state into ``directory`` with ``record`` (the provenance and what the
    model expects as input); returns the record written."""
    directory = Path(directory)
    state = method.get_state()
    meta = _plain(state.meta)
    _check_json(meta, f"{type(method).__name__}.get_state().meta")
    torch_arrays = any(not isinstance(v, np.ndarray) for v in state.arrays.values())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECORD_FILE).unlink(missing_ok=True)  # not "saved" while the weights change
    weights = directory / WEIGHTS_FILE
    with atomic.atomic_path(weights) as tmp:
        if torch_arrays:
            import torch
            from safetensors.torch import save_file

            save_file({k: torch.as_tensor(v).contiguous() for k, v in state.arrays.items()}, str(tmp))
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in state.arrays.items()}, str(tmp))
    full = {"format": FORMAT_VERSION, **record,
            "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
                        "framework": "torch" if torch_arrays else "numpy"},
            "state": meta}
    _check_json(full, RECORD_FILE)
    atomic.write_text(directory / RECORD_FILE, json.dumps(full, indent=1) + "\n")
    return full


# ------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedModel:
    """A model read back: the rebuilt method, its spec and config, and the record from model.json."""

    method: Method
    spec: Any
    config: Any
    record: dict
    directory: Path

    @property
    def name(self) -> str:
        return self.record["method"]

    @property
    def genes(self) -> list[str]:
        return list(self.record["genes"])

    @property
    def sha256(self) -> str:
        return self.record["weights"]["sha256"]


def read_record(directory: Path) -> dict:
    """model.json of a model directory, checked; one-line errors for anything that is not one."""
    directory = Path(directory)
    path = directory / RECORD_FILE
    hint = "give a folder RUN_DIR/models/<method>/<fold k | all> written by 'stbench run --save-models'"
    if not directory.is_dir():
        raise DataError(f"model folder not found: {directory}; {hint}")
    if not path.is_file():
        raise DataError(f"{directory} holds no {RECORD_FILE}, so it is not a saved model (or its saving was "
                        f"interrupted); {hint}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); save the model again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        found = record.get("format") if isinstance(record, dict) else None
        raise DataError(f"{path} has model format {found!r}, this stbench reads format {FORMAT_VERSION}; "
                        "save the model again with this version")
    for key in ("method", "config", "genes", "normalisation", "weights", "state"):
        if key not in record:
            raise DataError(f"{path} lacks the field {key!r}; save the model again")
    return record


def check_compatible(record: dict, where: str, genes: Optional[Sequence[str]] = None,
                     normalisation: Optional[str] = None, encoder: Optional[dict] = None) -> None:
    """Refuse, in one line, a model whose gene panel, normalisation or encoder differs from the given ones
    (None: not checked). ``encoder`` is an identity as :func:`encoder_identity` gives it."""
    if genes is not None:
        saved = [str(g) for g in record["genes"]]
        given = [str(g) for g in genes]
        if saved != given:
            if len(saved) != len(given):
                what = f"{len(saved)} genes, not the {len(given)} given"
            else:
                i = next(i for i, (a, b) in enumerate(zip(saved, given)) if a != b)
                what = f"another gene panel (gene {i + 1} is {saved[i]} in the model, {given[i]} here)"
            raise ConfigError(f"model {where} predicts {what}; use a model trained on this panel")
    if normalisation is not None and record["normalisation"] != normalisation:
        raise ConfigError(f"model {where} was trained on expression normalised with {record['normalisation']}, not "
                          f"{normalisation}; use a model trained with normalisation {normalisation}")
    if encoder is not None:
        saved = record.get("encoder")
        if saved is None:
            raise ConfigError(f"model {where} uses no image encoder, but one ({encoder.get('name')}) was given")
        keys = [k for k in ("name", "weights_id", "input_size", "dim", "precision") if k in saved or k in encoder]
        differ = [k for k in keys if saved.get(k) != encoder.get(k)]
        if differ:
            raise ConfigError(
                f"model {where} was trained on features of encoder {saved.get('name')} (weights "
                f"{saved.get('weights_id')}), not {encoder.get('name')} (weights {encoder.get('weights_id')}; "
                f"{', '.join(differ)} differ); pass --encoder-weights with the checkpoint the model was trained "
                "with, or use a model trained with this encoder")


def encoder_identity(encoder, registry_name: str) -> dict:
    """What identifies an encoder's features: its description's identity fields (as the feature cache
    and run.json key them) and its registry name."""
    from stbench.run import ENCODER_IDENTITY

    out = {k: v for k, v in encoder.describe().items() if k in ENCODER_IDENTITY}
    out["registry_name"] = registry_name
    return out


def _read_arrays(path: Path, framework: str) -> dict:
    """The arrays of a safetensors file. Nothing else is accepted: a pickle (or anything but the
    safetensors format) fails to parse, and no code stored in it runs."""
    try:
        if framework == "torch":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for any bad header
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a safetensors file ({reason}); stbench loads no pickled models: "
                        "save the model again with 'stbench run --save-models'") from None


def load(directory: Path, plugins, device: str = "cpu", genes: Optional[Sequence[str]] = None,
         normalisation: Optional[str] = None, encoder: Optional[dict] = None) -> LoadedModel:
    """Rebuild the method saved in ``directory``; refuse a mismatched panel, normalisation or encoder
    (when given), a weights file whose SHA-256 differs from the record, and anything but safetensors."""
    from stbench import config as cfg
    from stbench.specs import resolve

    directory = Path(directory)
    record = read_record(directory)
    where = str(directory)
    check_compatible(record, where, genes, normalisation, encoder)
    weights = directory / record["weights"].get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise DataError(f"model weights missing: {weights}; copy the whole model folder, or save the model again")
    if file_sha256(weights) != record["weights"].get("sha256"):
        raise DataError(f"{weights} does not match the SHA-256 recorded in {directory / RECORD_FILE} (the file was "
                        "changed or damaged); copy the model folder again, or save the model again")
    arrays = _read_arrays(weights, record["weights"].get("framework", "numpy"))
    name = record["method"]
    spec = plugins.methods.get(name, f"the model in {directory}")
    config = cfg.build(spec.config, record["config"], f"{directory / RECORD_FILE}: config")
    factory = resolve(spec.factory)
    method_class = factory if isinstance(factory, type) else type(factory(config))
    if not (issubclass(method_class, Method) and method_class.supports_save()):
        raise cannot_save(name, method_class)
    method = method_class.from_state(config, FittedState(arrays, record["state"]), device)
    return LoadedModel(method, spec, config, record, directory)
