"""Prompt spot selection: which ~10 % of a test slide's spots have their measured expression given to the
method (METHODS.md §8.4, §9.1, §9.2).

A *prompt strategy* is a function ``f(coords, n, rng) -> np.ndarray``: ``coords`` is the (N, 2) float array
of spot positions, ``n`` the number of prompts and ``rng`` a :class:`numpy.random.Generator`; it returns
exactly ``n`` distinct int64 spot indices, sorted ascending. The built-in strategies are

* :func:`random_prompts` (``random``): uniform without replacement;
* :func:`poisson_disc_prompts` (``poisson_disc``): a blue-noise subset (large minimum pairwise distance);
* :func:`sparse_square_prompts` (``sparse_square``): four square windows, one per quadrant;
* :func:`dense_square_prompts` (``dense_square``): one contiguous square window.

The journal text that describes these strategies could not be read, so every parameter here is the
project's inference (METHODS.md §9.2, AMB-27).

Reproducibility: :func:`select_prompts` draws its random numbers from :func:`prompt_rng`, a generator seeded
from the slide's name and the run's seed only (through a cryptographic hash, not Python's salted
``hash()``). The same slide with the same seed therefore gets the same prompt spots for every method of a
run, in every process and on every machine — as §9.1 requires ("use exactly the same prompt spots for the
baselines and for PHG2ST"). The number of prompts comes from :func:`n_prompts` (``⌊ratio·N⌋``, at least
one, at most N − 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from typing import Callable, Union

import numpy as np

from stbench.errors import ConfigError, DataError
from stbench.specs import PromptSpec, resolve

__all__ = [
    "random_prompts",
    "poisson_disc_prompts",
    "dense_square_prompts",
    "sparse_square_prompts",
    "n_prompts",
    "check_prompt_counts",
    "prompt_rng",
    "select_prompts",
    "builtin_prompt_specs",
]

#: Packing density of equal discs in the hexagonal lattice, π / (2√3) ≈ 0.9069 (METHODS.md §9.2).
HEX_PACKING_DENSITY = math.pi / (2.0 * math.sqrt(3.0))

#: Bisection steps of the Poisson-disc radius search (bounded; each step is one dart-throwing pass).
POISSON_BISECTION_STEPS = 32

#: Above this many candidate neighbour pairs the Poisson-disc sampler switches from its vectorised pass
#: (memory ∝ pairs) to a sequential pass (memory ∝ spots); only pathological, strongly clustered inputs.
_MAX_PAIRS = 20_000_000


# ----------------------------------------------------------------------------------------------------------
# helpers


def _check_inputs(coords, n: int) -> np.ndarray:
    """Return ``coords`` as a float (N, 2) array; check that ``0 <= n <= N``."""
    pts = np.asarray(coords, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {pts.shape}")
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (numbers.Integral,)):
        raise ValueError(f"the number of prompts must be an integer, got {n!r}")
    n = int(n)
    if n < 0 or n > len(pts):
        raise ValueError(f"cannot choose {n} prompts among {len(pts)} spots")
    return pts


def _sorted_indices(idx) -> np.ndarray:
    return np.sort(np.asarray(idx, dtype=np.int64))


def _diameter(pts: np.ndarray) -> float:
    """Diagonal of the bounding box (an upper bound of every pairwise distance)."""
    if len(pts) == 0:
        return 0.0
    ext = pts.max(axis=0) - pts.min(axis=0)
    return float(math.hypot(ext[0], ext[1]))


def _area(pts: np.ndarray) -> float:
    """Area of the convex hull of ``pts``.

    Degenerate inputs (fewer than 3 points, collinear points, Qhull failure) fall back to the bounding-box
    area, which is 0 when the points lie on an axis-parallel line or coincide.
    """
    if len(pts) >= 3:
        from scipy.spatial import ConvexHull, QhullError

        try:
            area = float(ConvexHull(pts).volume)  # in 2-D, ``volume`` is the area
        except (QhullError, ValueError):
            area = 0.0
        if area > 0.0 and math.isfinite(area):
            return area
    if len(pts) == 0:
        return 0.0
    ext = pts.max(axis=0) - pts.min(axis=0)
    return float(ext[0] * ext[1])


def _square_window(pts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (into ``pts``) of the ``n`` spots of one square window placed at random.

    The window side is ``s = sqrt(n / density)`` with ``density = N / convex-hull area``. Its centre is a
    spot drawn uniformly among the spots whose position lets the whole window lie inside the bounding box
    (all spots if none does), so the window sits on tissue and is rarely clipped. The spots are ranked by
    Chebyshev (L∞) distance to the centre — i.e. a square grown around the centre — with ties broken by
    Euclidean distance (which keeps the partial outer ring contiguous: side middles before corners) and
    then at random; the first ``n`` are taken. On a regular grid this is every spot inside a square of
    about ``s`` × ``s``, adjusted to exactly ``n``.
    """
    m = len(pts)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n >= m:
        return np.arange(m, dtype=np.int64)
    area = _area(pts)
    side = math.sqrt(n * area / m) if area > 0 else 0.0
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    half = side / 2.0
    inside = np.ones(m, dtype=bool)
    for ax in range(2):
        a, b = lo[ax] + half, hi[ax] - half
        if a <= b:
            inside &= (pts[:, ax] >= a) & (pts[:, ax] <= b)
        else:  # the window is wider than the slide on this axis: centre it on this axis
            mid = (lo[ax] + hi[ax]) / 2.0
            d = np.abs(pts[:, ax] - mid)
            inside &= d <= d.min() + 1e-9 * max(hi[ax] - lo[ax], 1.0)
    candidates = np.flatnonzero(inside)
    if len(candidates) == 0:
        candidates = np.arange(m)
    centre = pts[candidates[rng.integers(len(candidates))]]
    diff = np.abs(pts - centre)
    scale = max(_diameter(pts), 1e-300)
    # quantise so that floating-point noise does not break exact lattice ties
    cheb = np.round(diff.max(axis=1) / scale, 9)
    eucl = np.round(np.hypot(diff[:, 0], diff[:, 1]) / scale, 9)
    order = np.lexsort((rng.random(m), eucl, cheb))
    return _sorted_indices(order[:n])


# ----------------------------------------------------------------------------------------------------------
# strategies


def random_prompts(coords: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` spots drawn uniformly without replacement (METHODS.md §9.2 "random")."""
    pts = _check_inputs(coords, n)
    return _sorted_indices(rng.choice(len(pts), size=int(n), replace=False))


def _dart_throw_vectorised(n_pts: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Greedy sequential acceptance, computed in parallel rounds.

    ``src -> dst`` are the conflicting pairs (distance < r), directed from the earlier spot of the
    permutation to the later one. A spot is accepted iff no earlier conflicting spot was accepted — the
    result of the sequential dart-throwing loop. Each round accepts every undecided spot whose earlier
    conflicting spots are all rejected, then rejects every undecided spot with an accepted earlier conflict;
    the earliest undecided spot is always decided, so the loop terminates (in practice in a few dozen
    rounds).
    """
    UNDECIDED, ACCEPTED, REJECTED = 0, 1, 2
    state = np.zeros(n_pts, dtype=np.int8)
    while True:
        undecided = state == UNDECIDED
        if not undecided.any():
            break
        blocked = np.zeros(n_pts, dtype=bool)
        blocked[dst[state[src] != REJECTED]] = True
        state[undecided & ~blocked] = ACCEPTED
        hit = np.zeros(n_pts, dtype=bool)
        hit[dst[state[src] == ACCEPTED]] = True
        state[(state == UNDECIDED) & hit] = REJECTED
        keep = (state[dst] == UNDECIDED) & (state[src] != REJECTED)
        src, dst = src[keep], dst[keep]
    return np.flatnonzero(state == ACCEPTED)


def _dart_throw_sequential(pts: np.ndarray, tree, order: np.ndarray, r: float) -> np.ndarray:
    """The plain dart-throwing loop (memory ∝ spots): the fallback for inputs with too many close pairs."""
    blocked = np.zeros(len(pts), dtype=bool)
    accepted = []
    for i in order.tolist():
        if blocked[i]:
            continue
        accepted.append(i)
        near = np.asarray(tree.query_ball_point(pts[i], r), dtype=np.int64)
        if len(near):
            d = np.hypot(*(pts[near] - pts[i]).T)
            blocked[near[d < r]] = True
    return np.sort(np.asarray(accepted, dtype=np.int64))


class _DartThrower:
    """Dart throwing over one fixed random permutation, for any radius ``r``.

    Two equivalent passes (same permutation, same result): a vectorised one over the close pairs, which
    are computed once with a k-d tree at a cached radius and filtered for each smaller ``r``; and a
    sequential one (one ball query per accepted spot), used when a spot has many neighbours within ``r``
    (a small prompt budget on a large slide), where it is the faster and leaner of the two.
    """

    #: average number of neighbours within r above which the sequential pass is used
    MAX_MEAN_NEIGHBOURS = 64

    def __init__(self, pts: np.ndarray, order: np.ndarray, area: float):
        from scipy.spatial import cKDTree

        self.pts = pts
        self.order = order
        self.density = len(pts) / area if area > 0 else math.inf
        self.rank = np.empty(len(pts), dtype=np.int64)
        self.rank[order] = np.arange(len(pts))
        self.tree = cKDTree(pts)
        self.cached_r = -1.0
        self.src = self.dst = self.dist = None

    def _pairs(self, r: float):
        """Conflicting pairs (distance < r), directed from earlier to later spot; None: go sequential."""
        if r > self.cached_r:
            if self.density * math.pi * r * r > self.MAX_MEAN_NEIGHBOURS:
                return None
            # the estimate assumes evenly spread spots: check the real count before allocating
            if self.tree.count_neighbors(self.tree, r) > 2 * _MAX_PAIRS + len(self.pts):
                return None
            pairs = self.tree.query_pairs(r, output_type="ndarray").astype(np.int64, copy=False)
            a, b = pairs[:, 0], pairs[:, 1]
            earlier = self.rank[a] < self.rank[b]
            self.src = np.where(earlier, a, b)
            self.dst = np.where(earlier, b, a)
            self.dist = np.hypot(*(self.pts[a] - self.pts[b]).T)
            self.cached_r = r
        keep = self.dist < r
        return self.src[keep], self.dst[keep]

    def __call__(self, r: float) -> np.ndarray:
        """Indices accepted at radius ``r`` (a spot is accepted if it is ≥ r from all accepted ones)."""
        if r <= 0.0:
            return np.arange(len(self.pts), dtype=np.int64)
        pairs = self._pairs(r)
        if pairs is None:
            return _dart_throw_sequential(self.pts, self.tree, self.order, r)
        return _dart_throw_vectorised(len(self.pts), *pairs)


def poisson_disc_prompts(coords: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A blue-noise subset of ``n`` spots: chosen spots are far apart (METHODS.md §9.2 "Poisson disc").

    1. Start radius ``r0 = sqrt(A / (n · π/(2√3)))``, with ``A`` the convex-hull area of the spots (the
       spacing of ``n`` spots in hexagonal packing). Degenerate hulls (fewer than 3 spots, collinear spots)
       use the bounding-box area; if that is 0 too, ``r0 = diameter / (n − 1)``; if all spots coincide the
       selection is uniform at random.
    2. Dart-throw over one random permutation of the spots (the same permutation for every radius): a spot
       is accepted if its distance to every already accepted spot is ≥ r.
    3. Bisect r (at most :data:`POISSON_BISECTION_STEPS` passes; r is doubled first if r0 already accepts
       more than ``n``) until exactly ``n`` spots are accepted.
    4. If no radius gives exactly ``n`` (the count jumps on a lattice), take the accepted set at the largest
       radius that gave at least ``n`` spots and drop random extras — so the minimum pairwise distance of
       the result is still at least that radius.

    Neighbours come from a k-d tree (``scipy.spatial.cKDTree``) and the dart-throwing pass is vectorised
    over close pairs (or sequential when the radius is large), so 100,000 spots take a second or two.
    """
    pts = _check_inputs(coords, n)
    n, m = int(n), len(pts)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n == m:
        return np.arange(m, dtype=np.int64)
    diam = _diameter(pts)
    if n == 1 or diam == 0.0:
        return random_prompts(pts, n, rng)
    area = _area(pts)
    if area > 0.0:
        r0 = math.sqrt(area / (n * HEX_PACKING_DENSITY))
    else:
        r0 = diam / (n - 1)
    r0 = min(max(r0, 1e-9 * diam), diam)

    throw = _DartThrower(pts, rng.permutation(m), area)
    best_r, best = 0.0, np.arange(m, dtype=np.int64)  # r = 0 accepts every spot (≥ n)

    accepted = throw(r0)
    if len(accepted) == n:
        return _sorted_indices(accepted)
    if len(accepted) > n:
        best_r, best = r0, accepted
        hi = None
        r = r0
        while r < diam:  # at most ~30 doublings since r0 ≥ 1e-9 · diameter
            r = min(2.0 * r, diam * (1.0 + 1e-9))
            accepted = throw(r)
            if len(accepted) == n:
                return _sorted_indices(accepted)
            if len(accepted) > n:
                best_r, best = r, accepted
            else:
                hi = r
                break
        if hi is None:  # cannot happen for n ≥ 2 (beyond the diameter one spot is accepted); be safe
            hi = best_r
    else:
        hi = r0

    lo = best_r
    for _ in range(POISSON_BISECTION_STEPS):
        if hi - lo <= 1e-12 * diam:
            break
        mid = 0.5 * (lo + hi)
        accepted = throw(mid)
        if len(accepted) == n:
            return _sorted_indices(accepted)
        if len(accepted) > n:
            lo, best_r, best = mid, mid, accepted
        else:
            hi = mid

    return _sorted_indices(rng.choice(best, size=n, replace=False))


def dense_square_prompts(coords: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """All ``n`` prompts in one contiguous axis-aligned square window (METHODS.md §9.2 "dense square").

    The window side follows the spot density (``side = sqrt(n / density)``, density = spots per convex-hull
    area); its centre is a random spot placed so that the window fits in the slide's bounding box. The
    square is then grown or shrunk around that centre until it holds exactly ``n`` spots: spots are ranked
    by Chebyshev (L∞) distance to the centre (ties: Euclidean distance, then random) and the first ``n``
    are taken. This is the local-to-global setting: every spot inside the window is a prompt.
    """
    pts = _check_inputs(coords, n)
    return _square_window(pts, int(n), rng)


def _quadrants(pts: np.ndarray) -> list:
    """Spot indices of the four quadrants split at the median x and median y (lower-left, lower-right,
    upper-left, upper-right); a spot on a median line goes to the lower/left side."""
    mx, my = np.median(pts[:, 0]), np.median(pts[:, 1])
    right = pts[:, 0] > mx
    upper = pts[:, 1] > my
    return [np.flatnonzero(~right & ~upper), np.flatnonzero(right & ~upper),
            np.flatnonzero(~right & upper), np.flatnonzero(right & upper)]


def _split_budget(n: int, capacities: list, rng: np.random.Generator) -> list:
    """Split ``n`` over the windows as evenly as possible (the remainder goes to random windows), never
    giving a window more than its capacity; a deficit moves to the windows with room left."""
    k = len(capacities)
    shares = [n // k] * k
    for j in rng.permutation(k)[: n % k].tolist():
        shares[j] += 1
    shares = [min(s, c) for s, c in zip(shares, capacities)]
    deficit = n - sum(shares)
    while deficit > 0:
        room = [j for j in range(k) if shares[j] < capacities[j]]
        if not room:  # cannot happen when n ≤ sum(capacities)
            raise ValueError(f"cannot place {n} prompts in windows of capacity {capacities}")
        # one spot at a time to the window with the smallest share (random tie-break): stays balanced
        low = min(shares[j] for j in room)
        candidates = [j for j in room if shares[j] == low]
        shares[candidates[int(rng.integers(len(candidates)))]] += 1
        deficit -= 1
    return shares


def sparse_square_prompts(coords: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The budget split over k = 4 non-overlapping square windows (METHODS.md §9.2 "sparse square").

    The slide is cut into four quadrants at the median x and median y (so each quadrant has spots; the
    code's quadrant partition). Each quadrant gets ``n // 4`` prompts, the remainder going to random
    quadrants; a quadrant with fewer spots than its share gives the deficit to the others. Within each
    quadrant the prompts are one square window around a random centre, selected as in
    :func:`dense_square_prompts` but among that quadrant's spots only, so the windows never overlap.
    """
    pts = _check_inputs(coords, n)
    n = int(n)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n == len(pts):
        return np.arange(len(pts), dtype=np.int64)
    quads = _quadrants(pts)
    shares = _split_budget(n, [len(q) for q in quads], rng)
    chosen = [q[_square_window(pts[q], share, rng)] for q, share in zip(quads, shares) if share > 0]
    return _sorted_indices(np.concatenate(chosen))


# ----------------------------------------------------------------------------------------------------------
# harness entry points


def check_prompt_counts(spots: dict[str, int], ratio: float) -> None:
    """Refuse a ratio that gives no test slide a single prompt spot by itself, and warn, with the
    numbers, when the one-prompt minimum of :func:`n_prompts` makes slides' prompt shares more than
    twice the requested ratio (``--prompt-ratio 1e-6`` would otherwise give 33 % of a 3-spot slide).

    ``spots``: test slide name -> number of spots.
    """
    import warnings

    if not spots:
        return
    inflated = {name: n for name, n in spots.items() if n >= 2 and n_prompts(n, ratio) > 2 * ratio * n}
    smallest = min(spots, key=spots.get)
    needed = 1.0 / max(spots.values())
    if len(inflated) == len(spots):
        raise ConfigError(
            f"prompt ratio {ratio:g} gives no test slide a prompt spot of its own (largest slide: {max(spots.values())} "
            f"spots, {ratio * max(spots.values()):.3g} prompts); use --prompt-ratio {needed:.2g} or more")
    if inflated:
        name = max(inflated, key=lambda k: n_prompts(inflated[k], ratio) / inflated[k])
        n, k = inflated[name], n_prompts(inflated[name], ratio)
        warnings.warn(
            f"prompt ratio {ratio:g} is below one spot on {len(inflated)} of {len(spots)} test slides, which get one "
            f"prompt spot each (e.g. slide {name}: {k} of {n} spots = {k / n:.0%}); smallest slide: {smallest} "
            f"({spots[smallest]} spots)", stacklevel=2)


def n_prompts(n_spots: int, ratio: float) -> int:
    """Number of prompt spots of a slide with ``n_spots`` spots: ``⌊ratio · N⌋``, at least 1 when N ≥ 2,
    and at most N − 1 (some spots must remain to be scored). 0 for a slide of 0 or 1 spot.

    A tolerance of 1e-9 absorbs binary rounding (``0.29 · 100`` gives 29, not 28).

    Raises:
        ConfigError: ``ratio`` is not a number strictly between 0 and 1 (NaN included).
    """
    bad = isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, numbers.Real)
    if not bad:
        value = float(ratio)
        bad = not (0.0 < value < 1.0)  # False for NaN as well
    if bad:
        raise ConfigError(
            f"prompt ratio must be in (0, 1), got {ratio!r} (option --prompt-ratio or key prompt.ratio)"
        )
    if isinstance(n_spots, (bool, np.bool_)) or not isinstance(n_spots, numbers.Integral) or n_spots < 0:
        raise ValueError(f"n_spots must be a non-negative integer, got {n_spots!r}")
    n_spots = int(n_spots)
    if n_spots < 2:
        return 0
    n = math.floor(value * n_spots + 1e-9)
    return int(min(max(n, 1), n_spots - 1))


def prompt_rng(slide_name: str, seed: int) -> np.random.Generator:
    """The generator of one slide's prompts: a function of ``(slide_name, seed)`` only.

    Seeded from the SHA-256 of ``f"{slide_name}:{seed}"`` (not Python's ``hash()``, which is salted per
    process), so every method, process and machine gets the same prompts for the same slide and seed.
    """
    digest = hashlib.sha256(f"{slide_name}:{int(seed)}".encode("utf-8")).digest()
    words = np.frombuffer(digest, dtype="<u4").astype(np.uint64).tolist()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


Strategy = Union[Callable[..., np.ndarray], PromptSpec, str]


def _strategy_function(strategy: Strategy):
    """``(name, callable)`` of a strategy given as a function, a :class:`PromptSpec`, a lazy
    ``"package.module:function"`` string or a built-in name."""
    if isinstance(strategy, PromptSpec):
        return strategy.name, resolve(strategy.func)
    if isinstance(strategy, str) and ":" in strategy:  # a lazy "package.module:function" factory
        return strategy.rpartition(":")[2], resolve(strategy)
    if isinstance(strategy, str):
        specs = {spec.name: spec for spec in builtin_prompt_specs()}
        if strategy not in specs:
            raise ConfigError(
                f"unknown prompt strategy {strategy!r}; built-in strategies: {', '.join(specs)}"
            )
        return strategy, specs[strategy].func
    if callable(strategy):
        return getattr(strategy, "__name__", repr(strategy)), strategy
    raise TypeError(f"a prompt strategy must be a function, a PromptSpec or a name, got {strategy!r}")


def select_prompts(strategy: Strategy, coords: np.ndarray, ratio: float, slide_name: str,
                   seed: int) -> np.ndarray:
    """The prompt spots of one slide: sorted int64 indices into ``coords``.

    ``n = n_prompts(len(coords), ratio)`` spots are chosen by ``strategy`` (one of the functions of this
    module, any function with the same signature, a :class:`PromptSpec`, a lazy ``"module:function"``
    string as in :attr:`PromptSpec.func`, or a built-in name) with
    ``prompt_rng(slide_name, seed)``, so the same slide and seed always give the same prompts.

    Raises:
        ConfigError: ``ratio`` is out of range (or ``strategy`` names no built-in strategy).
        DataError: ``coords`` is not an (N, 2) array of finite numbers.
        RuntimeError: the strategy returned something other than ``n`` distinct in-range indices.
    """
    name, func = _strategy_function(strategy)
    pts = np.asarray(coords, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise DataError(f"slide {slide_name!r}: spot coordinates must have shape (N, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise DataError(f"slide {slide_name!r}: spot coordinates contain NaN or infinite values")
    n = n_prompts(len(pts), ratio)
    result = func(pts, n, prompt_rng(slide_name, seed))
    idx = np.asarray(result)
    where = f"prompt strategy {name!r} on slide {slide_name!r}"
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise RuntimeError(f"{where} must return a 1-D array of integer indices, got {idx.dtype} {idx.shape}")
    if len(idx) != n:
        raise RuntimeError(f"{where} returned {len(idx)} indices instead of {n}")
    idx = np.sort(idx.astype(np.int64))
    if n and (idx[0] < 0 or idx[-1] >= len(pts)):
        raise RuntimeError(f"{where} returned indices outside [0, {len(pts)})")
    if n > 1 and (np.diff(idx) == 0).any():
        raise RuntimeError(f"{where} returned duplicate indices")
    return idx


def builtin_prompt_specs() -> list:
    """The four built-in strategies of METHODS.md §9.2 (defined in :mod:`stbench.builtin`), functions
    imported."""
    from stbench.builtin import prompt_specs

    return [dataclasses.replace(spec, func=resolve(spec.func)) for spec in prompt_specs()]


def sweep_prompts(spec, coords: np.ndarray, ratios, slide_name: str, seed: int) -> dict[float, np.ndarray]:
    """The prompt spots of one slide at each ratio of a sweep: ratio -> sorted indices.

    The largest ratio's prompts are :func:`select_prompts`'s (the same as a run at that ratio alone).
    With a strategy whose spec says ``nested_by_subset`` (uniform random spots), each smaller ratio
    takes a uniform random subset of them, drawn from a generator of its own (seeded by slide, seed
    and ratio), so the ratios nest. Other strategies draw each ratio with their own construction;
    :func:`nested` says whether the result happens to nest.
    """
    ratios = sorted({float(r) for r in ratios})
    largest = select_prompts(spec.func, coords, ratios[-1], slide_name, seed)
    out = {ratios[-1]: largest}
    # one random order of the largest ratio's prompts; each smaller ratio takes its first n, so every
    # ratio's prompts are a uniform random subset of the next larger one's
    order = prompt_rng(f"{slide_name}#sweep", seed).permutation(largest)
    for ratio in ratios[:-1]:
        if getattr(spec, "nested_by_subset", False):
            out[ratio] = np.sort(order[: n_prompts(len(coords), ratio)]).astype(np.int64)
        else:
            out[ratio] = select_prompts(spec.func, coords, ratio, slide_name, seed)
    return dict(sorted(out.items()))


def nested(sets: dict[float, np.ndarray]) -> bool:
    """Whether each ratio's prompts are a subset of every larger ratio's."""
    ordered = [set(map(int, sets[r])) for r in sorted(sets)]
    return all(a <= b for a, b in zip(ordered, ordered[1:]))
