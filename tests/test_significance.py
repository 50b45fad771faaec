"""Paired comparisons between leaderboard rows (stbench/significance.py), tested against SciPy and by hand."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from stbench import significance as sig
from stbench.cli import main
from stbench.leaderboard import render, summary_rows
from stbench.plugins import load_plugins


def test_the_p_value_is_scipys_exact_two_sided_wilcoxon():
    a = {k: v for k, v in enumerate([0.31, 0.22, 0.45, 0.18, 0.36, 0.29, 0.40])}
    b = {k: v for k, v in enumerate([0.20, 0.25, 0.30, 0.11, 0.30, 0.31, 0.21])}
    c = sig.compare(a, b)
    diff = np.array([a[k] - b[k] for k in range(7)])
    assert c.n == 7 and c.mean_diff == pytest.approx(diff.mean())
    assert c.p == pytest.approx(stats.wilcoxon(diff, method="exact").pvalue)
    assert c.p == pytest.approx(stats.wilcoxon([a[k] for k in range(7)], [b[k] for k in range(7)]).pvalue)


def test_the_interval_is_a_percentile_bootstrap_of_the_mean_difference():
    rng = np.random.default_rng(3)
    diff = rng.normal(0.05, 0.1, size=12)
    c = sig.compare(dict(enumerate(diff)), dict(enumerate(np.zeros(12))))
    # an independent percentile bootstrap with numpy: resample slides, take the 2.5th and 97.5th percentiles
    boot = diff[np.random.default_rng(11).integers(0, 12, size=(20_000, 12))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    assert c.ci_low == pytest.approx(low, abs=0.006) and c.ci_high == pytest.approx(high, abs=0.006)
    assert c.ci_low < diff.mean() < c.ci_high


def test_only_slides_where_both_rows_are_defined_are_paired():
    a = {"s1": 0.5, "s2": math.nan, "s3": 0.4, "s4": 0.3, "only_a": 0.9}
    b = {"s1": 0.1, "s2": 0.2, "s3": 0.2, "s4": 0.2}
    c = sig.compare(a, b)
    assert c.n == 3 and c.mean_diff == pytest.approx((0.4 + 0.2 + 0.1) / 3)
    assert sig.compare({"s1": 0.5}, {"s1": 0.1}) is None  # one pair: nothing to test


def test_the_smallest_p_with_five_slides_is_0_0625_and_scipy_agrees():
    assert sig.smallest_p(5) == 0.0625 and not sig.can_reach(5) and sig.can_reach(6)
    assert stats.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5]).pvalue == pytest.approx(sig.smallest_p(5))


def _run(root, pcc_by_method, n_folds):
    """A run directory written by hand: per-method per-slide PCC, slides spread over folds."""
    import csv

    root.mkdir(parents=True)
    fields = ["method", "fold", "slide", "patient", "n_spots", "n_prompt", "n_scored", "pcc", "pcc_skipped", "mae"]
    with open(root / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        for m, values in pcc_by_method.items():
            for i, v in enumerate(values):
                w.writerow({"method": m, "fold": i % n_folds, "slide": f"s{i}", "patient": f"p{i % n_folds}",
                            "n_spots": 10, "n_prompt": 1, "n_scored": 9, "pcc": v, "pcc_skipped": 0, "mae": 1.0})
    with open(root / "fold_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["method", "fold", "pcc_pooled"])
        w.writeheader()
        for m in pcc_by_method:
            for f in range(n_folds):
                w.writerow({"method": m, "fold": f, "pcc_pooled": 0.5})
    (root / "run.json").write_text(json.dumps({"protocol": {"benchmark": "hand", "split": "x"},
                                               "methods": {m: {} for m in pcc_by_method}, "folds": list(range(n_folds))}))
    return root


def test_rows_close_to_the_best_are_marked_and_distant_ones_are_not(tmp_path):
    best = [0.50, 0.42, 0.61, 0.38, 0.55, 0.47, 0.52, 0.44]
    close = [0.49, 0.44, 0.60, 0.37, 0.56, 0.45, 0.53, 0.43]  # differences of both signs
    far = [v - 0.2 for v in best]
    rows, meta = summary_rows([_run(tmp_path / "r", {"best": best, "close": close, "far": far}, 4)])
    text = render(rows, meta, load_plugins(entry_points=False), "md", significance={"metric": "pcc", "baseline": "far"})
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    p_far = stats.wilcoxon(np.array(far) - np.array(best)).pvalue
    assert f"p={p_far:.3g}" in lines["far"] and "≈" not in lines["far"] and "n=8" in lines["far"]
    assert "≈" in lines["close"] and "(best)" in lines["best"] and "(baseline)" in lines["far"]
    assert "+0.200 [+0.200, +0.200]" in lines["best"]  # best − baseline, a constant difference
    assert "≈ marks rows not distinguishable" in text and "best = best, baseline = far" in text


def test_with_five_slides_nothing_is_marked_and_the_table_says_why(tmp_path):
    best = [0.5, 0.4, 0.6, 0.3, 0.55]
    worse = [v - 0.1 for v in best]
    rows, meta = summary_rows([_run(tmp_path / "r", {"best": best, "worse": worse}, 5)])
    out = tmp_path / "t.csv"
    assert main(["leaderboard", str(tmp_path / "r"), "--format", "csv", "--output", str(out)]) == 0
    text = render(rows, meta, load_plugins(entry_points=False), "md", significance={"metric": "pcc"})
    assert "≈" not in text.split("Paired comparison")[0].split("| worse")[1]
    assert "With 5 paired slides the smallest two-sided exact p is 0.0625 > 0.05: no row can be shown" in text
    csv_text = render(rows, meta, load_plugins(entry_points=False), "csv", significance={"metric": "pcc"})
    assert "vs_best:p" in csv_text.splitlines()[-3] and "0.0625" in csv_text.splitlines()[-1]


def test_an_unknown_baseline_is_one_line_naming_the_rows(tmp_path):
    from stbench.errors import ConfigError

    rows, meta = summary_rows([_run(tmp_path / "r", {"a": [0.1, 0.2, 0.3], "b": [0.2, 0.2, 0.1]}, 3)])
    with pytest.raises(ConfigError, match="--baseline 'c' is not a row of this leaderboard; choose one of a, b"):
        render(rows, meta, load_plugins(entry_points=False), "md", significance={"metric": "pcc", "baseline": "c"})


def test_the_leaderboard_command_compares_in_files_and_with_a_baseline(tmp_path, capsys):
    run = _run(tmp_path / "r", {"a": [0.5, 0.4, 0.6, 0.3, 0.55, 0.45], "b": [0.4, 0.3, 0.5, 0.2, 0.45, 0.35]}, 3)
    out = tmp_path / "t.md"
    assert main(["leaderboard", str(run), "--output", str(out), "--baseline", "b"]) == 0
    text = out.read_text()
    assert "vs baseline" in text and "best = a, baseline = b" in text and "(baseline)" in text
    assert main(["leaderboard", str(run)]) == 0  # the terminal table stays compact: no comparisons
    assert "Paired comparison" not in capsys.readouterr().out
    assert main(["leaderboard", str(run), "--baseline", "zzz"]) == 2
    assert "--baseline 'zzz' is not a row" in capsys.readouterr().err
