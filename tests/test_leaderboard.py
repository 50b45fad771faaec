"""Leaderboards from run directories, listings, and the data QC summary."""

import math

import pandas as pd
import pytest

from stbench.cli import main
from stbench.leaderboard import summarise


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lb") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
        assert main(["run", "--methods", "mean,prompt_knn", "--out", str(out), "--quiet"]) == 0
    return out


def test_summary_is_mean_and_std_over_folds_of_slide_means(run_dir):
    table, meta = summarise([run_dir])
    res = pd.read_csv(run_dir / "results.csv")
    knn = res[res["method"] == "prompt_knn"].groupby("fold")["pcc"].mean()
    row = table.set_index("method").loc["prompt_knn"]
    assert row["pcc:mean"] == pytest.approx(knn.mean())
    assert row["pcc:std"] == pytest.approx(knn.std(ddof=1))
    assert row["folds"] == 4 and row["slides"] == 8 and row["pcc:slides"] == 8 and row["missing"] == 0
    mean_row = table.set_index("method").loc["mean"]
    assert math.isnan(mean_row["pcc:mean"]) and mean_row["pcc:folds"] == 0  # undefined by design, not 0
    assert mean_row["missing"] == 0 and mean_row["mae:slides"] == 8
    assert meta["protocol"]["split"] == "leave_one_patient_out"


@pytest.mark.parametrize("fmt,marker", [("md", "| prompt_knn"), ("csv", "prompt_knn,"), ("latex", r"\pm"), ("html", "<table")])
def test_formats(run_dir, tmp_path, capsys, fmt, marker):
    out = tmp_path / f"table.{fmt}"
    assert main(["leaderboard", str(run_dir), "--format", fmt, "--output", str(out)]) == 0
    text = out.read_text()
    assert marker in text
    header = text.split("<p>", 1)[1] if fmt == "html" else text.splitlines()[0]
    assert "leave_one_patient_out" in header.splitlines()[0]  # the protocol in the header line
    if fmt != "csv":
        assert "undefined" in text
    if fmt == "html":  # a complete page that declares its encoding, not a fragment
        assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text and text.rstrip().endswith("</html>")


def test_markdown_has_direction_markers_and_protocol(run_dir, capsys):
    assert main(["leaderboard", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "PCC ↑" in out and "MAE ↓" in out and "prompts 0.1 random" in out and "± " in out


def test_leaderboard_errors(tmp_path, run_dir, capsys):
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "not a finished stbench run directory" in capsys.readouterr().err
    assert main(["leaderboard", str(run_dir), "--format", "pdf"]) == 2
    assert "unknown leaderboard format" in capsys.readouterr().err


def test_list_shows_every_kind_with_provenance(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("methods (", "datasets (", "splits (", "metrics (", "prompts (", "encoders (", "prompt_knn", "poisson_disc", "stbench 0.1.0"):
        assert word in out
    assert main(["list", "metrics"]) == 0
    out = capsys.readouterr().out
    assert "pcc_pooled" in out and "methods (" not in out


def test_data_check_synthetic(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default picture folder is relative: keep it out of the working tree
    assert main(["data", "check", "synthetic", "--out", str(tmp_path / "qc")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "P1S1" in out and "zero-count spots" in out and "constant genes" in out
    assert "8 sections, 4 patients" in out
    assert "data check: section P1S1 (1/8)" in captured.err and "(8/8)" in captured.err  # progress
    assert sorted(p.name for p in (tmp_path / "qc").glob("*.png"))[:1] == ["P1S1.png"]


def test_ablation_runs_are_labelled_by_their_differing_settings(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--methods", "prompt_knn,mean", "--out", str(a), "--quiet", "--set", "methods.prompt_knn.power=2"]) == 0
    assert main(["run", "--methods", "prompt_knn", "--out", str(b), "--quiet", "--set", "methods.prompt_knn.k=3",
                 "--set", "methods.prompt_knn.power=2"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| prompt_knn " in out and "| prompt_knn (k=3)" in out and "| mean " in out
    assert "prompt_knn settings (other rows: as labelled): power=2.0 (default 1.0)" in out
    assert main(["leaderboard", str(a), str(a)]) == 2  # the same settings twice is a mistake


def _write_run(root, slide_pcc, fold_of, mae=1.0):
    """A run directory written by hand: one method, per-slide PCC values (NaN = undefined slide)."""
    import json

    root.mkdir(parents=True)
    rows = [{"method": "m", "fold": fold_of[i], "slide": f"s{i}", "patient": f"p{fold_of[i]}", "n_spots": 10,
             "n_prompt": 1, "n_scored": 9, "pcc": v, "pcc_skipped": 0, "mae": mae} for i, v in enumerate(slide_pcc)]
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    folds = sorted(set(fold_of))
    pd.DataFrame([{"method": "m", "fold": f, "pcc_pooled": 0.5} for f in folds]).to_csv(root / "fold_results.csv", index=False)
    (root / "run.json").write_text(json.dumps({"protocol": {"benchmark": "hand", "split": "x", "caveats": ["made by hand"]},
                                               "methods": {"m": {}}, "folds": folds}))
    (root / "versions.json").write_text(json.dumps({"stbench": "0"}))
    return root


def test_a_nan_slide_is_left_out_counted_and_flagged(tmp_path):
    # fold 0: slides 0.2, NaN, 0.4 -> 0.3 over 2 slides; fold 1: 0.6 -> 0.6; fold 2: NaN only -> no fold
    pcc = [0.2, float("nan"), 0.4, 0.6, float("nan")]
    fold_of = [0, 0, 0, 1, 2]
    run = _write_run(tmp_path / "r", pcc, fold_of)
    table, meta = summarise([run])
    row = table.iloc[0]
    fold_means = [0.3, 0.6]  # by hand, not by the code's groupby
    assert row["pcc:mean"] == pytest.approx(sum(fold_means) / 2)
    assert row["pcc:std"] == pytest.approx(((0.3 - 0.45) ** 2 + (0.6 - 0.45) ** 2) ** 0.5)
    assert (row["folds"], row["slides"], row["pcc:folds"], row["pcc:slides"]) == (3, 5, 2, 3)
    assert row["missing"] == 1 and row["mae:slides"] == 5
    from stbench.leaderboard import render
    from stbench.plugins import load_plugins

    text = render(table, meta, load_plugins(entry_points=False), "md")
    assert "m ⚠" in text and "[3/5 slides]" in text and "fewer slides or folds" in text
    assert "Caveat: made by hand." in text.splitlines()[0]


def test_dodging_bad_slides_with_constants_does_not_raise_the_headline(tmp_path):
    """A method that returns a constant on the slides it would score badly on gets 0 there, so its
    headline is what those slides would give at 0 (issue 7: 0.379 vs 0.328 before the fix)."""
    from dataclasses import dataclass

    from stbench.benchmark import resolve_config
    from stbench.method import Method
    from stbench.plugins import load_plugins
    from stbench.run import execute, resolve_plan
    from stbench.specs import MethodSpec
    from stbench_plugins.prompt_knn import PromptKnnConfig
    from stbench_plugins.prompt_knn.model import PromptKnn

    honest = tmp_path / "honest"
    assert main(["run", "--methods", "prompt_knn", "--out", str(honest), "--quiet"]) == 0
    res = pd.read_csv(honest / "results.csv")
    worst = set(res.nsmallest(4, "pcc")["slide"])

    @dataclass
    class Cfg:
        pass

    class Dodger(Method):
        def __init__(self, config):
            self.inner = PromptKnn(PromptKnnConfig())

        def fit(self, train, val, context):
            self.inner.fit(train, val, context)

        def predict(self, slide):
            pred = self.inner.predict(slide)
            return pred.mean(0, keepdims=True).repeat(len(pred), 0) if slide.name in worst else pred

    p = load_plugins(entry_points=False)
    p.methods.add(MethodSpec("dodger", Dodger, Cfg), "dodger-plugin", "test")
    conf, base = resolve_config("synthetic")
    execute(resolve_plan(conf, ["dodger"], tmp_path / "dodge", p, base), verbose=False)
    dodged = pd.read_csv(tmp_path / "dodge" / "results.csv").set_index("slide")
    assert (dodged.loc[sorted(worst), "pcc"] == 0.0).all()
    assert (dodged.loc[sorted(worst), "pcc_pred_constant"] > 0).all()
    table, _ = summarise([tmp_path / "dodge"])
    at_zero = res.assign(pcc=[0.0 if s in worst else v for s, v in zip(res["slide"], res["pcc"])])
    expected = at_zero.groupby("fold")["pcc"].mean().mean()
    assert table.iloc[0]["pcc:mean"] == pytest.approx(expected)
    assert table.iloc[0]["pcc:slides"] == len(res)  # no slide dropped out


def test_the_terminal_table_is_compact_and_files_have_every_column(run_dir, tmp_path, capsys):
    assert main(["leaderboard", str(run_dir)]) == 0
    out = capsys.readouterr().out
    table_lines = [line for line in out.splitlines() if line.startswith("|")]
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "PCC ↑" in table_lines[0] and "RVD" not in table_lines[0]
    assert main(["leaderboard", str(run_dir), "--output", str(tmp_path / "t.md")]) == 0
    assert "RVD ↓" in (tmp_path / "t.md").read_text()


def test_list_and_plugins_fit_120_columns(capsys):
    for argv in (["list"], ["plugins"]):
        assert main(argv) == 0
        assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 120


def test_benchmark_caveats_are_printed_in_the_header(tmp_path, capsys):
    from stbench.benchmark import resolve_config

    conf, _ = resolve_config("her2")  # the published panel's caveat lives in the benchmark definition
    assert any("selected with data of the test sections" in c for c in conf.caveats)
    out = tmp_path / "r"
    assert main(["run", "--methods", "mean", "--out", str(out), "--quiet", "--set", "caveats=[panel chosen on test data]"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--format", "csv"]) == 0
    assert "Caveat: panel chosen on test data." in capsys.readouterr().out.splitlines()[0]


def test_the_footer_gives_the_reference_rows_settings_even_where_other_rows_differ(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--methods", "prompt_knn", "--out", str(a), "--quiet", "--set", "methods.prompt_knn.k=4"]) == 0
    assert main(["run", "--methods", "prompt_knn", "--out", str(b), "--quiet", "--set", "methods.prompt_knn.k=3"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # the first row's k=4 is not shared by the second row, yet the reader must learn it
    assert "prompt_knn settings (other rows: as labelled): k=4 (default 8)" in out and "| prompt_knn (k=3)" in out
