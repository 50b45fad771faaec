"""Metrics: per-gene statistics and their aggregations (METHODS.md §2 and "Harness decisions").

``pred`` and ``truth`` are (S spots × G genes) arrays; everything is computed in float64. Inputs must be
2-D, of the same shape and finite (a NaN prediction is a bug in the method, not a skipped gene), else
``ValueError``.

Slide-level metrics (``f(pred, truth) -> MetricValue``, computed on one test slide; the harness then takes
the unweighted mean over the slides of a fold and mean ± std over folds):

* ``pcc``: Pearson r per gene across the slide's spots, mean over genes (headline metric).
* ``ccc``: Lin's concordance per gene, 2·cov / (var_p + var_t + (mean_p − mean_t)²), with the n−1
  convention in numerator and denominator (as torchmetrics), mean over genes.
* ``mae`` / ``mse``: mean of |pred − truth| / (pred − truth)² over all spots and genes.
* ``rvd``: Stem's relative variance distance, mean over genes of (σ̂² − σ²)² / (σ²)², population
  variances (ddof = 0).
* ``rvd_triplex``: TRIPLEX's RVDMetric, mean over genes of ((σ̂² − σ²) / (σ² + 0.01))², ddof = 0.

Fold-level metrics (``f(preds, truths, context) -> MetricValue`` over all test slides of a fold):

* ``pcc_pooled``: per-gene PCC over the fold's test spots pooled across slides, mean over genes.
* ``pcc@k_posthoc`` (HyperST / Stem PCC@k): pooled per-gene PCC, NaN replaced by 0, mean of the k largest
  values. The genes are chosen by their own test PCC, so this is a post hoc number, not a leaderboard metric.
* ``pcc@k_train``: the first k genes of ``context.train_gene_order`` (descending mean expression on the
  fold's training spots, so chosen without test information); per slide the mean PCC over those genes,
  then the unweighted mean over slides. ``train_gene_order = None`` gives a NaN value.

Constant-gene policy (shared by PCC and CCC, and by the fold-level PCCs):

* A gene whose *truth* is constant over the spots has no defined correlation. It is NaN per gene, skipped by
  the mean over genes and counted in ``MetricValue.n_skipped``.
* A gene whose *prediction* is constant while its truth varies scores 0 (no association can be claimed). It
  is not skipped, so a method cannot improve its mean by predicting constants; it is counted in
  ``MetricValue.n_pred_constant``.
* The same rule applies when the prediction is constant for *every* gene of a slide: the slide scores 0
  (not NaN), so a method that returns a constant on the slides it would score badly on cannot drop them
  out of the slide mean. A method that predicts one vector everywhere *by design* (the ``mean`` baseline)
  declares ``MethodSpec.constant_predictor``, and the harness reports its correlations as undefined.
* "Constant" means a population standard deviation ≤ 1e-6·max|x| + 1e-12 (``_CONST_RTOL``,
  ``_CONST_ATOL``), like ``numpy.isclose``. The relative part is scale-aware: it covers exactly equal
  values, whose computed spread is rounding noise of order 1e-16 of their magnitude, and spread below
  float32 resolution, in any unit. The absolute floor covers columns that are zero up to rounding noise
  (e.g. ±1e-17 around 0), where a purely relative test would correlate noise. Values of order 1e-9 that
  really vary are not constant.
* Fewer than two spots: PCC, CCC and RVD are undefined for every gene (all skipped, value NaN).
* ``rvd`` (eps = 0) is undefined for genes with constant truth (division by σ² = 0). They are skipped and
  counted. ``rvd_triplex`` (eps = 0.01) is defined for every gene.

A metric with no usable gene has ``value = NaN`` and ``n_genes = 0``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from stbench.specs import MetricSpec, resolve

#: A column is constant when its population std is at most _CONST_RTOL·max|x| + _CONST_ATOL (module docstring).
_CONST_RTOL = 1e-6
_CONST_ATOL = 1e-12


@dataclass(frozen=True)
class MetricValue:
    """An aggregated metric.

    Attributes:
        value: the aggregated number, NaN when no gene was usable.
        n_genes: genes that entered the mean.
        n_skipped: genes skipped because the metric is undefined for them (constant truth, < 2 spots).
        n_pred_constant: genes (among ``n_genes``) whose prediction was constant (PCC only).
    """

    value: float
    n_genes: int
    n_skipped: int
    n_pred_constant: int = 0


# --------------------------------------------------------------------------------------------------------
# Per-gene statistics


def _check_pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"pred and truth must be 2-D (spots × genes) of the same shape; got {p.shape} and {t.shape}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred and truth must be finite; found NaN or inf")
    return p, t


@dataclass(frozen=True)
class _Centred:
    """Per-gene centred statistics of a (pred, truth) pair: means, sums of squares and cross-products."""

    n: int
    mean_p: np.ndarray
    mean_t: np.ndarray
    ss_p: np.ndarray  # Σ (p − mean_p)²
    ss_t: np.ndarray  # Σ (t − mean_t)²
    sp: np.ndarray  # Σ (p − mean_p)(t − mean_t)
    const_p: np.ndarray  # bool: prediction column constant
    const_t: np.ndarray  # bool: truth column constant


def _centred(pred: Any, truth: Any) -> _Centred:
    p, t = _check_pair(pred, truth)
    n = p.shape[0]
    if n == 0:
        z = np.zeros(p.shape[1])
        return _Centred(0, z, z, z, z, z, np.ones(p.shape[1], bool), np.ones(p.shape[1], bool))
    mean_p, mean_t = p.mean(axis=0), t.mean(axis=0)
    dp, dt = p - mean_p, t - mean_t
    ss_p, ss_t = np.einsum("ij,ij->j", dp, dp), np.einsum("ij,ij->j", dt, dt)
    # std <= rtol*max|x| + atol, written without squaring (no overflow) and without dividing
    const_p = np.sqrt(ss_p / n) <= _CONST_RTOL * np.abs(p).max(axis=0) + _CONST_ATOL
    const_t = np.sqrt(ss_t / n) <= _CONST_RTOL * np.abs(t).max(axis=0) + _CONST_ATOL
    return _Centred(n, mean_p, mean_t, ss_p, ss_t, np.einsum("ij,ij->j", dp, dt), const_p, const_t)


def per_gene_pcc(pred: Any, truth: Any) -> np.ndarray:
    """Pearson r per gene across spots, shape (G,).

    NaN where the truth column is constant or there are fewer than 2 spots; 0.0 where only the prediction
    is constant (see the module docstring).
    """
    return _pcc_from(_centred(pred, truth))


def _pcc_from(c: "_Centred") -> np.ndarray:
    r = np.full(c.sp.shape, np.nan)
    if c.n < 2:
        return r
    ok = ~c.const_t & ~c.const_p
    r[~c.const_t & c.const_p] = 0.0
    denom = np.sqrt(c.ss_p[ok]) * np.sqrt(c.ss_t[ok])
    r[ok] = np.clip(c.sp[ok] / denom, -1.0, 1.0)
    return r


def per_gene_ccc(pred: Any, truth: Any) -> np.ndarray:
    """Lin's concordance correlation coefficient per gene, shape (G,), with ddof = 1 throughout.

    CCC = 2·cov / (var_p + var_t + (mean_p − mean_t)²). NaN where the truth is constant (skipped, as for
    PCC) or there are fewer than 2 spots. A constant prediction with varying truth has cov = 0, so CCC = 0.
    """
    c = _centred(pred, truth)
    out = np.full(c.sp.shape, np.nan)
    if c.n < 2:
        return out
    ok = ~c.const_t
    cov = np.where(c.const_p, 0.0, c.sp) / (c.n - 1)
    denom = (c.ss_p + c.ss_t) / (c.n - 1) + (c.mean_p - c.mean_t) ** 2
    out[ok] = 2.0 * cov[ok] / denom[ok]  # denom >= var_t > 0 where ok
    return out


def per_gene_rvd(pred: Any, truth: Any, eps: float = 0.0) -> np.ndarray:
    """Relative variance distance per gene, ((σ̂² − σ²) / (σ² + eps))², population variances, shape (G,).

    eps = 0 is Stem's definition: NaN where the truth is constant. eps = 0.01 is TRIPLEX's RVDMetric. NaN
    for every gene with fewer than 2 spots.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    c = _centred(pred, truth)
    out = np.full(c.sp.shape, np.nan)
    if c.n < 2:
        return out
    ok = ~c.const_t if eps == 0 else np.ones(c.sp.shape, bool)
    var_p, var_t = c.ss_p / c.n, c.ss_t / c.n
    out[ok] = ((var_p[ok] - var_t[ok]) / (var_t[ok] + eps)) ** 2
    return out


def _gene_mean(per_gene: np.ndarray) -> MetricValue:
    """NaN-mean over genes; NaN genes are counted as skipped."""
    usable = ~np.isnan(per_gene)
    n = int(usable.sum())
    value = float(per_gene[usable].mean()) if n else float("nan")
    return MetricValue(value, n, int(per_gene.size - n))


# --------------------------------------------------------------------------------------------------------
# Slide-level metrics


def _pcc_value(pred: Any, truth: Any) -> MetricValue:
    """Gene-mean PCC with the constant-prediction accounting of the module docstring (constant
    predictions score 0, also when every gene's prediction is constant)."""
    c = _centred(pred, truth)
    r = _pcc_from(c)
    value = _gene_mean(r)
    n_const = int((c.const_p & ~np.isnan(r)).sum())
    return MetricValue(value.value, value.n_genes, value.n_skipped, n_const)


def pcc(pred: Any, truth: Any) -> MetricValue:
    """Mean over genes of the per-gene PCC on one slide (constant-truth genes skipped and counted)."""
    return _pcc_value(pred, truth)


def ccc(pred: Any, truth: Any) -> MetricValue:
    """Mean over genes of Lin's CCC on one slide (constant-truth genes skipped and counted)."""
    return _gene_mean(per_gene_ccc(pred, truth))


def _elementwise_mean(values: np.ndarray) -> MetricValue:
    if values.size == 0:
        return MetricValue(float("nan"), 0, 0)
    return MetricValue(float(values.mean()), values.shape[1], 0)


def mae(pred: Any, truth: Any) -> MetricValue:
    """Mean |pred − truth| over all spots and genes of one slide."""
    p, t = _check_pair(pred, truth)
    return _elementwise_mean(np.abs(p - t))


def mse(pred: Any, truth: Any) -> MetricValue:
    """Mean (pred − truth)² over all spots and genes of one slide."""
    p, t = _check_pair(pred, truth)
    return _elementwise_mean((p - t) ** 2)


def rvd(pred: Any, truth: Any) -> MetricValue:
    """Stem's RVD (eps = 0), mean over genes; constant-truth genes skipped and counted."""
    return _gene_mean(per_gene_rvd(pred, truth, eps=0.0))


def rvd_triplex(pred: Any, truth: Any) -> MetricValue:
    """TRIPLEX's RVDMetric (eps = 0.01), mean over genes."""
    return _gene_mean(per_gene_rvd(pred, truth, eps=0.01))


# --------------------------------------------------------------------------------------------------------
# Fold-level metrics


def _pooled(preds: Sequence[Any], truths: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    if len(preds) != len(truths) or not preds:
        raise ValueError(f"need one truth per prediction and at least one slide; got {len(preds)} and {len(truths)}")
    pairs = [_check_pair(p, t) for p, t in zip(preds, truths)]
    if len({p.shape[1] for p, _ in pairs}) != 1:
        raise ValueError("all slides of a fold must have the same genes")
    return np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs])


def pcc_pooled(preds: Sequence[Any], truths: Sequence[Any], context: Optional[Any] = None) -> MetricValue:
    """Per-gene PCC over all test spots of the fold pooled across slides, mean over genes."""
    return _pcc_value(*_pooled(preds, truths))


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _pcc_at_k_posthoc(preds: Sequence[Any], truths: Sequence[Any], context: Optional[Any] = None, *, k: int) -> MetricValue:
    c = _centred(*_pooled(preds, truths))
    r = _pcc_from(c)
    n_nan = int(np.isnan(r).sum())
    top = np.sort(np.nan_to_num(r, nan=0.0))[::-1][: min(k, r.size)]
    value = float(top.mean()) if top.size else float("nan")
    # constant predictions score 0 here as in ``pcc``, and are counted the same way
    return MetricValue(value, int(top.size), n_nan, int((c.const_p & ~np.isnan(r)).sum()))


def _pcc_at_k_train(preds: Sequence[Any], truths: Sequence[Any], context: Optional[Any] = None, *, k: int) -> MetricValue:
    order = getattr(context, "train_gene_order", None)
    if order is None:
        return MetricValue(float("nan"), 0, 0)
    _pooled(preds, truths)  # validates the slides
    n_genes = np.asarray(preds[0]).shape[1]
    genes = np.asarray(order, dtype=np.intp)[:k]
    if genes.ndim != 1 or genes.size == 0 or genes.min() < 0 or genes.max() >= n_genes or np.unique(genes).size != genes.size:
        raise ValueError(f"train_gene_order must hold distinct gene indices in [0, {n_genes}); got {order!r}")
    per_slide = [_pcc_value(np.asarray(p)[:, genes], np.asarray(t)[:, genes]) for p, t in zip(preds, truths)]
    values = np.array([m.value for m in per_slide])
    value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return MetricValue(value, int(genes.size), sum(m.n_skipped for m in per_slide),
                       sum(m.n_pred_constant for m in per_slide))


def pcc_at_k_posthoc(k: int):
    """HyperST / Stem PCC@k: pooled per-gene PCC, NaN → 0, mean of the top min(k, G) by the test PCC itself.

    Returns ``f(preds, truths, context) -> MetricValue``; ``n_genes = min(k, G)`` and ``n_skipped`` = the
    number of undefined genes (set to 0 before ranking). Post hoc: not a leaderboard metric.
    """
    return functools.partial(_pcc_at_k_posthoc, k=_check_k(k))


def pcc_at_k_train(k: int):
    """PCC over the top-k genes of ``context.train_gene_order`` (training data only), per slide, then mean.

    Returns ``f(preds, truths, context) -> MetricValue``; ``n_genes`` = genes selected, ``n_skipped`` =
    undefined (gene, slide) pairs summed over slides. NaN value when ``train_gene_order`` is None.
    """
    return functools.partial(_pcc_at_k_train, k=_check_k(k))


# --------------------------------------------------------------------------------------------------------
# The registered PCC@k functions (the built-in plugin, stbench.builtin, names them lazily)

pcc_at_10_posthoc, pcc_at_50_posthoc, pcc_at_200_posthoc = (pcc_at_k_posthoc(k) for k in (10, 50, 200))
pcc_at_10_train, pcc_at_50_train, pcc_at_200_train = (pcc_at_k_train(k) for k in (10, 50, 200))


def builtin_metric_specs() -> list[MetricSpec]:
    """The metrics the harness reports (METHODS.md §2; headline = ``pcc``), functions imported."""
    from stbench.builtin import metric_specs

    return [dataclasses.replace(spec, func=resolve(spec.func)) for spec in metric_specs()]


__all__ = [
    "MetricValue", "per_gene_pcc", "per_gene_ccc", "per_gene_rvd",
    "pcc", "ccc", "mae", "mse", "rvd", "rvd_triplex",
    "pcc_pooled", "pcc_at_k_posthoc", "pcc_at_k_train", "builtin_metric_specs",
]
