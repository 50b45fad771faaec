"""PHG2ST end to end on tiny synthetic slides: prompts, overfitting, ablations, chunks, the CLI."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from stbench.cli import main
from stbench.method import FitContext
from stbench_plugins.phg2st import PHG2STConfig
from stbench_plugins.phg2st.model import PHG2ST, spatial_chunks

#: METHODS.md §8.4 "CPU smoke" sizes
TINY = dict(dim=16, depth_global=2, heads_global=2, depth_neighbour=1, heads_neighbour=2, depth_cross=1,
            heads_cross=2, epochs=2, dropout_global=0.0, dropout_neighbour=0.0, dropout_cross=0.0, dropout_hypergraph=0.0)


def _slide(seed=0, n_side=8, genes=5, dim=6, name="S"):
    """A slide with features that explain expression, and neighbour features around each spot."""
    from stbench.data.model import Slide

    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    grid = np.c_[xs.ravel(), ys.ravel()]
    n = len(grid)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    expr = np.abs(feats[:, :genes] @ rng.normal(size=(genes, genes)) + 3).astype(np.float32)
    nb = (feats[:, None, :] + 0.1 * rng.normal(size=(n, 25, dim))).astype(np.float32)
    mask = np.ones((n, 25), bool)
    mask[:3, :5] = False  # a few sub-patches outside the image
    return Slide(name=name, patient="P", spot_ids=np.array([f"{x}x{y}" for x, y in grid]), genes=np.array([f"g{i}" for i in range(genes)]),
                 expr=expr, grid=grid, pixel=grid * 100.0, mpp=1.0,
                 features={"spot": feats, "spot_mask": np.ones(n, bool), "neighbour": nb, "neighbour_mask": mask})


def _fit(cfg, train, val=()):
    m = PHG2ST(cfg)
    m.fit(list(train), list(val), FitContext(seed=0, genes=train[0].genes))
    return m


def test_prompt_changes_the_prediction_of_the_prompted_spot():
    s = _slide()
    m = _fit(PHG2STConfig(**TINY), [s])
    idx = np.array([5])
    base = m.predict(s.masked(np.array([9])))
    changed = dataclasses.replace(s, expr=s.expr.copy())
    changed.expr[5] += 5.0
    out = m.predict(changed.masked(np.r_[idx, 9]))
    assert not np.allclose(out[5], base[5])
    # METHODS.md §8.4's structural caveat: a prompt is the query of its own spot only, so no other
    # spot's prediction moves
    others = np.setdiff1d(np.arange(s.n_spots), [5])
    np.testing.assert_allclose(out[others], base[others], atol=1e-5)
    ablated = _fit(PHG2STConfig(**TINY, use_prompt=False), [s])
    a = ablated.predict(s.masked(np.array([9])))
    b = ablated.predict(changed.masked(np.r_[idx, 9]))
    np.testing.assert_allclose(a, b, atol=1e-6)  # without the prompt branch prompts cannot matter


def test_tiny_phg2st_overfits_a_tiny_slide():
    s = _slide(seed=1)
    cfg = PHG2STConfig(**{**TINY, "epochs": 150, "lr": 3e-3, "step_size": 1000, "dim": 32})
    m = _fit(cfg, [s])
    pred = m.predict(s.masked(np.arange(0, s.n_spots, 10)))
    mse = float(((pred - s.expr) ** 2).mean())
    baseline = float(((s.expr - s.expr.mean(0)) ** 2).mean())
    assert mse < 0.2 * baseline, (mse, baseline)
    assert m.history[-1]["train_loss"] < m.history[0]["train_loss"]


@pytest.mark.parametrize("change", [dict(use_spot_hypergraph=False), dict(use_neighbour_hypergraph=False),
                                    dict(use_prompt=False), dict(hgnn_variant="code", fusion="code", heads="code", prompt_residual=True),
                                    dict(pyg_compat=True), dict(loss_on="non_prompt")])
def test_variants_and_ablations_train_and_predict(change):
    s = _slide(seed=2)
    m = _fit(PHG2STConfig(**{**TINY, **change}), [s], [_slide(seed=3, name="V")])
    pred = m.predict(s.masked(np.arange(6)))
    assert pred.shape == s.expr.shape and np.isfinite(pred).all()
    assert m.summary()["epochs_run"] == 2


def test_early_stopping_on_inner_validation():
    s = _slide(seed=4)
    m = _fit(PHG2STConfig(**{**TINY, "epochs": 50, "patience": 2, "lr": 0.0}), [s], [_slide(seed=5, name="V")])
    assert len(m.history) == 3  # nothing improves with lr 0: stops after `patience` epochs


def test_chunks_cover_every_spot_once_and_stay_small():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 1000, size=(10_001, 2))
    parts = spatial_chunks(pos, 2048)
    assert max(len(p) for p in parts) <= 2048
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(pos)))
    s = _slide(seed=6, n_side=12)
    m = _fit(PHG2STConfig(**{**TINY, "max_spots": 40}), [s])
    assert len(m._prepare(s)) == 4
    assert np.isfinite(m.predict(s.masked(np.arange(10)))).all()


def test_bad_option_is_a_config_error():
    from stbench.errors import ConfigError

    with pytest.raises(ConfigError, match="methods.phg2st.fusion"):
        PHG2ST(PHG2STConfig(fusion="concat"))


def _tiny_sets():
    return [f"methods.phg2st.{k}={v}" for k, v in TINY.items()] + ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]


@pytest.mark.parametrize("strategy", ["random", "poisson_disc", "sparse_square", "dense_square"])
def test_cli_run_with_every_prompt_strategy(tmp_path, strategy):
    argv = ["run", "--methods", "phg2st,prompt_knn", "--out", str(tmp_path / strategy), "--quiet", "--prompt-strategy", strategy]
    for item in _tiny_sets():
        argv += ["--set", item]
    assert main(argv) == 0
    res = pd.read_csv(tmp_path / strategy / "results.csv")
    assert set(res["method"]) == {"phg2st", "prompt_knn"} and res["pcc"].notna().any()
