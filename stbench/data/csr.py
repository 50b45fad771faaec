"""Spot × gene counts in compressed sparse row (CSR) form, usable without importing scipy.

``Section.counts`` may be any scipy sparse matrix or dense array, or a :class:`CSRCounts`: the three
numpy arrays of a CSR matrix. A reader whose cache holds those arrays (her2) returns a ``CSRCounts``
so that an everyday run, which only needs library sizes and the panel's columns, never imports
scipy (0.1 s of a 0.5 s warm command). Anything else a scipy matrix offers is still there: the first
such use builds the scipy matrix and delegates to it.

The helpers here (:func:`row_sums`, :func:`dense_columns`) read the CSR arrays of either kind with
numpy alone; :func:`as_scipy` gives the scipy matrix to code that needs one.
"""

from __future__ import annotations

import numpy as np


class CSRCounts:
    """A CSR matrix as ``data``, ``indices``, ``indptr`` and ``shape`` (scipy's names and meaning);
    methods, indexing and operators are scipy's, on a matrix built at first use."""

    format = "csr"

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int],
                 validate: bool = True):
        """``validate=False``: the caller has checked the arrays already (:func:`csr_problem`)."""
        self.data, self.indices, self.indptr = np.asarray(data), np.asarray(indices), np.asarray(indptr)
        self.shape = (int(shape[0]), int(shape[1]))
        self._scipy = None
        problem = csr_problem(self.indices, self.indptr, len(self.data), self.shape) if validate else ""
        if problem:
            raise ValueError(f"inconsistent CSR arrays: {problem}")

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def tocsr(self, copy: bool = False):
        """The scipy matrix (built once)."""
        if self._scipy is None:
            import scipy.sparse as sp

            self._scipy = sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)
        return self._scipy.copy() if copy else self._scipy

    def __getattr__(self, name):  # sum(axis=...), toarray(), multiply(), ...: scipy's own
        if name.startswith("__") or name == "_scipy":
            raise AttributeError(name)
        return getattr(self.tocsr(), name)

    def __getitem__(self, key):
        return self.tocsr()[key]

    def __repr__(self) -> str:
        return f"CSRCounts(shape={self.shape}, nnz={self.nnz})"

    def __array__(self, dtype=None, copy=None):  # np.asarray(counts), and scipy.sparse.csr_matrix(counts) through it
        dense = self.tocsr().toarray()
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def __getstate__(self):  # the scipy matrix is rebuilt on use, not sent to other processes
        return {"data": self.data, "indices": self.indices, "indptr": self.indptr, "shape": self.shape}

    def __setstate__(self, state):
        self.__dict__.update(state, _scipy=None)


def _delegate(name: str):
    def operator(self, *args):
        return getattr(self.tocsr(), name)(*(a.tocsr() if isinstance(a, CSRCounts) else a for a in args))

    operator.__name__ = name
    return operator


# Operators are looked up on the class, not through __getattr__: delegate scipy's own.
for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__radd__", "__sub__",
              "__rsub__", "__mul__", "__rmul__", "__matmul__", "__rmatmul__", "__truediv__", "__neg__", "__abs__",
              "__pow__"):
    setattr(CSRCounts, _name, _delegate(_name))
CSRCounts.__hash__ = None  # mutable, and compared by value


def csr_problem(indices: np.ndarray, indptr: np.ndarray, n_data: int, shape: tuple[int, int]) -> str:
    """What makes these CSR arrays inconsistent, or "" (checked before a cached file is trusted)."""
    n_rows, n_cols = shape
    if indptr.ndim != 1 or len(indptr) != n_rows + 1:
        return f"indptr has {len(indptr)} entries for {n_rows} rows"
    if indptr[0] != 0 or indptr[-1] != n_data or len(indices) != n_data or np.any(np.diff(indptr) < 0):
        return "indptr does not index the data"
    if n_data and (indices.min() < 0 or indices.max() >= n_cols):
        return f"a column index is outside 0..{n_cols - 1}"
    return ""


def _parts(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    if getattr(counts, "format", None) != "csr":  # dense, COO, CSC, ...: through scipy
        import scipy.sparse as sp

        counts = sp.csr_matrix(counts)
    return counts.data, counts.indices, counts.indptr, tuple(counts.shape)


def as_scipy(counts):
    """``counts`` as a scipy CSR matrix (no copy when it already is one)."""
    import scipy.sparse as sp

    if isinstance(counts, CSRCounts):
        return counts.tocsr()
    return counts if sp.isspmatrix_csr(counts) else sp.csr_matrix(counts)


def row_sums(counts) -> np.ndarray:
    """Each spot's total count (float64), e.g. its library size."""
    data, _, indptr, (n_rows, _) = _parts(counts)
    out = np.zeros(n_rows)
    filled = np.diff(indptr) > 0  # reduceat would give an empty row the next row's first value
    if filled.any():
        out[filled] = np.add.reduceat(np.asarray(data, dtype=np.float64), indptr[:-1][filled])
    return out


def dense_columns(counts, cols) -> np.ndarray:
    """The columns ``cols`` (in that order, repeats allowed) as a dense float64 (spots × len(cols))
    array; duplicate entries of a non-canonical matrix are summed, as scipy does."""
    data, indices, indptr, (n_rows, n_cols) = _parts(counts)
    cols = np.asarray(cols, dtype=np.int64)
    wanted, position = np.unique(cols, return_inverse=True)
    slot = np.full(n_cols, -1, dtype=np.int64)
    slot[wanted] = np.arange(len(wanted))
    where = slot[indices]
    kept = np.flatnonzero(where >= 0)  # entries in the wanted columns, and their rows:
    rows = np.searchsorted(indptr, kept, side="right") - 1
    flat = rows * len(wanted) + where[kept]
    out = np.bincount(flat, weights=np.asarray(data[kept], dtype=np.float64), minlength=n_rows * len(wanted))
    return out.reshape(n_rows, len(wanted))[:, position.ravel()]
