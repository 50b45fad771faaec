"""End-to-end runs on the synthetic dataset: outputs, scores against SciPy, prompts, resume."""

import json
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stbench import plugins as plugin_loader
from stbench.benchmark import resolve_config
from stbench.cli import main
from stbench.errors import ConfigError
from stbench.method import Method
from stbench.plugins import load_plugins
from stbench.run import execute, resolve_plan
from stbench.specs import MethodSpec


def _run(out, methods="mean,prompt_knn", *extra):
    return main(["run", "--methods", methods, "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "syn"
    import os

    os.environ["STBENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugin_loader.reset_plugins()
    assert _run(out) == 0
    return out


def test_outputs(finished_run):
    out = finished_run
    for name in ("results.csv", "fold_results.csv", "config.yaml", "split.json", "prompts.json", "versions.json", "run.json"):
        assert (out / name).exists(), name
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 2 * 8  # 2 methods x 8 sections, each tested once
    assert not res.duplicated(["method", "fold", "slide"]).any()
    for col in ("method", "fold", "slide", "patient", "n_spots", "n_prompt", "pcc", "pcc_all", "pcc_skipped", "mae", "mae_all"):
        assert col in res
    assert (res["n_prompt"] == (res["n_spots"] * 0.1).astype(int)).all()
    versions = json.loads((out / "versions.json").read_text())
    assert versions["seed"] == 0 and versions["numpy"] and "synthetic" in versions["plugins"]


def test_reported_pcc_equals_scipy_on_saved_predictions(finished_run):
    res = pd.read_csv(finished_run / "results.csv").set_index(["method", "slide"])
    for slide in ("P1S1", "P3S2"):
        ad = anndata.read_h5ad(finished_run / "predictions" / "prompt_knn" / f"{slide}.h5ad")
        scored = ~ad.obs["is_prompt"].to_numpy()
        pred, truth = ad.X[scored], ad.layers["truth"][scored]
        rs = [stats.pearsonr(pred[:, g], truth[:, g])[0] for g in range(pred.shape[1]) if np.ptp(truth[:, g]) > 0]
        assert res.loc[("prompt_knn", slide), "pcc"] == pytest.approx(np.mean(rs), abs=1e-5)
        assert res.loc[("prompt_knn", slide), "pcc_skipped"] == pred.shape[1] - len(rs)
        rs_all = [stats.pearsonr(ad.X[:, g], ad.layers["truth"][:, g])[0] for g in range(pred.shape[1])
                  if np.ptp(ad.layers["truth"][:, g]) > 0]
        assert res.loc[("prompt_knn", slide), "pcc_all"] == pytest.approx(np.mean(rs_all), abs=1e-5)


def test_predictions_are_anndata_with_prompts_flagged(finished_run):
    ad = anndata.read_h5ad(finished_run / "predictions" / "mean" / "P2S1.h5ad")
    prompts = json.loads((finished_run / "prompts.json").read_text())["slides"]["P2S1"]
    assert sorted(ad.obs_names[ad.obs["is_prompt"]]) == sorted(prompts)
    assert {"spot_id", "pixel_x", "pixel_y", "grid_x", "grid_y", "is_prompt", "fold"} <= set(ad.obs)
    assert "truth" in ad.layers and ad.uns["stbench"]["units"].startswith("ln(1 + counts per million")
    # prompt_knn returns the measured value at a prompt spot: the same prompts reached both methods
    knn = anndata.read_h5ad(finished_run / "predictions" / "prompt_knn" / "P2S1.h5ad")
    mask = knn.obs["is_prompt"].to_numpy()
    np.testing.assert_allclose(knn.X[mask], knn.layers["truth"][mask], atol=1e-5)
    assert (knn.obs["is_prompt"] == ad.obs["is_prompt"]).all()


def test_rerun_finishes_at_once(finished_run, capsys):
    before = (finished_run / "results.csv").read_text()
    assert _run(finished_run) == 0
    assert "8 method x fold units were already complete" in capsys.readouterr().err
    assert (finished_run / "results.csv").read_text() == before


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path):
    reference = tmp_path / "ref"
    assert _run(reference) == 0

    calls = {"n": 0}

    @dataclass
    class Cfg:
        pass

    class CrashOnThirdFold(Method):
        def __init__(self, config):
            from stbench_plugins.mean.model import MeanBaseline
            from stbench_plugins.mean import MeanConfig

            self.inner = MeanBaseline(MeanConfig())

        def fit(self, train, val, context):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # a kill in the middle of the run
            self.inner.fit(train, val, context)

        def predict(self, slide):
            return self.inner.predict(slide)

    out = tmp_path / "crash"
    p = load_plugins(builtins=(*plugin_loader.BUILTIN_PLUGINS,), entry_points=False)
    p.methods.add(MethodSpec("crashy", CrashOnThirdFold, Cfg, constant_predictor=True), "crashy-plugin", "test")
    conf, base = resolve_config("synthetic")
    with pytest.raises(KeyboardInterrupt):
        execute(resolve_plan(conf, ["crashy"], out, p, base), verbose=False)
    done = sorted(x.name for x in (out / "parts" / "crashy").glob("*.fold.csv"))
    assert done == ["fold0.fold.csv", "fold1.fold.csv"]
    outcome = execute(resolve_plan(conf, ["crashy"], out, p, base), verbose=False)
    assert outcome.units_run == 2 and outcome.units_skipped == 2
    res = pd.read_csv(out / "results.csv")
    ref = pd.read_csv(reference / "results.csv")
    ref = ref[ref["method"] == "mean"].drop(columns="method").reset_index(drop=True)
    got = res.drop(columns="method").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_exact=False, rtol=1e-6, check_dtype=False)


def test_half_written_unit_is_redone(tmp_path):
    out = tmp_path / "r"
    assert _run(out, "mean") == 0
    (out / "parts" / "mean" / "fold2.fold.csv").unlink()  # killed between the two part files
    (out / "results.csv").unlink()
    conf, base = resolve_config("synthetic")
    outcome = execute(resolve_plan(conf, ["mean"], out, load_plugins(entry_points=False), base), verbose=False)
    assert outcome.units_run == 1
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 8 and not res.duplicated(["method", "fold", "slide"]).any()


def test_rerun_with_another_protocol_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(out, "mean") == 0
    capsys.readouterr()
    assert _run(out, "mean", "--prompt-ratio", "0.2") == 2
    err = capsys.readouterr().err
    assert "other settings (prompt.ratio 0.1 → 0.2)" in err
    assert _run(out, "mean", "--seed", "1") == 2  # named as the seed, not as its consequence (other folds)
    err = capsys.readouterr().err
    assert "other settings (seed 0 → 1)" in err and "folds" not in err
    assert _run(out, "prompt_knn") == 0  # another method under the same protocol joins the run


def test_prompts_are_the_same_for_every_method_and_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, "mean") == 0 and _run(b, "prompt_knn") == 0
    pa = json.loads((a / "prompts.json").read_text())
    pb = json.loads((b / "prompts.json").read_text())
    assert pa == pb
    assert _run(tmp_path / "c", "mean", "--seed", "1") == 0
    assert json.loads((tmp_path / "c" / "prompts.json").read_text())["slides"] != pa["slides"]


@pytest.mark.parametrize("strategy", ["random", "poisson_disc", "sparse_square", "dense_square"])
def test_every_prompt_strategy_runs(tmp_path, strategy):
    assert _run(tmp_path / strategy, "prompt_knn", "--prompt-strategy", strategy) == 0
    assert json.loads((tmp_path / strategy / "prompts.json").read_text())["strategy"] == strategy


def test_finetune_touches_only_the_copy(tmp_path):
    seen = []

    from stbench_plugins.mean.model import MeanBaseline

    original = MeanBaseline.finetune

    def spy(self, slide, settings):
        seen.append((id(self), self.mean_.copy()))
        original(self, slide, settings)

    MeanBaseline.finetune = spy
    try:
        conf, base = resolve_config("synthetic", shorthands={"finetune": {"enabled": True}})
        plan = resolve_plan(conf, ["mean"], tmp_path / "ft", load_plugins(entry_points=False), base)
        execute(plan, verbose=False)
    finally:
        MeanBaseline.finetune = original
    # each test slide got its own copy, and every copy started from the fold's (untouched) model
    assert len(seen) == 8 and len({i for i, _ in seen}) >= 2
    res = pd.read_csv(tmp_path / "ft" / "results.csv")
    assert res["finetuned"].all()
    by_fold = {}
    for (_, m), fold in zip(seen, res.sort_values(["fold", "slide"])["fold"]):
        by_fold.setdefault(fold, []).append(m)
    for means in by_fold.values():
        for m in means[1:]:
            np.testing.assert_array_equal(m, means[0])


def test_unknown_method_config_key_is_an_error(tmp_path):
    conf, base = resolve_config("synthetic", sets=["methods.prompt_knn.kk=3"])
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        resolve_plan(conf, ["prompt_knn"], tmp_path / "x", load_plugins(entry_points=False), base)


def test_masked_slide_hides_the_raw_counts_too():
    from stbench.data.expression import make_slide
    from stbench_plugins.synthetic.generate import open_synthetic

    ds = open_synthetic(None, None)
    slide = make_slide(ds.load_section("P1S1"), ds.default_panel(), "cpm_log1p")
    masked = slide.masked(np.arange(5))
    assert masked.expr is None and masked.section.counts is None and masked.has_image
    assert slide.section.counts is not None  # the harness's own copy keeps them
