"""PHG2ST slide parts (stbench_plugins.phg2st.chunks): contiguous cores, halos, the whole-slide
hypergraph restricted to each part (a border spot keeps exactly its whole-slide hyperedges)."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components
from scipy.sparse import coo_matrix
from stbench_plugins.phg2st.chunks import halo, restrict, slide_parts, spatial_chunks, spot_pitch
from stbench_plugins.phg2st.hypergraph import code_spot_hypergraph, spot_hypergraph
from stbench_plugins.phg2st.network import HypergraphBlock


def grid_slide(side=24, seed=0, dim=5, shuffle=True):
    rng = np.random.default_rng(seed)
    cells = np.array([(x, y) for y in range(side) for x in range(side)])
    if shuffle:  # spot order unrelated to position, as in real files
        cells = cells[rng.permutation(len(cells))]
    return cells, cells * 100.0, rng.standard_normal((len(cells), dim)).astype(np.float32)


def connected_on_grid(cells: np.ndarray) -> bool:
    """Are the cells one 4-connected component?"""
    index = {tuple(c): i for i, c in enumerate(cells)}
    rows, cols = [], []
    for i, (x, y) in enumerate(cells):
        for nb in ((x + 1, y), (x, y + 1)):
            if nb in index:
                rows.append(i)
                cols.append(index[nb])
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(cells), len(cells)))
    return connected_components(adj, directed=False)[0] == 1


@pytest.mark.parametrize("side,max_spots", [(24, 100), (23, 37), (10, 7)])
def test_cores_cover_once_and_are_contiguous(side, max_spots):
    cells, pos, _ = grid_slide(side)
    parts = spatial_chunks(pos, max_spots)
    assert max(len(p) for p in parts) <= max_spots
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(pos)))
    for p in parts:  # ties at the median are split along a line: every core is one connected patch
        assert connected_on_grid(cells[p])


def test_cores_on_scattered_spots_are_disjoint_boxes():
    pos = np.random.default_rng(0).uniform(0, 1000, size=(10_001, 2))
    parts = spatial_chunks(pos, 2048)
    assert max(len(p) for p in parts) <= 2048
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(pos)))
    boxes = [(pos[p].min(0), pos[p].max(0)) for p in parts]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):  # no two bounding boxes overlap (with generic coordinates)
            overlap = np.minimum(boxes[a][1], boxes[b][1]) - np.maximum(boxes[a][0], boxes[b][0])
            assert (overlap < 0).any()


def test_halo_is_the_ring_within_the_radius():
    cells, pos, _ = grid_slide(10, shuffle=False)
    assert spot_pitch(pos) == 100.0
    core = np.flatnonzero((cells[:, 0] < 5) & (cells[:, 1] < 5))
    ring = halo(pos, core, 200.0)
    d = np.array([np.min(np.linalg.norm(pos[core] - p, axis=1)) for p in pos])
    expected = np.flatnonzero((d > 0) & (d <= 200.0))
    np.testing.assert_array_equal(ring, expected)
    assert halo(pos, core, 0.0).size == 0


def hyperedges_of(node, edges, weights, ids=None):
    """The hyperedges holding ``node`` as a multiset of (frozenset of members, weight)."""
    ids = np.arange(edges[0].max() + 1) if ids is None else ids
    members = {}
    for u, e in edges.T:
        members.setdefault(int(e), set()).add(int(ids[u]))
    return Counter((frozenset(m), round(float(weights[e]), 6)) for e, m in members.items() if node in m)


@pytest.mark.parametrize("build,hops", [(spot_hypergraph, 1), (code_spot_hypergraph, 1), (code_spot_hypergraph, 2)])
def test_every_core_spot_keeps_its_whole_slide_hyperedges(build, hops):
    cells, pos, feats = grid_slide(20)
    edges, weights = build(feats, pos, k=4)
    parts = slide_parts(pos, edges, weights, max_spots=60, halo_pitches=2, hops=hops)
    assert len(parts) > 4
    border = 0
    for part in parts:
        assert np.array_equal(part.local[: len(part.core)], part.core)
        assert np.array_equal(part.inputs[: len(part.local)], part.local)
        for i in part.core:
            here = hyperedges_of(i, part.edges, part.weights, ids=part.inputs)
            assert here == hyperedges_of(i, edges, weights), i
        border += len(np.setdiff1d(part.inputs, part.core))
    assert border > 0  # the parts do read spots beyond their cores


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_the_hypergraph_block_of_a_part_equals_the_whole_slide(variant):
    torch.manual_seed(0)
    cells, pos, feats = grid_slide(16, dim=8)
    edges, weights = spot_hypergraph(feats, pos, k=4)
    block = HypergraphBlock(8, 0.0, pyg_compat=False, variant=variant).eval()  # code: two convolutions
    x = torch.from_numpy(feats)
    whole = block(x, torch.from_numpy(edges), torch.from_numpy(weights))
    for part in slide_parts(pos, edges, weights, max_spots=40, halo_pitches=1, hops=block.hops):
        out = block(x[torch.from_numpy(part.inputs)], torch.from_numpy(part.edges), torch.from_numpy(part.weights))
        # exact at the core and the halo (what the global encoder reads); only the extra inputs differ
        torch.testing.assert_close(out[: len(part.local)], whole[torch.from_numpy(part.local)], rtol=1e-5, atol=1e-6)


def test_restrict_keeps_only_what_is_read():
    # hyperedges 0 = {0, 1}, 1 = {1, 2}, 2 = {2, 3}, 3 = {3, 4} on a path of 5 spots
    edges = np.array([[0, 1, 1, 2, 2, 3, 3, 4], [0, 0, 1, 1, 2, 2, 3, 3]])
    weights = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    inputs, incidence, w = restrict(edges, weights, 5, np.array([0]), hops=1)
    assert inputs.tolist() == [0, 1] and incidence.tolist() == [[0, 1], [0, 0]] and w.tolist() == [np.float32(0.1)]
    inputs, incidence, w = restrict(edges, weights, 5, np.array([0]), hops=2)
    assert inputs.tolist() == [0, 1, 2] and w.tolist() == [np.float32(0.1), np.float32(0.2)]
    inputs, incidence, w = restrict(edges, weights, 5, np.array([2, 0]), hops=0)
    assert inputs.tolist() == [2, 0] and incidence.shape == (2, 0) and w.size == 0


def test_a_small_slide_is_one_part_without_halo():
    cells, pos, feats = grid_slide(8)
    edges, weights = spot_hypergraph(feats, pos)
    (part,) = slide_parts(pos, edges, weights, max_spots=64, halo_pitches=2, hops=1)
    assert np.array_equal(part.core, np.arange(64)) and np.array_equal(part.local, part.core)
    assert np.array_equal(part.inputs, part.core) and np.array_equal(part.edges, edges)
