"""Runs that cannot be mixed: the run-directory lock, resume checks on settings, genes and data files,
versions kept per unit, the harness's device, and the closed-form refit rule (issue 7)."""

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from stbench.benchmark import resolve_config
from stbench.cli import main
from stbench.lock import RunLock
from stbench.method import Method
from stbench.plugins import load_plugins
from stbench.run import execute, resolve_plan
from stbench.specs import MethodSpec

from conftest import write_her2_layout


def _run(out, methods="mean", *extra):
    return main(["run", "--methods", methods, "--out", str(out), "--quiet", *extra])


def test_a_running_run_holds_the_directory(tmp_path, capsys):
    out = tmp_path / "r"
    lock = RunLock(out).acquire()  # another process is running into this directory
    try:
        assert _run(out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "in use by a running stbench" in err
        assert not (out / "results.csv").exists()
    finally:
        lock.release()
    assert _run(out) == 0  # released: the directory is free again


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    # what a kill -9 leaves: the file with the dead holder's details, but no flock (the kernel dropped it)
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "x", "started": "then", "command": "stbench run"}))
    assert _run(out) == 0
    assert (out / "results.csv").exists()


def test_two_runs_started_together_never_mix_rows(tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "stbench.cli", "run", "--methods", "mean,prompt_knn", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [o[1] for o in outs])
    loser_err = outs[codes.index(2)][1]
    assert loser_err.strip().count("\n") == 0 and ("in use by a running stbench" in loser_err or "seed" in loser_err)
    winner = (0, 1)[codes.index(0)]
    assert json.loads((out / "run.json").read_text())["protocol"]["seed"] == winner
    ref = tmp_path / "ref"
    assert _run(ref, "mean,prompt_knn", "--seed", str(winner)) == 0
    got, want = pd.read_csv(out / "results.csv"), pd.read_csv(ref / "results.csv")
    pd.testing.assert_frame_equal(got, want)


def test_resume_over_an_edited_panel_file_is_refused(tmp_path, capsys):
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(f"SG{i:04d}" for i in range(1, 21)) + "\n")
    out = tmp_path / "r"
    assert _run(out, "mean", "--set", f"panel.file={panel}") == 0
    panel.write_text("\n".join(f"SG{i:04d}" for i in range(2, 22)) + "\n")  # same path, other genes
    capsys.readouterr()
    assert _run(out, "prompt_knn", "--set", f"panel.file={panel}") == 2
    assert "another gene list" in capsys.readouterr().err
    assert not (out / "parts" / "prompt_knn").exists()


def test_resume_over_changed_data_files_is_refused(tmp_path, capsys):
    data = write_her2_layout(tmp_path / "her2")
    out = tmp_path / "r"
    args = ["--dataset", "her2", "--data-dir", str(data), "--set", "panel.file=null", "--set", "panel.hvg=3"]
    assert _run(out, "mean", *args) == 0
    recorded = json.loads((out / "run.json").read_text())["data"]
    assert [f[0] for f in recorded["A1"]] == ["A1.tsv.gz", "A1_selection.tsv"]
    spots = data / "ST-spotfiles" / "A1_selection.tsv"
    spots.write_text(spots.read_text() + "\n")  # edited: size and mtime change
    capsys.readouterr()
    assert _run(out, "prompt_knn", *args) == 2
    assert "other data files of section A1" in capsys.readouterr().err


def test_versions_are_kept_for_every_invocation_and_unit(tmp_path):
    out = tmp_path / "r"
    assert _run(out, "mean") == 0
    assert _run(out, "mean,prompt_knn") == 0
    versions = json.loads((out / "versions.json").read_text())
    assert len(versions["invocations"]) == 2
    assert versions["invocations"][0]["units"] == [f"mean/fold{i}" for i in range(4)]
    assert versions["invocations"][1]["units"] == [f"prompt_knn/fold{i}" for i in range(4)]
    unit = json.loads((out / "parts" / "mean" / "fold0.versions.json").read_text())
    assert unit["numpy"] == np.__version__ and unit["units"] == versions["invocations"][0]["units"]


# --- the harness's device ---------------------------------------------------------------------------

SEEN: list = []


@dataclass
class _Cfg:
    pass


class _DeviceSpy(Method):
    def __init__(self, config):
        pass

    def fit(self, train, val, context):
        SEEN.append(context.device)
        self.mean_ = np.concatenate([s.expr for s in train]).mean(0)

    def predict(self, slide):
        return np.tile(self.mean_, (slide.n_spots, 1)) + slide.positions_um()[:, :1] * 1e-3


def _spy_run(out, **sets):
    p = load_plugins(entry_points=False)
    p.methods.add(MethodSpec("spy", _DeviceSpy, _Cfg), "spy-plugin", "test")
    conf, base = resolve_config("synthetic", sets=[f"{k}={v}" for k, v in sets.items()])
    return execute(resolve_plan(conf, ["spy"], out, p, base), verbose=False)


def test_the_harness_picks_the_device_and_an_override_reaches_every_method(tmp_path):
    SEEN.clear()
    _spy_run(tmp_path / "a")
    import torch

    assert set(SEEN) == {"cuda" if torch.cuda.is_available() else "cpu"}
    SEEN.clear()
    _spy_run(tmp_path / "b", device="cuda:1")  # the spy never touches torch: the string is what is checked
    assert set(SEEN) == {"cuda:1"}
    SEEN.clear()
    _spy_run(tmp_path / "b", device="cpu")  # the device is not part of the protocol: a resume may change it
    assert SEEN == []  # every unit was already done


def test_a_bad_device_is_one_line(tmp_path, capsys):
    assert _run(tmp_path / "r", "mean", "--device", "gpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device must be cpu, cuda" in err
    assert not (tmp_path / "r").exists()


def test_phg2st_runs_on_the_harness_device():
    from stbench_plugins.phg2st import PHG2STConfig

    assert not hasattr(PHG2STConfig(), "device")  # one source for the device: the harness


# --- one rule for closed-form methods ---------------------------------------------------------------


def test_mean_uses_all_training_patients():
    from stbench_plugins.mean import MeanConfig
    from stbench_plugins.mean.model import MeanBaseline

    class S:
        def __init__(self, expr):
            self.expr = expr

    train, val = [S(np.zeros((4, 2)))], [S(np.ones((4, 2)) * 2)]
    m = MeanBaseline(MeanConfig())
    m.fit(train, val, None)
    np.testing.assert_allclose(m.mean_, [1.0, 1.0])


def test_ridge_scores_penalties_only_on_validation_spots_inside_the_image():
    from stbench_plugins.ridge import RidgeConfig
    from stbench_plugins.ridge.model import Ridge

    rng = np.random.default_rng(0)

    def slide(x, y, mask):
        return type("S", (), {"expr": y.astype(np.float32), "features": {"spot": x.astype(np.float32), "spot_mask": mask}})()

    # features carry no signal, so on real (inside) spots the strongest penalty is best by MSE
    train = [slide(rng.normal(3, 1, (80, 6)), rng.normal(size=(80, 4)), np.ones(80, bool)) for _ in range(2)]
    x_in, y_in = rng.normal(3, 1, (30, 6)), rng.normal(size=(30, 4))
    alphas = [1e-3, 1e6]
    probe = Ridge(RidgeConfig(alphas=[1e-3]))
    w = probe._solve(np.r_[train[0].features["spot"], train[1].features["spot"]],
                     np.r_[train[0].expr, train[1].expr], [1e-3])[0]
    # masked spots have zero features (far from the training features); give them exactly the weak
    # penalty's extrapolation as truth, so scoring them would pick the weak penalty
    x_out = np.zeros((30, 6))
    y_out = probe._predict_x(x_out, w)
    mask = np.r_[np.zeros(30, bool), np.ones(30, bool)]
    val = slide(np.r_[x_out, x_in], np.r_[y_out, y_in], mask)
    m = Ridge(RidgeConfig(alphas=alphas, select_by="mse"))
    m.fit(list(train), [val], None)
    assert m.alpha_ == 1e6


# --- prompts ---------------------------------------------------------------------------------------


def test_a_ratio_that_inflates_small_slides_warns_with_the_numbers():
    from stbench.prompts import check_prompt_counts

    with pytest.warns(UserWarning, match=r"1 of 3 spots = 33%"):
        check_prompt_counts({"tiny": 3, "big": 500}, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt_counts({"a": 300, "b": 500}, 0.1)  # every slide gets its share: silent


def test_constant_predictor_is_undefined_consistently_and_counted(tmp_path):
    out = tmp_path / "r"
    assert _run(out, "mean") == 0
    folds = pd.read_csv(out / "fold_results.csv")
    slides = pd.read_csv(out / "results.csv")
    for frame, cols in ((slides, ["pcc", "pcc_all"]), (folds, ["pcc_pooled", "pcc@10_posthoc", "pcc@50_train"])):
        for col in cols:
            assert frame[col].isna().all(), col  # undefined everywhere, never 0.0 in one column and NaN in another
            assert (frame[f"{col}_pred_constant"] > 0).all(), col
    assert slides["mae"].notna().all() and (slides["ccc"] == 0).all()  # defined for a constant prediction


def test_random_slide_is_called_hyperst_like():
    from stbench.builtin import split_specs
    from stbench.splits import random_slide

    spec = next(s for s in split_specs() if s.name == "random_slide")
    assert "HyperST-like" in spec.description and "not HyperST's own splits" in spec.description
    assert "cannot reproduce HyperST's own" in random_slide.__doc__
