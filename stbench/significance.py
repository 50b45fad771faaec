"""Paired comparisons of two leaderboard rows over the same test slides.

A leaderboard's ± is the spread over folds; it does not say whether one method beats another on the
same slides. For that each row is compared with the best row (and with a named baseline) slide by
slide: the Wilcoxon signed-rank test (two-sided, exact for small n, :func:`scipy.stats.wilcoxon`) on
the per-slide differences, and a percentile bootstrap 95 % interval of their mean
(:func:`scipy.stats.bootstrap`, resampling slides, seeded). Only slides where both rows have a value are
paired, and n says how many.

With n paired slides and no ties, the smallest two-sided exact p is 2 / 2**n (0.0625 for 5 slides): when
that is above the significance level no difference can be called significant, and the table says so
instead of marking rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: significance level of the marks
ALPHA = 0.05
#: bootstrap resamples and seed (one source for both; the interval is reproducible)
N_RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Comparison:
    """Row minus reference over their common slides."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p: float

    @property
    def min_p(self) -> float:
        return smallest_p(self.n)


def smallest_p(n: int) -> float:
    """The smallest two-sided exact Wilcoxon signed-rank p with n pairs (all differences of one sign)."""
    return min(1.0, 2.0 / 2 ** n) if n > 0 else 1.0


def can_reach(n: int, alpha: float = ALPHA) -> bool:
    """Whether any outcome on n paired slides can be significant at ``alpha``."""
    return smallest_p(n) <= alpha


def compare(values: dict, reference: dict) -> Optional[Comparison]:
    """Compare per-slide values (key -> value; NaN = undefined) with a reference's on shared keys.

    Returns None when fewer than two slides pair up."""
    keys = sorted(k for k in values.keys() & reference.keys()
                  if not (math.isnan(values[k]) or math.isnan(reference[k])))
    if len(keys) < 2:
        return None
    diff = np.array([values[k] - reference[k] for k in keys], dtype=np.float64)
    from scipy import stats

    if np.all(diff == diff[0]):  # identical differences: nothing to resample, no ranks to test
        p = 1.0 if diff[0] == 0 else smallest_p(len(diff))
        return Comparison(len(diff), float(diff[0]), float(diff[0]), float(diff[0]), p)
    p = float(stats.wilcoxon(diff, alternative="two-sided").pvalue) if np.any(diff != 0) else 1.0
    ci = stats.bootstrap((diff,), np.mean, n_resamples=N_RESAMPLES, method="percentile",
                         confidence_level=0.95, rng=np.random.default_rng(SEED)).confidence_interval
    return Comparison(len(diff), float(diff.mean()), float(ci.low), float(ci.high), p)
