"""Prompt-ratio sweeps (issue 13): nested prompts, one fit per fold, every ratio scored on the same spots,
the sweep table and its picture."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from stbench.cli import main
from stbench.plugins import load_plugins
from stbench.prompts import nested, select_prompts, sweep_prompts

SMALL = ["--set", "dataset_options.spots_per_section=60", "--set", "dataset_options.n_patients=3", "--quiet"]
RATIOS = [0.05, 0.1, 0.2, 0.4]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_random_prompts_nest_and_the_largest_ratio_is_a_plain_runs():
    plugins = load_plugins(entry_points=False)
    coords = np.random.default_rng(1).uniform(0, 1000, size=(300, 2))
    sets = sweep_prompts(plugins.prompts.get("random"), coords, RATIOS, "S1", 7)
    assert [len(sets[r]) for r in RATIOS] == [15, 30, 60, 120] and nested(sets)
    np.testing.assert_array_equal(sets[0.4], select_prompts("random", coords, 0.4, "S1", 7))
    # a window strategy draws each ratio itself, and the sweep says when that does not nest
    windows = sweep_prompts(plugins.prompts.get("dense_square"), coords, RATIOS, "S1", 7)
    np.testing.assert_array_equal(windows[0.1], select_prompts("dense_square", coords, 0.1, "S1", 7))
    assert not nested(windows)
    assert nested({0.1: np.array([1, 2]), 0.2: np.array([1, 2, 3])}) and not nested({0.1: np.array([4]), 0.2: np.array([1])})


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    assert main(["run", "--methods", "prompt_knn,ridge", "--out", str(out), "--prompt-ratio", "0.05,0.1,0.2,0.4",
                 "--finetune", *SMALL]) == 0
    return out


def test_every_ratio_is_a_row_scored_on_the_spots_prompted_at_none(sweep_run):
    rows = _rows(sweep_run / "results.csv")
    prompts = json.loads((sweep_run / "prompts.json").read_text())
    assert prompts["nested"] is True and sorted(map(float, prompts["sweep"])) == RATIOS
    by_slide = {}
    for r in rows:
        by_slide.setdefault((r["method"], r["slide"]), {})[float(r["prompt_ratio"])] = r
    for (method, slide), per_ratio in by_slide.items():
        assert sorted(per_ratio) == RATIOS
        largest = len(prompts["sweep"]["0.4"][slide])
        for ratio, r in per_ratio.items():
            assert int(r["n_prompt"]) == len(prompts["sweep"][str(ratio)][slide])
            assert int(r["n_scored"]) == int(r["n_spots"]) - largest  # the same spots at every ratio
    # prompt_knn uses its prompts: more prompts, better PCC on average
    knn = {ratio: np.mean([float(r["pcc"]) for r in rows if r["method"] == "prompt_knn" and float(r["prompt_ratio"]) == ratio])
           for ratio in RATIOS}
    assert knn[0.4] > knn[0.05]
    # ridge is fine-tuned per ratio: its predictions differ between ratios
    ridge = {float(r["prompt_ratio"]): float(r["pcc"]) for r in rows if r["method"] == "ridge" and r["slide"] == rows[0]["slide"]}
    assert len(set(ridge.values())) > 1
    folds = _rows(sweep_run / "fold_results.csv")
    assert sorted(float(r["prompt_ratio"]) for r in folds if r["method"] == "ridge" and r["fold"] == "0") == RATIOS


def test_a_ratios_score_is_scipys_on_its_prediction_file(sweep_run):
    import h5py

    row = next(r for r in _rows(sweep_run / "results.csv") if r["method"] == "prompt_knn" and r["prompt_ratio"] == "0.05")
    prompts = json.loads((sweep_run / "prompts.json").read_text())
    path = sweep_run / "predictions" / "prompt_knn" / "ratio0.05" / f"{row['slide']}.h5ad"
    with h5py.File(path, "r") as f:
        pred, truth = f["X"][()], f["layers/truth"][()]
        spots = [s.decode() if isinstance(s, bytes) else s for s in f["obs"][f["obs"].attrs["_index"]][()]]
        is_prompt = f["obs/is_prompt"][()].astype(bool)
    largest = set(prompts["sweep"]["0.4"][row["slide"]])
    assert {s for s, p in zip(spots, is_prompt) if p} == set(prompts["sweep"]["0.05"][row["slide"]])
    scored = np.array([s not in largest for s in spots])
    # genes whose truth is constant are skipped; a constant prediction scores 0 (the harness's rule)
    r = [stats.pearsonr(pred[scored, g], truth[scored, g])[0] if np.ptp(pred[scored, g]) > 0 else 0.0
         for g in range(pred.shape[1]) if np.ptp(truth[scored, g]) > 0]
    assert float(row["pcc"]) == pytest.approx(np.mean(r), abs=1e-6)


def test_a_rerun_skips_every_unit(sweep_run, capsys):
    assert main(["run", "--methods", "prompt_knn,ridge", "--out", str(sweep_run), "--prompt-ratio", "0.05,0.1,0.2,0.4",
                 "--finetune", *SMALL]) == 0
    assert "6 method x fold units were already complete" in capsys.readouterr().err


def test_the_leaderboard_has_a_sweep_table_and_picture(sweep_run, tmp_path):
    from stbench.plots import read_panels

    out = tmp_path / "board.md"
    assert main(["leaderboard", str(sweep_run), "--output", str(out)]) == 0
    text = out.read_text()
    assert "| method     | PCC @ 0.05" in text and "PCC @ 0.4" in text and "prompts nested" in text
    assert "main table, at ratio 0.1" in text
    assert read_panels(tmp_path / "board.sweep.png") == ["sweep|prompt_knn", "sweep|ridge"]
    rows = _rows(sweep_run / "results.csv")
    headline = np.mean([float(r["pcc"]) for r in rows if r["method"] == "prompt_knn" and r["prompt_ratio"] == "0.1"
                        and r["fold"] == "0"])
    assert main(["leaderboard", str(sweep_run), "--format", "csv", "--output", str(tmp_path / "b.csv")]) == 0
    table = [l for l in (tmp_path / "b.csv").read_text().splitlines() if not l.startswith("#")]
    header, knn = table[0].split(","), next(l for l in table if l.startswith("prompt_knn")).split(",")
    assert "pcc@ratio0.05:mean" in header
    assert float(knn[header.index("folds")]) == 3 and np.isfinite(headline)
