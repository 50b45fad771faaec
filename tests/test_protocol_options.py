"""The sources' protocol choices as named options (issue 13's protocol study): 3x3 target smoothing,
the highly-expressed panel, model selection on the test fold."""

import numpy as np
import pytest
import scipy.sparse as sp

from stbench.data.expression import check_smoothing, make_slide, smooth_grid3x3, top_expressed_genes
from stbench.data.model import Section
from stbench.errors import ConfigError


def _section(grid, counts, genes, name="S"):
    grid = np.asarray(grid)
    return Section(name=name, patient="P", spot_ids=np.array([f"s{i}" for i in range(len(grid))]), genes=np.array(genes),
                   counts=sp.csr_matrix(np.asarray(counts)), grid=grid, pixel=grid * 100.0, mpp=1.0)


def test_grid3x3_smoothing_is_the_mean_over_present_neighbours_by_hand():
    # an L of four spots: (0,0) (1,0) (2,0) (0,1); (2,0) and (0,1) are not within ±1 of each other
    grid = np.array([[0, 0], [1, 0], [2, 0], [0, 1]])
    expr = np.array([[1.0], [2.0], [4.0], [8.0]])
    out = smooth_grid3x3(expr, grid)
    by_hand = [(1 + 2 + 8) / 3, (1 + 2 + 4 + 8) / 4, (2 + 4) / 2, (1 + 2 + 8) / 3]
    np.testing.assert_allclose(out[:, 0], by_hand)


def test_make_slide_smooths_only_when_asked():
    s = _section([[0, 0], [1, 0], [5, 5]], [[10, 0], [0, 10], [5, 5]], ["A", "B"])
    plain = make_slide(s, ["A", "B"], "cp10k_panel_log1p")
    smoothed = make_slide(s, ["A", "B"], "cp10k_panel_log1p", smoothing="grid3x3")
    np.testing.assert_allclose(smoothed.expr[0], (plain.expr[0] + plain.expr[1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(smoothed.expr[2], plain.expr[2])  # an isolated spot keeps its value
    with pytest.raises(ConfigError, match="unknown smoothing 'gauss'"):
        check_smoothing("gauss")


def test_top_expressed_genes_by_total_count_over_the_given_sections():
    a = _section([[0, 0], [1, 0]], [[5, 1, 0, 9], [5, 1, 2, 0]], ["G1", "G2", "G3", "G4"], "a")
    b = _section([[0, 0]], [[0, 1, 7, 1]], ["G1", "G2", "G3", "G5"], "b")  # G4 not measured in b
    # totals over a and b: G1 10, G2 3, G3 9 (G4 and G5 are not in both)
    assert top_expressed_genes([a, b], 2) == ["G1", "G3"]
    assert top_expressed_genes([a], 2) == ["G1", "G4"]  # training sections only: b does not count
    with pytest.raises(ConfigError, match="panel.top_expressed asks for 4 genes but only 3"):
        top_expressed_genes([a, b], 4)


def test_selection_on_the_test_fold_selects_on_it_but_never_fits_on_it(tmp_path):
    """Under selection=test_fold the validation slides are the test slides: the refit rule (fit the final
    model on train + val) must then leave them out, or the leak would be training on the test slides."""
    import csv

    from stbench.cli import main

    small = ["--set", "dataset_options.spots_per_section=40", "--set", "dataset_options.n_patients=3", "--quiet"]
    for name, extra in (("leaky", ["--set", "selection=test_fold"]), ("plain", ["--set", "split_params.inner_val=false"])):
        assert main(["run", "--methods", "mean", "--out", str(tmp_path / name), *small, *extra]) == 0
    rows = {}
    for name in ("leaky", "plain"):
        with open(tmp_path / name / "results.csv", newline="") as fh:
            rows[name] = {(r["method"], r["slide"]): r for r in csv.DictReader(fh)}
    # mean: the same training slides in both runs (no inner validation in "plain"), so the same predictions
    for key, r in rows["leaky"].items():
        if key[0] == "mean":
            assert float(r["mae"]) == pytest.approx(float(rows["plain"][key]["mae"]), abs=1e-9)


def test_ridge_refits_without_the_validation_slides_when_they_are_the_test_fold():
    from stbench.data.model import Slide
    from stbench.method import FitContext
    from stbench_plugins.ridge import RidgeConfig
    from stbench_plugins.ridge.model import Ridge

    rng = np.random.default_rng(0)

    def slide(name, n):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        s = Slide(name=name, patient=name, spot_ids=np.arange(n).astype(str), genes=np.array(["a", "b"]),
                  expr=(x[:, :2] + rng.normal(size=(n, 2))).astype(np.float32), grid=np.zeros((n, 2)),
                  pixel=np.zeros((n, 2)), mpp=1.0)
        s.features = {"spot": x, "spot_mask": np.ones(n, dtype=bool)}
        return s

    train, val = [slide("t1", 30), slide("t2", 30)], [slide("v", 20)]
    for val_is_test, rows in ((False, 80), (True, 60)):
        model = Ridge(RidgeConfig())
        model.fit(train, val, FitContext(seed=0, genes=np.array(["a", "b"]), val_is_test=val_is_test))
        assert model.train_x_.shape[0] == rows


def test_a_protocol_study_labels_rows_by_how_their_protocol_differs(tmp_path, capsys):
    from stbench.cli import main

    small = ["--set", "dataset_options.spots_per_section=40", "--set", "dataset_options.n_patients=3", "--quiet"]
    runs = {"honest": [], "smooth": ["--set", "smoothing=grid3x3"], "cp10k": ["--set", "normalisation=cp10k_panel_log1p"]}
    for name, extra in runs.items():
        assert main(["run", "--methods", "mean,prompt_knn", "--out", str(tmp_path / name), *small, *extra]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--study", *(str(tmp_path / n) for n in runs), "--output", str(tmp_path / "study.md")]) == 0
    text = (tmp_path / "study.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| prompt_knn")]
    assert len(rows) == 3
    assert "reference protocol" in rows[0] and "LEAKY" not in rows[0]
    assert "smoothing=grid3x3" in rows[1] and "LEAKY" in rows[1]
    assert "normalisation=cp10k_panel_log1p" in rows[2] and "LEAKY" not in rows[2]
    assert "never as a ranking" in text and "LEAKY rows: targets smoothed" in text
    # a plain leaderboard refuses to mix protocols
    assert main(["leaderboard", str(tmp_path / "honest"), str(tmp_path / "smooth")]) == 2
    assert "different protocols" in capsys.readouterr().err
