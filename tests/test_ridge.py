"""The ridge baseline on image features, encoders chosen on the command line, and the feature cache in runs."""

import json

import numpy as np
import pandas as pd
import pytest

from stbench.cli import main
from stbench.plugins import load_plugins

SMALL = ["--set", "dataset_options.spots_per_section=120"]
TINY = ["--set", "dataset_options.spots_per_section=30", "--set", "dataset_options.n_patients=3"]


def test_ridge_learns_from_images_and_reuses_cached_features(tmp_path, capsys):
    assert main(["run", "--methods", "ridge,mean", "--out", str(tmp_path / "a"), *SMALL]) == 0
    first = capsys.readouterr().err
    assert "extracting spot features of section P1S1 with encoder hefeat" in first
    res = pd.read_csv(tmp_path / "a" / "results.csv")
    ridge = res[res["method"] == "ridge"]
    assert ridge["pcc"].mean() > 0.2  # the synthetic images carry expression signal
    mse = res.groupby("method")["mse"].mean()
    assert mse["ridge"] < mse["mean"]
    folds = pd.read_csv(tmp_path / "a" / "fold_results.csv")
    alphas = [json.loads(s)["alpha"] for s in folds.loc[folds["method"] == "ridge", "fit_summary"]]
    assert all(a in (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0) for a in alphas)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["encoder"]["name"] == "hefeat" and run["protocol"]["images"]["spot_um"] == 112.0

    # a second run (another directory) reads every section's features from the cache
    assert main(["run", "--methods", "ridge", "--out", str(tmp_path / "b"), *SMALL]) == 0
    assert "extracting" not in capsys.readouterr().err
    again = pd.read_csv(tmp_path / "b" / "results.csv")
    np.testing.assert_allclose(again["pcc"], ridge["pcc"].to_numpy())


def test_ridge_fine_tuning_on_prompts_refits_with_them(tmp_path):
    assert main(["run", "--methods", "ridge", "--out", str(tmp_path / "plain"), "--quiet", *TINY]) == 0
    assert main(["run", "--methods", "ridge", "--out", str(tmp_path / "ft"), "--quiet", "--finetune", *TINY]) == 0
    plain = pd.read_csv(tmp_path / "plain" / "results.csv")
    ft = pd.read_csv(tmp_path / "ft" / "results.csv")
    assert ft["finetuned"].all() and not plain["finetuned"].any()
    assert not np.allclose(plain["mse_all"], ft["mse_all"])


@pytest.mark.parametrize("encoder", [n for n in load_plugins(entry_points=False).encoders.names() if n != "uni"])
def test_every_encoder_runs_from_the_command_line(tmp_path, encoder):
    weights = [] if encoder == "hefeat" else ["--encoder-weights", "random"]
    assert main(["run", "--methods", "ridge", "--encoder", encoder, *weights, "--out", str(tmp_path / encoder), "--quiet", *TINY]) == 0
    run = json.loads((tmp_path / encoder / "run.json").read_text())
    assert run["encoder"]["name"] == encoder
    if weights:
        assert run["encoder"]["weights_id"] == "random-init"
        assert main(["leaderboard", str(tmp_path / encoder), "--output", str(tmp_path / "lb.md")]) == 0
        assert "RANDOM INITIALISATION" in (tmp_path / "lb.md").read_text()


def test_uni_without_weights_stops_with_the_access_instructions(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STBENCH_UNI_WEIGHTS", raising=False)
    assert main(["run", "--methods", "ridge", "--encoder", "uni", "--out", str(tmp_path / "u"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") <= 1 and "huggingface.co/MahmoodLab/UNI" in err and "STBENCH_UNI_WEIGHTS" in err
    assert not (tmp_path / "u").exists()


def test_unknown_encoder_suggests(tmp_path, capsys):
    assert main(["run", "--methods", "ridge", "--encoder", "resnet19", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'resnet18'" in capsys.readouterr().err


def test_methods_without_image_needs_build_no_encoder(tmp_path, capsys):
    assert main(["run", "--methods", "mean", "--encoder", "uni", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "encoder" not in json.loads((tmp_path / "m" / "run.json").read_text())
