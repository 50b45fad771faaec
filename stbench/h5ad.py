"""Writing predictions as AnnData ``.h5ad`` files with h5py alone.

Every run writes one ``.h5ad`` per method and test slide. Importing :mod:`anndata` (and pandas with it)
costs more than the rest of a warm ``stbench run`` together, so the harness writes the few element
types it needs directly, following the AnnData on-disk specification (anndata.readthedocs.io, "On-disk
format"): dense arrays, data frames of numeric, boolean and string columns, and dicts of scalars.
``anndata.read_h5ad`` reads the files back (tests check every element), and nothing here is needed to
read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _attrs(node, kind: str, version: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = version


def _strings(group, name: str, values) -> None:
    import h5py

    dtype = h5py.string_dtype(encoding="utf-8")
    _attrs(group.create_dataset(name, data=np.asarray(values, dtype=object).astype(str).astype(object), dtype=dtype),
           "string-array", "0.2.0")


def _array(group, name: str, values) -> None:
    _attrs(group.create_dataset(name, data=np.asarray(values)), "array", "0.2.0")


def _column(group, name: str, values) -> None:
    values = np.asarray(values)
    if values.dtype.kind in "USO":
        _strings(group, name, values)
    elif values.dtype.kind in "biuf":
        _array(group, name, values)
    else:
        raise TypeError(f"column {name!r}: unsupported dtype {values.dtype}")


def _dataframe(parent, name: str, index_name: str, index, columns: Mapping[str, Any]) -> None:
    import h5py

    group = parent.create_group(name)
    _attrs(group, "dataframe", "0.2.0")
    group.attrs["_index"] = index_name
    group.attrs.create("column-order", np.array(list(columns), dtype=object), dtype=h5py.string_dtype())
    _strings(group, index_name, index)
    for col, values in columns.items():
        _column(group, col, values)


def _dict(parent, name: str, items: Mapping[str, Any]) -> None:
    import h5py

    group = parent.create_group(name)
    _attrs(group, "dict", "0.1.0")
    for key, value in items.items():
        if isinstance(value, Mapping):
            _dict(group, key, value)
        elif isinstance(value, str):
            _attrs(group.create_dataset(key, data=value, dtype=h5py.string_dtype()), "string", "0.2.0")
        elif isinstance(value, (bool, int, float, np.number, np.bool_)):
            _attrs(group.create_dataset(key, data=value), "numeric-scalar", "0.2.0")
        elif value is None:  # AnnData has no null: leave the key out
            continue
        elif np.asarray(value).dtype.kind in "USO":  # e.g. a list of section names
            _strings(group, key, value)
        else:
            _array(group, key, value)


def write_h5ad(path: Path, X: np.ndarray, obs_index, obs: Mapping[str, Any], var_index,
               layers: Mapping[str, np.ndarray] = (), obsm: Mapping[str, np.ndarray] = (),
               uns: Mapping[str, Any] = (), obs_index_name: str = "_index", var_index_name: str = "_index") -> None:
    """Write an AnnData file: dense ``X`` (n_obs × n_var), ``obs`` columns, ``var`` index, dense
    ``layers`` and ``obsm``, and ``uns`` (nested dicts of strings, numbers, and arrays or lists of
    numbers or strings; None values are left out)."""
    import h5py

    X = np.asarray(X)
    if X.shape != (len(obs_index), len(var_index)):
        raise ValueError(f"X has shape {X.shape}, expected ({len(obs_index)}, {len(var_index)})")
    with h5py.File(path, "w") as f:
        _attrs(f, "anndata", "0.1.0")
        _array(f, "X", X)
        _dataframe(f, "obs", obs_index_name, obs_index, obs)
        _dataframe(f, "var", var_index_name, var_index, {})
        _dict(f, "layers", dict(layers))
        _dict(f, "obsm", dict(obsm))
        for empty in ("varm", "obsp", "varp"):
            _dict(f, empty, {})
        _dict(f, "uns", dict(uns))
