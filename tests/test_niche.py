"""Niche expression profiles on both lattices (HyperST's niche, METHODS.md §7.1)."""

import numpy as np
import scipy.sparse as sp

from stbench.data.expression import make_slide, niche_expression
from stbench.data.model import Section


def _section(grid, counts, lattice):
    n = len(grid)
    return Section("S", "P", np.array([f"s{i}" for i in range(n)]), np.array(["G1", "G2"]),
                   sp.csr_matrix(np.asarray(counts, dtype=np.int64)), np.asarray(grid), np.zeros((n, 2)), None,
                   lattice=lattice)


def test_square_lattice_niche_is_the_3x3_block():
    grid = [(x, y) for y in range(3) for x in range(3)]  # a full 3x3 block: only the centre is complete
    counts = [[i, 10 * i] for i in range(9)]
    expr, complete = niche_expression(_section(grid, counts, "square"), np.array([0, 1]), "log2_raw")
    assert complete.tolist() == [False] * 4 + [True] + [False] * 4
    np.testing.assert_allclose(expr[4], np.log2(1 + np.array([4.0, 40.0])), rtol=1e-6)  # mean of 0..8
    # a corner's niche is itself and its 3 neighbours: mean raw counts, then the normalisation
    np.testing.assert_allclose(expr[0], np.log2(1 + np.mean([[0, 0], [1, 10], [3, 30], [4, 40]], axis=0)), rtol=1e-6)


def test_hex_lattice_niche_is_the_rosette():
    # Visium array coordinates: the centre (2, 1) and its six neighbours (x ± 2, y) and (x ± 1, y ± 1)
    grid = [(2, 1), (0, 1), (4, 1), (1, 0), (3, 0), (1, 2), (3, 2), (6, 1)]
    counts = [[7, 0]] + [[1, 1]] * 6 + [[100, 100]]
    expr, complete = niche_expression(_section(grid, counts, "hex"), np.array([0, 1]), "log2_raw")
    assert complete.tolist() == [True] + [False] * 7
    np.testing.assert_allclose(expr[0], np.log2(1 + np.array([13 / 7, 6 / 7])), rtol=1e-6)  # (6,1) is no neighbour


def test_niche_profile_uses_the_benchmarks_normalisation_of_mean_counts():
    grid = [(x, y) for y in range(3) for x in range(3)]
    counts = [[i + 1, 1] for i in range(9)]
    section = _section(grid, counts, "square")
    slide = make_slide(section, ["G1"], "cpm_log1p", niche=True)
    mean = np.mean(counts, axis=0)  # the centre's niche holds every spot
    np.testing.assert_allclose(slide.niche_expr[4, 0], np.log1p(mean[0] / mean.sum() * 1e6), rtol=1e-5)
    assert slide.masked(np.array([0])).niche_expr is None
