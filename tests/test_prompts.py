"""Tests of stbench.prompts: the four prompt sampling strategies (METHODS.md §9.2) and their harness glue."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from stbench.errors import ConfigError, DataError, StbenchError
from stbench.prompts import (
    _DartThrower,
    _dart_throw_sequential,
    _split_budget,
    builtin_prompt_specs,
    dense_square_prompts,
    n_prompts,
    poisson_disc_prompts,
    prompt_rng,
    random_prompts,
    select_prompts,
    sparse_square_prompts,
)
from stbench.specs import PromptSpec, resolve

pytestmark = pytest.mark.filterwarnings("error")

STRATEGIES = [random_prompts, poisson_disc_prompts, dense_square_prompts, sparse_square_prompts]
STRATEGY_IDS = [f.__name__ for f in STRATEGIES]


def square_grid(side=30):
    """Unit square lattice (ST-like), side × side spots."""
    xs, ys = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float))
    return np.column_stack([xs.ravel(), ys.ravel()])


def hex_grid(rows=30, cols=30):
    """Visium-like hexagonal lattice: odd rows offset by half a spacing; nearest-neighbour spacing 1."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = c + 0.5 * (r % 2)
    y = r * math.sqrt(3.0) / 2.0
    return np.column_stack([x.ravel(), y.ravel()]).astype(float)


def irregular_cloud(n=157):
    return np.random.default_rng(12345).random((n, 2)) * np.array([20.0, 13.0]) + np.array([100.0, -5.0])


LAYOUTS = {"square": square_grid(), "hex": hex_grid(), "irregular": irregular_cloud()}


def components(pts, idx, radius):
    """Connected components of the chosen spots, linking spots closer than ``radius``."""
    chosen = pts[idx]
    tree = cKDTree(chosen)
    seen = np.zeros(len(idx), dtype=bool)
    comps = []
    for start in range(len(idx)):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in tree.query_ball_point(chosen[i], radius):
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
        comps.append(comp)
    return comps


def check_indices(idx, n, n_spots):
    assert isinstance(idx, np.ndarray)
    assert idx.dtype == np.int64
    assert idx.ndim == 1 and len(idx) == n
    assert len(np.unique(idx)) == n
    assert np.all(np.diff(idx) > 0), "indices must be sorted ascending"
    if n:
        assert idx[0] >= 0 and idx[-1] < n_spots


# ---------------------------------------------------------------------------------------------------------
# contract of every strategy


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exactly_n_distinct_sorted_in_range(strategy, layout):
    pts = LAYOUTS[layout]
    m = len(pts)
    for n in sorted({0, 1, 2, 3, 4, 5, 7, m // 10, 37, m // 2, m - 1, m}):
        for seed in range(3):
            idx = strategy(pts, n, np.random.default_rng(seed))
            check_indices(idx, n, m)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
def test_rejects_bad_n_and_shape(strategy):
    pts = square_grid(5)
    with pytest.raises(ValueError):
        strategy(pts, 26, np.random.default_rng(0))
    with pytest.raises(ValueError):
        strategy(pts, -1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        strategy(pts[:, :1], 2, np.random.default_rng(0))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize(
    "pts",
    [
        np.zeros((10, 2)),  # all spots coincide
        np.column_stack([np.arange(20.0), np.zeros(20)]),  # axis-parallel line
        np.column_stack([np.arange(20.0), 2.0 * np.arange(20.0) + 1.0]),  # oblique line (Qhull fails)
        np.array([[0.0, 0.0], [1.0, 1.0]]),  # two spots
        np.repeat(square_grid(6), 3, axis=0),  # every position three times
    ],
    ids=["coincident", "axis-line", "oblique-line", "two", "duplicates"],
)
def test_degenerate_inputs(strategy, pts):
    m = len(pts)
    for n in sorted({1, max(1, m // 10), m // 2, m - 1}):
        check_indices(strategy(pts, n, np.random.default_rng(7)), n, m)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_slide_and_seed_same_prompts(strategy, layout):
    pts = LAYOUTS[layout]
    a = select_prompts(strategy, pts, 0.1, "slide_A1", 0)
    b = select_prompts(strategy, pts.copy(), 0.1, "slide_A1", 0)
    np.testing.assert_array_equal(a, b)
    check_indices(a, n_prompts(len(pts), 0.1), len(pts))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_seed_or_slide_other_prompts(strategy, layout):
    pts = LAYOUTS[layout]
    base = select_prompts(strategy, pts, 0.1, "slide_A1", 0)
    for seed in (1, 2, 3):
        assert not np.array_equal(base, select_prompts(strategy, pts, 0.1, "slide_A1", seed))
    for name in ("slide_A2", "slide_B1", "A1"):
        assert not np.array_equal(base, select_prompts(strategy, pts, 0.1, name, 0))


# ---------------------------------------------------------------------------------------------------------
# n_prompts, prompt_rng, select_prompts, specs


@pytest.mark.parametrize(
    "n_spots, ratio, expected",
    [
        (0, 0.1, 0),
        (1, 0.1, 0),
        (2, 0.1, 1),
        (2, 0.99, 1),
        (9, 0.1, 1),
        (10, 0.1, 1),
        (19, 0.1, 1),
        (20, 0.1, 2),
        (100, 0.1, 10),
        (100, 0.29, 29),  # 0.29 * 100 == 28.999999999999996 in binary
        (1000, 0.001, 1),
        (10, 0.99, 9),
        (10, 0.95, 9),
        (3, 0.999, 2),
        (900, 0.1, 90),
        (4011, 0.1, 401),
        (10, np.float32(0.5), 5),
        (np.int64(100), np.float64(0.3), 30),
    ],
)
def test_n_prompts(n_spots, ratio, expected):
    n = n_prompts(n_spots, ratio)
    assert n == expected and type(n) is int


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), float("inf"), 0.0, 1.0, "0.1", None, True, False])
def test_n_prompts_bad_ratio(ratio):
    with pytest.raises(ConfigError) as err:
        n_prompts(100, ratio)
    message = str(err.value)
    assert "\n" not in message
    assert "(0, 1)" in message and "--prompt-ratio" in message and "prompt.ratio" in message
    assert isinstance(err.value, StbenchError)


def test_n_prompts_bad_ratio_message():
    with pytest.raises(ConfigError, match=r"prompt ratio must be in \(0, 1\), got 1\.5"):
        n_prompts(10, 1.5)


def test_n_prompts_bad_spot_count():
    with pytest.raises(ValueError):
        n_prompts(-1, 0.1)


def test_prompt_rng_reproducible():
    a = prompt_rng("slide_A1", 3).random(5)
    b = prompt_rng("slide_A1", 3).random(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, prompt_rng("slide_A1", 4).random(5))
    assert not np.array_equal(a, prompt_rng("slide_A2", 3).random(5))
    assert isinstance(prompt_rng("x", 0), np.random.Generator)


def test_prompt_rng_independent_of_process():
    """Python's hash() is salted per process; the prompt generator must not depend on it."""
    code = (
        "from stbench.prompts import select_prompts, prompt_rng, poisson_disc_prompts\n"
        "import numpy as np\n"
        "pts = np.random.default_rng(0).random((300, 2))\n"
        "print(prompt_rng('slide_A1', 7).integers(0, 2**62), "
        "select_prompts(poisson_disc_prompts, pts, 0.1, 'slide_A1', 7).tolist())\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        outputs.add(result.stdout)
    assert len(outputs) == 1
    pts = np.random.default_rng(0).random((300, 2))
    here = f"{prompt_rng('slide_A1', 7).integers(0, 2**62)} " \
           f"{select_prompts(poisson_disc_prompts, pts, 0.1, 'slide_A1', 7).tolist()}\n"
    assert outputs == {here}


def test_select_prompts_uses_n_prompts_and_prompt_rng():
    pts = hex_grid()
    idx = select_prompts(random_prompts, pts, 0.1, "s", 5)
    expected = random_prompts(pts, n_prompts(len(pts), 0.1), prompt_rng("s", 5))
    np.testing.assert_array_equal(idx, expected)
    assert len(idx) == 90


def test_select_prompts_accepts_spec_and_name():
    pts = square_grid()
    by_func = select_prompts(dense_square_prompts, pts, 0.1, "s", 1)
    spec = PromptSpec("dense_square", "stbench.prompts:dense_square_prompts")
    np.testing.assert_array_equal(select_prompts(spec, pts, 0.1, "s", 1), by_func)
    np.testing.assert_array_equal(select_prompts("dense_square", pts, 0.1, "s", 1), by_func)
    lazy = select_prompts("stbench.prompts:dense_square_prompts", pts, 0.1, "s", 1)
    np.testing.assert_array_equal(lazy, by_func)
    with pytest.raises(ConfigError, match="unknown prompt strategy"):
        select_prompts("hexagons", pts, 0.1, "s", 1)


def test_select_prompts_bad_ratio_is_config_error():
    with pytest.raises(ConfigError):
        select_prompts(random_prompts, square_grid(), 1.5, "s", 0)


def test_select_prompts_bad_coords_is_data_error():
    with pytest.raises(DataError, match="slide 's'"):
        select_prompts(random_prompts, np.zeros((10, 3)), 0.1, "s", 0)
    bad = square_grid(4)
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        select_prompts(random_prompts, bad, 0.1, "s", 0)


@pytest.mark.parametrize(
    "returned",
    [
        lambda n, m: np.arange(n + 1),  # too many
        lambda n, m: np.arange(max(n - 1, 0)),  # too few
        lambda n, m: np.zeros(n, dtype=int),  # duplicates
        lambda n, m: np.arange(m - n + 1, m + 1),  # out of range
        lambda n, m: -np.arange(1, n + 1),  # negative
        lambda n, m: np.arange(n, dtype=float),  # not integers
        lambda n, m: np.arange(n).reshape(1, -1),  # not 1-D
    ],
    ids=["too-many", "too-few", "duplicates", "out-of-range", "negative", "float", "2-D"],
)
def test_select_prompts_validates_strategy_output(returned):
    pts = square_grid(10)

    def broken_strategy(coords, n, rng):
        return returned(n, len(coords))

    with pytest.raises(RuntimeError, match="broken_strategy"):
        select_prompts(broken_strategy, pts, 0.1, "s", 0)


def test_select_prompts_sorts_and_casts():
    def backwards(coords, n, rng):
        return np.arange(n, dtype=np.int32)[::-1]

    idx = select_prompts(backwards, square_grid(10), 0.1, "s", 0)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, np.arange(10))


def test_builtin_prompt_specs():
    specs = builtin_prompt_specs()
    assert [s.name for s in specs] == ["random", "poisson_disc", "sparse_square", "dense_square"]
    funcs = {s.name: resolve(s.func) for s in specs}
    assert funcs == {
        "random": random_prompts,
        "poisson_disc": poisson_disc_prompts,
        "sparse_square": sparse_square_prompts,
        "dense_square": dense_square_prompts,
    }
    for spec in specs:
        assert isinstance(spec, PromptSpec)
        assert spec.description and "\n" not in spec.description
        assert "AMB-27" in spec.description


# ---------------------------------------------------------------------------------------------------------
# properties of the strategies


def test_poisson_disc_spreads_spots_more_than_random():
    pts = square_grid()
    rand = [pdist(pts[random_prompts(pts, 90, np.random.default_rng(s))]).min() for s in range(20)]
    pois = [pdist(pts[poisson_disc_prompts(pts, 90, np.random.default_rng(s))]).min() for s in range(20)]
    assert np.mean(pois) > 1.5 * np.mean(rand)
    assert min(pois) >= 2.0  # on a unit grid 90 of 900 spots are always at least 2 apart


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_poisson_disc_spreads_spots_on_every_layout(layout):
    pts = LAYOUTS[layout]
    n = n_prompts(len(pts), 0.1)
    rand = np.mean([pdist(pts[random_prompts(pts, n, np.random.default_rng(s))]).min() for s in range(10)])
    pois = np.mean([pdist(pts[poisson_disc_prompts(pts, n, np.random.default_rng(s))]).min() for s in range(10)])
    assert pois > 1.5 * rand


def test_poisson_disc_vectorised_pass_equals_sequential_loop():
    rng = np.random.default_rng(3)
    pts = np.vstack([rng.random((1500, 2)) * 50, square_grid(20)])  # lattice part: exact distance ties
    thrower = _DartThrower(pts, rng.permutation(len(pts)), 2500.0)
    for r in (0.5, 1.0, 1.5, 2.0, 3.3, 3.0):
        vectorised = thrower(r)
        sequential = _dart_throw_sequential(pts, thrower.tree, thrower.order, r)
        np.testing.assert_array_equal(vectorised, sequential)
        chosen = pts[vectorised]
        assert pdist(chosen).min() >= r
        # maximal: every other spot is closer than r to some chosen spot
        others = np.setdiff1d(np.arange(len(pts)), vectorised)
        assert np.all(cKDTree(chosen).query(pts[others])[0] < r)


def test_poisson_disc_large_cloud():
    pts = np.random.default_rng(0).random((100_000, 2)) * 5000.0
    n = n_prompts(len(pts), 0.1)
    idx = poisson_disc_prompts(pts, n, np.random.default_rng(1))
    check_indices(idx, n, len(pts))
    # blue noise: nearest chosen neighbour far beyond what a random subset gets
    d_pois = cKDTree(pts[idx]).query(pts[idx], k=2)[0][:, 1]
    rnd = random_prompts(pts, n, np.random.default_rng(1))
    d_rand = cKDTree(pts[rnd]).query(pts[rnd], k=2)[0][:, 1]
    assert d_pois.min() > 5 * d_rand.min()


@pytest.mark.parametrize("n", [4, 5, 9, 10, 30, 90, 200])
def test_dense_square_is_a_compact_contiguous_square_on_a_grid(n):
    pts = square_grid()
    for seed in range(15):
        idx = dense_square_prompts(pts, n, np.random.default_rng(seed))
        chosen = pts[idx]
        ext = chosen.max(axis=0) - chosen.min(axis=0) + 1  # in grid steps, counting spots
        assert ext[0] * ext[1] <= 2 * n
        assert max(ext) <= math.ceil(math.sqrt(n)) + 1
        # every chosen spot has a chosen 4-neighbour, and the selection is one piece
        chosen_set = {tuple(p) for p in chosen.astype(int).tolist()}
        for x, y in chosen_set:
            assert {(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)} & chosen_set
        assert len(components(pts, idx, 1.01)) == 1


@pytest.mark.parametrize("n", [4, 10, 90, 200])
def test_dense_square_is_contiguous_on_a_hex_grid(n):
    pts = hex_grid()
    for seed in range(15):
        idx = dense_square_prompts(pts, n, np.random.default_rng(seed))
        chosen = pts[idx]
        ext = chosen.max(axis=0) - chosen.min(axis=0)
        assert (ext[0] + 1) * (ext[1] + 1) <= 2 * n
        assert len(components(pts, idx, 1.01)) == 1


def test_dense_square_positions_vary():
    pts = square_grid()
    centres = {tuple(pts[dense_square_prompts(pts, 90, np.random.default_rng(s))].mean(axis=0)) for s in range(20)}
    assert len(centres) > 10


@pytest.mark.parametrize("layout", ["square", "hex"])
@pytest.mark.parametrize("n", [8, 90, 91, 93, 200])
def test_sparse_square_four_clusters_one_per_quadrant(layout, n):
    pts = LAYOUTS[layout]
    mx, my = np.median(pts[:, 0]), np.median(pts[:, 1])
    for seed in range(10):
        idx = sparse_square_prompts(pts, n, np.random.default_rng(seed))
        check_indices(idx, n, len(pts))
        chosen = pts[idx]
        quadrant = (chosen[:, 0] > mx).astype(int) + 2 * (chosen[:, 1] > my)
        counts = np.bincount(quadrant, minlength=4)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n / 4) <= 1), counts
        for q in range(4):
            in_q = idx[quadrant == q]
            assert len(components(pts, in_q, 1.01)) == 1
            ext = pts[in_q].max(axis=0) - pts[in_q].min(axis=0) + 1
            assert ext[0] * ext[1] <= 2.5 * len(in_q) + 2


def test_sparse_square_clusters_are_separate_windows():
    """The four windows are four separate pieces unless two happen to touch across a median line."""
    pts = square_grid()
    separate = 0
    for seed in range(20):
        idx = sparse_square_prompts(pts, 90, np.random.default_rng(seed))
        separate += len(components(pts, idx, 1.01)) == 4
        assert 1 <= len(components(pts, idx, 1.01)) <= 4
    assert separate >= 10


def test_sparse_square_gives_a_small_quadrants_deficit_to_the_others():
    # tissue in the upper-left and lower-right blocks, three stray spots in each of the other quadrants
    block = square_grid(15)
    strays_ll = np.array([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    pts = np.vstack([block + [0.0, 15.0], block + [15.0, 0.0], strays_ll, strays_ll + 26.0])
    mx, my = np.median(pts[:, 0]), np.median(pts[:, 1])
    quadrant_of_spot = (pts[:, 0] > mx).astype(int) + 2 * (pts[:, 1] > my)
    assert np.bincount(quadrant_of_spot, minlength=4).tolist() == [3, 225, 225, 3]
    for seed in range(5):
        idx = sparse_square_prompts(pts, 90, np.random.default_rng(seed))
        check_indices(idx, 90, len(pts))
        counts = np.bincount(quadrant_of_spot[idx], minlength=4)
        assert counts[0] == 3 and counts[3] == 3
        assert abs(counts[1] - counts[2]) <= 1 and counts[1] + counts[2] == 84
        for q in (1, 2):
            assert len(components(pts, idx[quadrant_of_spot[idx] == q], 1.01)) == 1


@pytest.mark.parametrize(
    "n, capacities",
    [(40, [2, 100, 100, 100]), (10, [0, 0, 0, 50]), (90, [225, 225, 225, 225]), (7, [1, 1, 1, 4]),
     (3, [5, 5, 5, 5]), (0, [1, 2, 3, 4])],
)
def test_split_budget(n, capacities):
    for seed in range(5):
        shares = _split_budget(n, capacities, np.random.default_rng(seed))
        assert sum(shares) == n
        assert all(0 <= s <= c for s, c in zip(shares, capacities))
        # balanced among the windows that are not full
        free = [s for s, c in zip(shares, capacities) if s < c]
        if free:
            assert max(shares) - min(free) <= 1


def test_sparse_square_with_an_empty_quadrant():
    # spots on a vertical line: nothing lies right of the median x, two quadrants are empty
    pts = np.column_stack([np.zeros(40), np.arange(40.0)])
    idx = sparse_square_prompts(pts, 10, np.random.default_rng(0))
    check_indices(idx, 10, 40)
