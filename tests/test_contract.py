"""The method contract, driven by the registry: every method a built-in plugin registers is run through the
harness on a small synthetic dataset with the tiny settings its spec declares (``MethodSpec.test_settings``),
as timm tests every registered model. A new method is covered by adding it to a plugin, with no new test.

Each method: fits and predicts an array of each slide's shape with finite values; the same seed gives the
same results.csv in two directories; the ``finetuned`` column says True exactly when fine-tuning was asked
for, the spec allows it and the class implements it; a constant predictor (``mean``) has undefined (NaN)
correlations and finite errors, every other method finite correlations.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

from stbench.benchmark import resolve_config
from stbench.plugins import load_plugins
from stbench.run import execute, resolve_plan

#: collected at import time, so that each registered method is its own test id
METHODS = [name for name, _ in load_plugins(entry_points=False).methods.entries()]
SMALL = ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]


def _run(name, out, finetune):
    plugins = load_plugins(entry_points=False)
    spec = plugins.methods.get(name)
    shorthands = {"methods": {name: dict(spec.test_settings)}, "finetune": {"enabled": finetune}}
    conf, base = resolve_config("synthetic", sets=SMALL, shorthands=shorthands)
    plan = resolve_plan(conf, [name], out, plugins, base)
    execute(plan, verbose=False)
    return plan, spec, plugins


def test_every_builtin_method_is_collected():
    assert {"mean", "prompt_knn", "ridge", "phg2st"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, tmp_path):
    # two runs per method (the file must stay fast): both with fine-tuning asked for where it applies;
    # where it does not apply, the second run without it, which must then be the very same run
    tuned, again = tmp_path / "tuned", tmp_path / "again"
    plan, spec, plugins = _run(name, tuned, finetune=True)
    method_class = type(plugins.methods.load(name)(plan.methods[name]))
    applies = spec.finetune and method_class.supports_finetune()
    _run(name, again, finetune=applies)

    # the settings the spec declares were used
    for key, value in spec.test_settings.items():
        assert getattr(plan.methods[name], key) == value, key

    res = pd.read_csv(tuned / "results.csv")
    tested = sorted((f.index, s) for f in plan.folds for s in f.test)
    assert sorted(zip(res["fold"], res["slide"])) == tested, "one row per fold x test slide"

    # predictions: one file per test slide, the slide's shape, finite
    n_genes = len(plan.dataset.default_panel())
    for row in res.itertuples():
        ad = anndata.read_h5ad(tuned / "predictions" / name / f"{row.slide}.h5ad")
        assert ad.shape == ad.layers["truth"].shape == (row.n_spots, n_genes)
        assert ad.n_obs == plan.dataset.load_section(row.slide).n_spots
        assert np.isfinite(ad.X).all()

    # the same seed gives the same results in another directory
    assert (tuned / "results.csv").read_text() == (again / "results.csv").read_text()

    # with fine-tuning asked for: it happens exactly when the spec allows it and the class implements it
    assert res["finetuned"].tolist() == [applies] * len(res)

    # correlations: undefined for a constant predictor by design, a number for every other method
    assert np.isfinite(res["mae"]).all()
    if spec.constant_predictor:
        assert res["pcc"].isna().all()
    else:
        assert np.isfinite(res["pcc"]).all()
