"""Counts in CSR form without scipy (stbench.data.csr): the helpers agree with scipy on every input
kind, a CSRCounts behaves as a scipy matrix wherever one is used, and a warm her2 run imports
neither scipy nor pandas."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import write_her2_layout
from stbench.cli import main
from stbench.data.csr import CSRCounts, as_scipy, dense_columns, row_sums
from stbench.data.expression import NORMALISATIONS


def _matrix(seed=0, rows=40, cols=30):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.7, size=(rows, cols)) * (rng.random((rows, cols)) < 0.4)
    dense[3] = 0  # an empty row: reduceat-style sums get these wrong
    dense[-1] = 0  # and the last one
    return dense


def _csrcounts(dense):
    m = sp.csr_matrix(dense)
    return CSRCounts(m.data, m.indices, m.indptr, m.shape)


@pytest.mark.parametrize("kind", ["csrcounts", "scipy_csr", "scipy_coo", "dense"])
def test_helpers_match_scipy_on_every_input_kind(kind):
    dense = _matrix()
    counts = {"csrcounts": _csrcounts(dense), "scipy_csr": sp.csr_matrix(dense), "scipy_coo": sp.coo_matrix(dense),
              "dense": dense}[kind]
    cols = [7, 2, 2, 29, 0, 15]  # out of order and repeated
    assert np.array_equal(dense_columns(counts, cols), dense[:, cols].astype(float))
    assert np.array_equal(row_sums(counts), dense.sum(axis=1).astype(float))
    assert row_sums(counts).dtype == dense_columns(counts, cols).dtype == np.float64


def test_duplicate_entries_are_summed_as_scipy_does():
    # a non-canonical CSR: row 0 holds column 1 twice
    data, indices, indptr = np.array([2, 3, 5]), np.array([1, 1, 0]), np.array([0, 2, 3])
    counts = CSRCounts(data, indices, indptr, (2, 2))
    expected = sp.csr_matrix((data, indices, indptr), shape=(2, 2)).toarray()
    assert np.array_equal(dense_columns(counts, [0, 1]), expected) and expected[0, 1] == 5
    assert np.array_equal(row_sums(counts), [5.0, 5.0])


def test_csrcounts_behaves_as_a_scipy_matrix_on_use():
    dense = _matrix(1)
    counts = _csrcounts(dense)
    assert counts.shape == dense.shape and counts.nnz == np.count_nonzero(dense)
    assert np.array_equal(np.asarray(counts.sum(axis=1)).ravel(), dense.sum(axis=1))  # delegated
    assert np.array_equal(counts[:, [4, 1]].toarray(), dense[:, [4, 1]])  # indexing
    assert as_scipy(counts) is counts.tocsr() and sp.isspmatrix_csr(as_scipy(counts))
    assert (counts != _csrcounts(dense)).nnz == 0 and (counts != sp.csr_matrix(dense)).nnz == 0  # operators
    assert np.array_equal((counts @ np.ones(dense.shape[1])), dense.sum(axis=1))
    assert np.array_equal((counts * 2).toarray(), dense * 2)
    assert np.array_equal(np.asarray(counts), dense)  # code that wraps counts itself keeps working
    assert np.array_equal(sp.csr_matrix(counts).toarray(), dense)
    back = pickle.loads(pickle.dumps(counts))  # --jobs and Ray send sections to other processes
    assert np.array_equal(back.toarray(), dense)


def test_inconsistent_arrays_are_refused():
    with pytest.raises(ValueError, match="indptr"):
        CSRCounts(np.ones(3), np.zeros(3, int), np.array([0, 1]), (3, 2))  # 2 pointers for 3 rows
    with pytest.raises(ValueError, match="column index"):
        CSRCounts(np.ones(1), np.array([5]), np.array([0, 1]), (1, 2))


@pytest.mark.parametrize("name", sorted(NORMALISATIONS))
def test_normalisations_are_unchanged_by_the_numpy_path(name):
    """The numpy path gives what scipy gave, bit for bit (the normalisations before stbench.data.csr)."""
    dense = _matrix(2)
    cols = np.array([5, 9, 1, 22])
    m = sp.csr_matrix(dense)
    if name == "cpm_log1p":
        lib = np.asarray(m.sum(axis=1)).ravel().astype(float)
        scale = np.divide(1e6, lib, out=np.zeros_like(lib), where=lib > 0)
        expected = np.log1p(np.asarray(m[:, cols].multiply(scale[:, None]).todense()))
    elif name == "cp10k_panel_log1p":
        panel = m[:, cols]
        lib = np.asarray(panel.sum(axis=1)).ravel().astype(float)
        scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
        expected = np.log1p(np.asarray(panel.multiply(scale[:, None]).todense()))
    else:
        expected = np.log2(1.0 + m[:, cols].toarray())
    got = NORMALISATIONS[name](_csrcounts(dense), cols)
    assert np.array_equal(got, expected)


def test_a_warm_her2_run_imports_neither_scipy_nor_pandas(tmp_path):
    """Issue 7: a run over cached sections needs neither library (0.1 s and 0.3 s of imports)."""
    layout = write_her2_layout(tmp_path / "her2st")
    panel = tmp_path / "panel.txt"
    panel.write_text("G1\nG2\nG3\n")
    argv = ["run", "--methods", "mean", "--dataset", "her2", "--data-dir", str(layout), "--quiet",
            "--set", f"panel.file={panel}"]
    assert main([*argv, "--out", str(tmp_path / "cold")]) == 0  # parses, fills the cache
    code = ("import json, sys; from stbench.cli import main; code = main(json.loads(sys.argv[1])); "
            "print(json.dumps([code, sorted(m for m in ('scipy', 'pandas', 'anndata') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([*argv, "--out", str(tmp_path / "warm")])],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, []]
