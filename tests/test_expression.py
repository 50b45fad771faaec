"""Normalisation and gene panels (METHODS.md §1.3-1.4)."""

import numpy as np
import pytest
import scipy.sparse as sp

from stbench.data.expression import highly_variable_genes, make_slide, read_panel_file
from stbench.data.model import Section
from stbench.errors import ConfigError, DataError


def _section(counts, genes, name="S1", patient="P"):
    n = counts.shape[0]
    return Section(name=name, patient=patient, spot_ids=np.array([f"{i}x0" for i in range(n)]), genes=np.array(genes),
                   counts=sp.csr_matrix(counts), grid=np.c_[np.arange(n), np.zeros(n)].astype(int),
                   pixel=np.c_[np.arange(n) * 10.0, np.zeros(n)], mpp=1.0)


def test_cpm_over_all_genes_then_ln1p_with_zero_spot_guard():
    counts = np.array([[1, 3, 6], [0, 0, 0], [5, 0, 5]])
    s = make_slide(_section(counts, ["a", "b", "c"]), ["c", "a"], "cpm_log1p")
    expected = np.log1p(np.array([[6 / 10, 1 / 10], [0, 0], [5 / 10, 5 / 10]]) * 1e6)
    np.testing.assert_allclose(s.expr, expected, rtol=1e-6)
    assert np.isfinite(s.expr).all() and list(s.genes) == ["c", "a"]


def test_other_normalisations():
    counts = np.array([[1, 3, 6], [2, 2, 0]])
    sec = _section(counts, ["a", "b", "c"])
    p = make_slide(sec, ["a", "b"], "cp10k_panel_log1p").expr
    np.testing.assert_allclose(p, np.log1p(np.array([[1 / 4, 3 / 4], [2 / 4, 2 / 4]]) * 1e4), rtol=1e-6)
    r = make_slide(sec, ["a", "c"], "log2_raw").expr
    np.testing.assert_allclose(r, np.log2(1 + np.array([[1, 6], [2, 0]])), rtol=1e-6)
    with pytest.raises(ConfigError, match="unknown normalisation"):
        make_slide(sec, ["a"], "tpm")


def test_panel_gene_absent_is_a_data_error():
    with pytest.raises(DataError, match="absent from section S1.*ERBB2"):
        make_slide(_section(np.ones((2, 2)), ["a", "b"]), ["a", "ERBB2"], "cpm_log1p")


def test_hvg_uses_only_the_given_sections():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(400)]
    means = rng.uniform(2, 60, size=400)
    train = []
    for k in range(2):
        c = rng.poisson(means, size=(200, 400))
        c[:, 3] = rng.poisson(20, 200) * rng.integers(0, 2, 200) * 5  # g3 highly variable in training
        train.append(_section(c, genes, name=f"T{k}"))
    test = rng.poisson(means, size=(200, 400))
    test[:, 7] = rng.poisson(20, 200) * rng.integers(0, 2, 200) * 8  # g7 variable only in the test section
    chosen = highly_variable_genes(train, 3)
    assert "g3" in chosen and "g7" not in chosen
    assert "g7" in highly_variable_genes(train + [_section(test, genes, name="X")] * 3, 3)


def test_panel_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nA\nB\n\nC\n")
    assert read_panel_file(f) == ["A", "B", "C"]
    np.save(tmp_path / "p.npy", np.array(["X", "Y"], dtype=object), allow_pickle=True)
    assert read_panel_file(tmp_path / "p.npy") == ["X", "Y"]
    f.write_text("A\nA\n")
    with pytest.raises(ConfigError, match="twice"):
        read_panel_file(f)
    with pytest.raises(ConfigError, match="not found"):
        read_panel_file(tmp_path / "missing.txt")


def test_shipped_her2_panel_matches_the_published_file():
    from stbench.benchmark import find
    from conftest import REPO

    shipped = read_panel_file(find("her2").parent / "her2st_785.txt")
    published = REPO.parent / "shared" / "data" / "gene-panels" / "her2st_785.npy"
    assert len(shipped) == 785 and "ERBB2" not in shipped
    if published.exists():
        assert shipped == read_panel_file(published)


def test_hvg_candidates_restrict_the_choice():
    rng = np.random.default_rng(1)
    genes = [f"g{i}" for i in range(100)]
    c = rng.poisson(rng.uniform(2, 50, 100), size=(150, 100))
    c[:, 0] = rng.poisson(30, 150) * rng.integers(0, 2, 150) * 6
    train = [_section(c, genes)]
    assert "g0" in highly_variable_genes(train, 5)
    assert "g0" not in highly_variable_genes(train, 5, candidates=set(genes[1:]))
