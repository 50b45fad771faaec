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
    assert row["folds"] == 4
    assert math.isnan(table.set_index("method").loc["mean", "pcc:mean"])  # undefined, not 0
    assert meta["protocol"]["split"] == "leave_one_patient_out"


@pytest.mark.parametrize("fmt,marker", [("md", "| prompt_knn"), ("csv", "prompt_knn,"), ("latex", r"\pm"), ("html", "<table")])
def test_formats(run_dir, tmp_path, capsys, fmt, marker):
    out = tmp_path / f"table.{fmt}"
    assert main(["leaderboard", str(run_dir), "--format", fmt, "--output", str(out)]) == 0
    text = out.read_text()
    assert marker in text
    assert "leave_one_patient_out" in text.splitlines()[0]  # the protocol in the header line
    if fmt != "csv":
        assert "undefined" in text


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


def test_data_check_synthetic(capsys):
    assert main(["data", "check", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "P1S1" in out and "zero-count spots" in out and "constant genes" in out
    assert "8 sections, 4 patients" in out


def test_ablation_runs_are_labelled_by_their_differing_settings(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--methods", "prompt_knn,mean", "--out", str(a), "--quiet", "--set", "methods.prompt_knn.power=2"]) == 0
    assert main(["run", "--methods", "prompt_knn", "--out", str(b), "--quiet", "--set", "methods.prompt_knn.k=3",
                 "--set", "methods.prompt_knn.power=2"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| prompt_knn " in out and "| prompt_knn (k=3)" in out and "| mean " in out
    assert "prompt_knn settings: power=2.0 (default 1.0)" in out
    assert main(["leaderboard", str(a), str(a)]) == 2  # the same settings twice is a mistake
