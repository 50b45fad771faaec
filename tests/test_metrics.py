"""Tests for stbench.metrics against SciPy / NumPy references."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from stbench import metrics as M
from stbench.specs import MetricSpec

pytestmark = pytest.mark.filterwarnings("error")

SHAPES = [(2, 1), (3, 4), (50, 7), (400, 30)]
SEEDS = [0, 1, 2]


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=shape)
    pred = 0.5 * truth + rng.normal(size=shape)
    return pred, truth


def _ccc_ref(p, t):
    cov = np.cov(p, t, ddof=1)[0, 1]
    return 2 * cov / (np.var(p, ddof=1) + np.var(t, ddof=1) + (p.mean() - t.mean()) ** 2)


# ---------------------------------------------------------------------------------------------------- refs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_pcc_matches_scipy(shape, seed):
    pred, truth = _data(shape, seed)
    ref = np.array([stats.pearsonr(pred[:, g], truth[:, g])[0] for g in range(shape[1])])
    np.testing.assert_allclose(M.per_gene_pcc(pred, truth), ref, rtol=1e-10, atol=1e-12)
    v = M.pcc(pred, truth)
    assert v == M.MetricValue(pytest.approx(ref.mean(), abs=1e-12), shape[1], 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_ccc_matches_reference(shape, seed):
    pred, truth = _data(shape, seed)
    pred = pred + 0.3  # a mean offset, which CCC penalises
    ref = np.array([_ccc_ref(pred[:, g], truth[:, g]) for g in range(shape[1])])
    np.testing.assert_allclose(M.per_gene_ccc(pred, truth), ref, rtol=1e-10, atol=1e-12)
    assert M.ccc(pred, truth).value == pytest.approx(ref.mean(), abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_mae_mse_rvd_match_numpy(shape, seed):
    pred, truth = _data(shape, seed)
    assert M.mae(pred, truth) == M.MetricValue(pytest.approx(np.mean(np.abs(pred - truth))), shape[1], 0)
    assert M.mse(pred, truth) == M.MetricValue(pytest.approx(np.mean((pred - truth) ** 2)), shape[1], 0)
    vp, vt = pred.var(axis=0), truth.var(axis=0)
    stem = np.mean((vp - vt) ** 2 / vt**2)
    triplex = np.mean(((vp - vt) / (vt + 0.01)) ** 2)
    assert M.rvd(pred, truth).value == pytest.approx(stem, rel=1e-10)
    assert M.rvd_triplex(pred, truth).value == pytest.approx(triplex, rel=1e-10)
    np.testing.assert_allclose(M.per_gene_rvd(pred, truth, eps=0.5), ((vp - vt) / (vt + 0.5)) ** 2, rtol=1e-10)


def test_float32_input_is_computed_in_float64():
    pred, truth = _data((60, 5), 3)
    a = M.per_gene_pcc(pred.astype(np.float32), truth.astype(np.float32))
    b = M.per_gene_pcc(pred.astype(np.float32).astype(np.float64), truth.astype(np.float32).astype(np.float64))
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- edge cases


def test_constant_truth_gene_is_skipped_and_counted():
    pred, truth = _data((1000, 5), 4)
    truth[:, 2] = 3.7  # at this S the computed spread is rounding noise (~1e-27), not 0: still constant
    ref = [stats.pearsonr(pred[:, g], truth[:, g])[0] for g in (0, 1, 3, 4)]
    v = M.pcc(pred, truth)
    assert (v.n_genes, v.n_skipped) == (4, 1)
    assert v.value == pytest.approx(np.mean(ref), abs=1e-12)
    assert math.isnan(M.per_gene_pcc(pred, truth)[2])
    c = M.ccc(pred, truth)
    assert (c.n_genes, c.n_skipped) == (4, 1)
    r = M.rvd(pred, truth)
    assert (r.n_genes, r.n_skipped) == (4, 1)
    assert M.rvd_triplex(pred, truth).n_skipped == 0


def test_constant_prediction_gene_scores_zero():
    pred, truth = _data((40, 5), 5)
    pred[:, 1] = 0.1
    r = M.per_gene_pcc(pred, truth)
    assert r[1] == 0.0
    v = M.pcc(pred, truth)
    assert (v.n_genes, v.n_skipped, v.n_pred_constant) == (5, 0, 1)
    ref = [stats.pearsonr(pred[:, g], truth[:, g])[0] for g in (0, 2, 3, 4)]
    assert v.value == pytest.approx(np.sum(ref) / 5, abs=1e-12)
    assert M.per_gene_ccc(pred, truth)[1] == 0.0
    assert M.ccc(pred, truth).n_skipped == 0


def test_constant_prediction_on_every_gene_scores_zero_and_is_counted():
    # a slide where the method returns one vector for every spot scores 0, not NaN: a NaN slide would
    # drop out of the slide mean and a method could dodge its worst slides (issue 7)
    _, truth = _data((30, 6), 6)
    pred = np.tile(truth.mean(axis=0), (30, 1))
    v = M.pcc(pred, truth)
    assert v == M.MetricValue(0.0, 6, 0, 6)
    assert M.ccc(pred, truth) == M.MetricValue(0.0, 6, 0)
    pooled = M.pcc_pooled([pred, pred], [truth, truth + 1.0])
    assert pooled.value == 0.0 and pooled.n_pred_constant == 6


def test_posthoc_pcc_at_k_agrees_with_pcc_on_constant_predictions():
    _, truth = _data((30, 6), 6)
    pred = np.tile(truth.mean(axis=0), (30, 1))
    v = M.pcc_at_k_posthoc(3)([pred], [truth])
    assert v.value == 0.0 and v.n_pred_constant == 6  # counted, as pcc counts them
    pred2, _ = _data((30, 6), 9)
    pred2[:, 0] = 1.0  # one constant gene among varying ones
    assert M.pcc_at_k_posthoc(3)([pred2], [truth]).n_pred_constant == 1


def test_dodging_slides_with_constants_cannot_raise_the_slide_mean():
    rng = np.random.default_rng(3)
    truths = [rng.normal(size=(40, 5)) for _ in range(6)]
    honest = [t + rng.normal(scale=s, size=t.shape) for t, s in zip(truths, [0.3, 0.3, 3, 3, 3, 0.3])]
    scores = [M.pcc(p, t).value for p, t in zip(honest, truths)]
    worst = np.argsort(scores)[:3]
    dodged = [np.tile(p.mean(0), (len(p), 1)) if i in worst else p for i, p in enumerate(honest)]
    dodged_scores = [M.pcc(p, t).value for p, t in zip(dodged, truths)]
    assert all(dodged_scores[i] == 0.0 for i in worst)
    expected = np.mean([0.0 if i in worst else s for i, s in enumerate(scores)])
    assert np.mean(dodged_scores) == pytest.approx(expected)


def test_rounding_noise_around_zero_is_constant_truth():
    # relative-to-mean alone calls ±1e-17 noise around 0 "varying" and correlates noise; the absolute
    # floor makes it constant (skipped and counted)
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(30, 3))
    truth[:, 1] = rng.normal(size=30) * 1e-17
    pred = rng.normal(size=(30, 3))
    r = M.per_gene_pcc(pred, truth)
    assert math.isnan(r[1]) and np.isfinite(r[[0, 2]]).all()
    assert M.pcc(pred, truth).n_skipped == 1


def test_constant_test_is_scale_aware():
    # a column at 1e6 varying by 1e-3 is below float32 resolution (constant); by 10 it is not
    base = np.full((20, 2), 1e6)
    base[:, 0] += np.linspace(0, 1e-3, 20)
    base[:, 1] += np.linspace(0, 10.0, 20)
    pred = np.random.default_rng(5).normal(size=(20, 2))
    r = M.per_gene_pcc(pred, base)
    assert math.isnan(r[0]) and np.isfinite(r[1])


def test_all_genes_constant_gives_nan():
    pred, _ = _data((20, 4), 7)
    truth = np.ones((20, 4))
    for f in (M.pcc, M.ccc, M.rvd):
        v = f(pred, truth)
        assert math.isnan(v.value) and (v.n_genes, v.n_skipped) == (0, 4)


def test_zero_and_tiny_scale_columns():
    rng = np.random.default_rng(8)
    truth = rng.normal(size=(25, 3)) * 1e-9  # really varies, on a tiny scale
    truth[:, 0] = 0.0  # constant zero
    pred = truth + rng.normal(size=truth.shape) * 1e-9
    r = M.per_gene_pcc(pred, truth)
    assert math.isnan(r[0])
    np.testing.assert_allclose(r[1:], [stats.pearsonr(pred[:, g], truth[:, g])[0] for g in (1, 2)], rtol=1e-9)


def test_single_spot():
    pred, truth = np.array([[1.0, 2.0, 3.0]]), np.array([[1.5, 2.0, 0.0]])
    for f in (M.pcc, M.ccc, M.rvd, M.rvd_triplex):
        v = f(pred, truth)
        assert math.isnan(v.value) and (v.n_genes, v.n_skipped) == (0, 3)
    assert M.mae(pred, truth) == M.MetricValue(pytest.approx(3.5 / 3), 3, 0)
    assert M.mse(pred, truth) == M.MetricValue(pytest.approx(9.25 / 3), 3, 0)


def test_no_spots():
    empty = np.zeros((0, 3))
    assert math.isnan(M.pcc(empty, empty).value)
    assert math.isnan(M.mae(empty, empty).value)


def test_perfect_prediction():
    _, truth = _data((30, 6), 9)
    assert M.pcc(truth, truth).value == pytest.approx(1.0, abs=1e-14)
    assert M.ccc(truth, truth).value == pytest.approx(1.0, abs=1e-14)
    assert M.mse(truth, truth).value == 0.0
    assert M.mae(truth, truth).value == 0.0
    assert M.rvd(truth, truth).value == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        M.pcc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        M.pcc(np.zeros(3), np.zeros(3))
    bad = np.ones((3, 2))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        M.pcc(bad, np.ones((3, 2)))
    with pytest.raises(ValueError):
        M.pcc_at_k_posthoc(0)


# ---------------------------------------------------------------------------------------------- fold level


def _slides(seed, n_slides=3, genes=8):
    rng = np.random.default_rng(seed)
    preds, truths = [], []
    for s in range(n_slides):
        t = rng.gamma(2.0, 1.0, size=(20 + 5 * s, genes))
        preds.append(t * rng.uniform(0, 1, size=genes) + rng.normal(size=t.shape))
        truths.append(t)
    return preds, truths


def test_pcc_pooled_matches_scipy_on_concatenation():
    preds, truths = _slides(10)
    P, T = np.concatenate(preds), np.concatenate(truths)
    ref = np.mean([stats.pearsonr(P[:, g], T[:, g])[0] for g in range(P.shape[1])])
    v = M.pcc_pooled(preds, truths, None)
    assert v == M.MetricValue(pytest.approx(ref, abs=1e-12), 8, 0)


def test_pooled_differs_from_per_slide_mean():
    # Within each slide prediction and truth are uncorrelated, but both carry the same slide offset.
    rng = np.random.default_rng(11)
    preds, truths = [], []
    for offset in (0.0, 5.0, 10.0):
        truths.append(offset + rng.normal(size=(200, 4)))
        preds.append(offset + rng.normal(size=(200, 4)))
    per_slide = np.mean([M.pcc(p, t).value for p, t in zip(preds, truths)])
    pooled = M.pcc_pooled(preds, truths, None).value
    assert abs(per_slide) < 0.1
    assert pooled > 0.9


def test_pcc_at_k_posthoc_takes_top_k_and_zeroes_nan():
    preds, truths = _slides(12, n_slides=2, genes=6)
    for t in truths:
        t[:, 3] = 2.0  # constant truth across the pooled spots → NaN → 0
    P, T = np.concatenate(preds), np.concatenate(truths)
    r = np.array([0.0 if g == 3 else stats.pearsonr(P[:, g], T[:, g])[0] for g in range(6)])
    for k, n in ((2, 2), (6, 6), (200, 6)):
        v = M.pcc_at_k_posthoc(k)(preds, truths, None)
        assert v == M.MetricValue(pytest.approx(np.sort(r)[::-1][:n].mean(), abs=1e-12), n, 1)
    # k = G: the undefined gene enters as 0 and pulls the mean down instead of being skipped
    v = M.pcc_at_k_posthoc(6)(preds, truths, None)
    assert v.value == pytest.approx(r.sum() / 6, abs=1e-12)


def test_pcc_at_k_train_uses_training_order_not_test_pcc():
    rng = np.random.default_rng(13)
    truths = [rng.normal(size=(50, 4)) for _ in range(2)]
    # genes 0, 1 predicted well; genes 2, 3 predicted badly
    noise = np.array([0.1, 0.1, 5.0, 5.0])
    preds = [t + rng.normal(size=t.shape) * noise for t in truths]
    ctx = SimpleNamespace(train_gene_order=np.array([3, 2, 0, 1]))  # training ranks the bad genes first
    train = M.pcc_at_k_train(2)(preds, truths, ctx)
    posthoc = M.pcc_at_k_posthoc(2)(preds, truths, ctx)
    per_slide = [np.mean([stats.pearsonr(p[:, g], t[:, g])[0] for g in (3, 2)]) for p, t in zip(preds, truths)]
    assert train == M.MetricValue(pytest.approx(np.mean(per_slide), abs=1e-12), 2, 0)
    assert posthoc.value > 0.9 > train.value + 0.5


def test_pcc_at_k_train_skips_constant_and_handles_missing_order():
    preds, truths = _slides(14, n_slides=2, genes=5)
    truths[0][:, 1] = 1.0  # constant on slide 0 only
    ctx = SimpleNamespace(train_gene_order=np.array([1, 0, 2, 3, 4]))
    v = M.pcc_at_k_train(2)(preds, truths, ctx)
    slide0 = stats.pearsonr(preds[0][:, 0], truths[0][:, 0])[0]
    slide1 = np.mean([stats.pearsonr(preds[1][:, g], truths[1][:, g])[0] for g in (1, 0)])
    assert v == M.MetricValue(pytest.approx((slide0 + slide1) / 2, abs=1e-12), 2, 1)
    assert M.pcc_at_k_train(50)(preds, truths, ctx).n_genes == 5
    none = M.pcc_at_k_train(2)(preds, truths, SimpleNamespace(train_gene_order=None))
    assert math.isnan(none.value) and (none.n_genes, none.n_skipped) == (0, 0)
    with pytest.raises(ValueError):
        M.pcc_at_k_train(2)(preds, truths, SimpleNamespace(train_gene_order=np.array([7, 0])))


# ---------------------------------------------------------------------------------------------- registry


def test_builtin_metric_specs():
    specs = M.builtin_metric_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert {"pcc", "ccc", "mae", "mse", "rvd", "rvd_triplex", "pcc_pooled",
            "pcc@10_posthoc", "pcc@200_train"} <= set(names)
    preds, truths = _slides(15)
    ctx = SimpleNamespace(train_gene_order=np.arange(8))
    for s in specs:
        assert isinstance(s, MetricSpec)
        assert s.aggregation.strip() and s.description.strip()
        assert s.level in {"slide", "fold"}
        v = s.func(preds, truths, ctx) if s.level == "fold" else s.func(preds[0], truths[0])
        assert isinstance(v, M.MetricValue) and math.isfinite(v.value)
        if "posthoc" in s.name:
            assert "post hoc, not a leaderboard metric" in s.description
    by_name = {s.name: s for s in specs}
    assert by_name["pcc"].higher_is_better and not by_name["mse"].higher_is_better
    assert by_name["pcc"].level == "slide" and by_name["pcc_pooled"].level == "fold"


def test_import_is_numpy_only():
    code = "import sys, stbench.metrics; print(any(m in sys.modules for m in ('scipy', 'torch')))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(M.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
