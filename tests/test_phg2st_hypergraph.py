"""PHG2ST hypergraphs (METHODS.md §8.2 (2)-(4)) and HGConv (§3), against independent computations."""

import itertools
import math

import numpy as np
import pytest
import torch
from stbench_plugins.phg2st.hypergraph import (
    HGConv,
    HypergraphConv,
    code_neighbour_hypergraphs,
    code_spot_hypergraph,
    dense_spot_hypergraph,
    neighbour_hypergraphs,
    spot_hypergraph,
)


def as_sets(edges, n):
    """Incidence -> {hyperedge id: set of nodes}, checking the layout (N hyperedges, centre first)."""
    assert edges.dtype == np.int64 and edges.shape[0] == 2
    out = {}
    for node, edge in edges.T:
        out.setdefault(int(edge), []).append(int(node))
    assert sorted(out) == list(range(n))
    assert all(nodes[0] == e for e, nodes in out.items())
    return {e: set(nodes) for e, nodes in out.items()}


def reference(features, coords, k):
    """§8.2 (2) written out over pairs in float64: hyperedge sets and weights (ties: lower index)."""
    n = len(features)
    sim = {(i, j): math.dist(features[i], features[j]) for i, j in itertools.permutations(range(n), 2)}
    pos = {(i, j): math.dist(coords[i], coords[j]) for i, j in itertools.permutations(range(n), 2)}

    def norm(d):
        lo, hi = min(d.values()), max(d.values())
        return {key: (v - lo) / (hi - lo) for key, v in d.items()}

    s, p = norm(sim), norm(pos)
    total = {key: s[key] + p[key] for key in s}
    sets, weights, gaps = {}, [], []
    for i in range(n):
        ranked = sorted((total[i, j], j) for j in range(n) if j != i)
        sets[i] = {i} | {j for _, j in ranked[:k]}
        weights.append(1 - 0.5 * np.mean([v for v, _ in ranked[:k]]))
        gaps.append(ranked[k][0] - ranked[k - 1][0])
    return sets, np.array(weights), min(gaps)


def smooth_slide(n, dim, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    y, x = np.divmod(np.arange(n), side)
    coords = np.stack([x, y], 1).astype(float)
    fields = np.sin(2 * np.pi * coords @ rng.normal(0, 3, (2, 8)) / side + rng.uniform(0, 6, 8))
    features = fields @ rng.standard_normal((8, dim)) / np.sqrt(8) + noise * rng.standard_normal((n, dim))
    return features.astype(np.float32), coords


# ---------------------------------------------------------------------------------------- spot hypergraph


def test_four_spots_by_hand():
    # Sim pairs: 01=10 02=1 03=11 12=9 13=1 23=10 -> (s-1)/10; Pos |i-j| -> (d-1)/2
    # I: 01=.9 02=.5 03=2 12=.8 13=.5 23=.9
    features, coords = np.array([[0.0], [10], [1], [11]]), np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    edges, weights = spot_hypergraph(features, coords, k=2)
    np.testing.assert_array_equal(edges, [[0, 2, 1, 1, 3, 2, 2, 0, 1, 3, 1, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_allclose(weights, [0.65, 0.675, 0.675, 0.65], atol=1e-6)
    assert weights.dtype == np.float32


@pytest.mark.parametrize("k", [2, 4])
def test_grid_slide_matches_pairwise_reference(k):
    coords = np.array([(x, y) for y in range(3) for x in range(3)], float) * 100  # µm: the unit is immaterial
    features = np.array([[0, 0], [1, 0], [0, 3], [2, 2], [5, 1], [1, 1], [4, 4], [0, 6], [3, 0.5]])
    sets, weights, gap = reference(features, coords, k)
    assert gap > 1e-4  # no near-tie at the k-th neighbour: the expected sets are well defined
    for fn in (spot_hypergraph, dense_spot_hypergraph):
        edges, w = fn(features, coords, k=k)
        assert as_sets(edges, 9) == sets
        np.testing.assert_allclose(w, weights, atol=1e-6)


def test_ties_go_to_the_lower_index():
    coords = np.array([(x, y) for y in range(3) for x in range(3)], float)
    flat = np.zeros((9, 4))  # I = Norm(Pos) only: the centre spot 4 has four neighbours at distance 1
    for edges, _ in (spot_hypergraph(flat, coords, k=2), dense_spot_hypergraph(flat, coords, k=2),
                     spot_hypergraph(flat, coords, k=2, exact_limit=2, n_candidates=4)):
        assert as_sets(edges, 9)[4] == {4, 1, 3}


def test_chunked_equals_dense():
    rng = np.random.default_rng(1)
    features, coords = rng.standard_normal((300, 48)).astype(np.float32), rng.uniform(0, 5000, (300, 2))
    dense = dense_spot_hypergraph(features, coords)
    for chunk in (None, 37, 300):
        edges, weights = spot_hypergraph(features, coords, chunk=chunk)
        np.testing.assert_array_equal(edges, dense[0])
        np.testing.assert_array_equal(weights, dense[1])


def test_large_slide_candidates_agree_with_dense():
    n, k = 6000, 4
    features, coords = smooth_slide(n, 64)
    edges, weights = spot_hypergraph(features, coords, k=k)  # n > exact_limit: candidate path
    members = edges[0].reshape(n, k + 1)
    assert (members[:, 0] == np.arange(n)).all() and (edges[1].reshape(n, k + 1) == np.arange(n)[:, None]).all()
    assert all(len(set(row)) == k + 1 for row in members)
    assert ((weights >= 0) & (weights <= 1)).all()
    dense = dense_spot_hypergraph(features, coords, k=k)[0][0].reshape(n, k + 1)
    agreement = np.mean([len(set(a[1:]) & set(b[1:])) for a, b in zip(members, dense)]) / k
    print(f"candidate path vs dense, {n} spots: {agreement:.4f} of hyperedge memberships agree")
    assert agreement >= 0.95
    np.testing.assert_array_equal(spot_hypergraph(features, coords, k=k)[0], edges)  # deterministic


def test_large_path_on_collinear_spots():
    # collinear coordinates: no convex hull (the diameter falls back to the ends); Pos decides alone
    coords = np.stack([np.arange(500.0), 2 * np.arange(500.0)], 1)
    flat = np.ones((500, 40), np.float32)
    edges, weights = spot_hypergraph(flat, coords, exact_limit=100)
    dense_edges, dense_weights = dense_spot_hypergraph(flat, coords)
    np.testing.assert_array_equal(edges, dense_edges)
    np.testing.assert_allclose(weights, dense_weights, atol=1e-6)


def test_tiny_slides_and_bad_input():
    edges, weights = spot_hypergraph(np.ones((1, 3)), np.zeros((1, 2)))
    assert edges.tolist() == [[0], [0]] and weights.tolist() == [1.0]
    edges, _ = spot_hypergraph(np.eye(3), np.eye(3)[:, :2], k=4)  # k clamped to N - 1
    assert as_sets(edges, 3) == {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}
    with pytest.raises(ValueError):
        spot_hypergraph(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        spot_hypergraph(np.ones((3, 2)), np.zeros((3, 3)))


# ----------------------------------------------------------------------------------- neighbour hypergraphs


def test_neighbour_hypergraphs_hand_example():
    features = torch.arange(25.0)[None, :, None].square().repeat(2, 1, 1)  # node u at u²
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 1] = False
    edges, _ = neighbour_hypergraphs(features, mask, k=2)
    sets = {}
    for node, edge in edges.T.tolist():
        sets.setdefault(edge, set()).add(node)
    assert sets[0] == {0, 1, 2} and sets[5] == {5, 4, 6} and sets[24] == {24, 23, 22}
    assert sets[25] == {25, 27, 28}  # spot 1: node 1 is masked, so node 0 takes nodes 2 and 3
    assert 26 not in sets and 26 not in edges[0].tolist()


def test_neighbour_hypergraphs_layout():
    torch.manual_seed(0)
    bsz, k = 3, 4
    features = torch.randn(bsz, 25, 6)
    mask = torch.rand(bsz, 25) > 0.3
    mask[2] = False
    mask[2, :3] = True  # fewer than k + 1 valid nodes: every hyperedge holds all of them
    edges, weights = neighbour_hypergraphs(features, mask, k=k)
    assert weights.shape == (bsz * 25,) and ((weights >= 0) & (weights <= 1)).all()
    assert edges.dtype == torch.long and edges.shape[0] == 2
    nodes, hedges = edges
    assert ((nodes // 25) == (hedges // 25)).all()  # never across spots
    valid = mask.reshape(-1)
    assert valid[nodes].all() and valid[hedges].all()
    assert set(hedges.tolist()) == set(torch.nonzero(valid).flatten().tolist())
    for e in hedges.unique().tolist():
        members = nodes[hedges == e]
        assert members[0] == e
        b, u = divmod(e, 25)
        n_valid = int(mask[b].sum())
        assert len(members) == min(k + 1, n_valid) == len(set(members.tolist()))
        others = [v for v in range(25) if mask[b, v] and v != u]
        d = {v: float((features[b, u] - features[b, v]).norm()) for v in others}
        nearest = sorted(others, key=lambda v: (d[v], v))[:k]
        assert set((members[1:] - 25 * b).tolist()) == set(nearest)
    assert neighbour_hypergraphs(features, None, k=k)[0].shape == (2, bsz * 25 * (k + 1))


def test_neighbour_hyperedge_weights_by_hand():
    # node u at feature u (1-D): distances |u - v|; valid nodes 0..24 except 1 (masked) for spot 1
    features = torch.arange(25.0)[None, :, None].repeat(2, 1, 1)
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 1] = False
    edges, weights = neighbour_hypergraphs(features, mask, k=2)
    # spot 0: off-diagonal distances 1..24 -> normalised (d - 1) / 23
    # e_0 = {0, 1, 2}: distances 1, 2 -> (0 + 1/23) / 2; e_12 = {12, 11, 13}: distances 1, 1 -> 0
    assert weights[0].item() == pytest.approx(1 - 0.5 / 23)
    assert weights[12].item() == pytest.approx(1.0)
    # spot 1 (node 1 masked): same range (min 1 between 2 and 3, max 24); e_0 = {0, 2, 3}: distances 2, 3
    assert weights[25].item() == pytest.approx(1 - (1 / 23 + 2 / 23) / 2)
    assert weights[26].item() == 1.0  # the masked node's hyperedge has no members
    unweighted_edges, ones = neighbour_hypergraphs(features, mask, k=2, weighted=False)
    assert torch.equal(unweighted_edges, edges) and (ones == 1).all()


def test_neighbour_weights_equal_when_all_distances_tie():
    features = torch.zeros(1, 25, 3)  # every distance 0: no range to normalise, every weight 1
    _, weights = neighbour_hypergraphs(features, None, k=4)
    assert (weights == 1).all()


def code_spot_reference(features, coords, k):
    """The PH2ST code's construction (METHODS.md §8.2 (2) code delta), row by row in float64."""
    n = len(features)
    incidences, scores = [], []
    for i in range(n):
        space = sorted((math.dist(coords[i], coords[j]), j) for j in range(n) if j != i)[:k]
        a = np.zeros(n)
        a[[j for _, j in space]] = 1
        delta = np.array([math.dist(features[i], features[j]) for j in range(n)])
        s = a / a.sum() + delta / delta.sum()
        top = sorted(range(n), key=lambda j: (-s[j], j))[: k + 1]
        incidences += [(i, j) for j in top]
        scores += [s[j] for j in top]
    n_edges = max(j for _, j in incidences) + 1
    return np.array(incidences).T, np.array(scores[:n_edges])


def test_code_spot_hypergraph_matches_the_code_row_by_row():
    rng = np.random.default_rng(3)
    coords = np.array([(x, y) for y in range(4) for x in range(5)], float) * 150.0
    coords += rng.uniform(-5, 5, coords.shape)  # no spatial ties
    features = rng.standard_normal((20, 6))
    edges, weights = code_spot_hypergraph(features, coords, k=4)
    want_edges, want_weights = code_spot_reference(features, coords, 4)
    np.testing.assert_array_equal(edges, want_edges)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5)
    # the structure METHODS.md describes: the 4 spatial neighbours and the most dissimilar other spot,
    # not i itself (for 20 spots a feature score δ/Σδ stays far below a neighbour's 1/4)
    members = edges[1].reshape(20, 5)
    for i in range(20):
        near = np.argsort(np.linalg.norm(coords - coords[i], axis=1))[1:5]
        delta = np.linalg.norm(features - features[i], axis=1)
        delta[near] = -1
        assert set(members[i]) == set(near) | {np.argmax(delta)} and i not in members[i]
    np.testing.assert_array_equal(code_spot_hypergraph(features, coords, k=4, chunk=3)[0], edges)  # row blocks


def test_code_neighbour_hypergraph_is_complete_with_cosine_weights():
    torch.manual_seed(1)
    features = torch.randn(2, 25, 4)
    features[1, 7] = 0  # a masked sub-patch: zero features
    edges, weights = code_neighbour_hypergraphs(features)
    unit = torch.nn.functional.normalize(features, dim=2)
    cos = unit @ unit.transpose(1, 2)
    # spot 0: every node in every hyperedge (25 identical hyperedges), hyperedge j weighs cos(0, j)
    spot0 = edges[:, edges[1] < 25]
    assert spot0.shape[1] == 625 and set(zip(*spot0.tolist())) == {(u, v) for u in range(25) for v in range(25)}
    torch.testing.assert_close(weights[:25], cos[0, 0])
    # spot 1: node 7 (zero features) is in no hyperedge and its hyperedge is empty
    spot1 = edges[:, edges[1] >= 25] - 25
    assert 7 not in spot1[0].tolist() and 7 not in spot1[1].tolist() and spot1.shape[1] == 24 * 24
    # PyG's reading of the per-incidence weights: hyperedge j takes the j-th incidence's cosine, and
    # row 0 holds 24 incidences (node 7 missing), so hyperedge 24 takes row 1's first, cos(1, 0)
    row0 = [cos[1, 0, v] for v in range(25) if v != 7]
    torch.testing.assert_close(weights[25:49], torch.stack(row0))
    torch.testing.assert_close(weights[49], cos[1, 1, 0])


# ---------------------------------------------------------------------------------------------- HGConv


@pytest.fixture
def hypergraph():
    torch.manual_seed(0)
    n, m = 7, 4
    incidence = torch.tensor([[0, 1, 2, 1, 2, 3, 4, 0, 5, 3, 4],
                              [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]])  # node 6 is in no hyperedge
    dense_h = torch.zeros(n, m)
    dense_h[incidence[0], incidence[1]] = 1
    return torch.randn(n, 5), incidence, dense_h, torch.tensor([0.3, 1.7, 0.9, 0.5])


def dense_formula(conv, x, h, w, weighted_messages):
    """D⁻¹ H W B⁻¹ Hᵀ X Θ + b (W dropped from the messages for PyG), with 1/0 read as 0."""
    inv = lambda t: torch.where(t == 0, 0.0, 1 / t)
    d, b = inv(h @ w), inv(h.sum(0))
    mid = torch.diag(b * w if weighted_messages else b)
    return torch.diag(d) @ h @ mid @ h.T @ x @ conv.lin.weight.T + conv.bias


@pytest.mark.parametrize("pyg_compat", [True, False])
def test_hgconv_matches_dense_formula(hypergraph, pyg_compat):
    x, incidence, h, w = hypergraph
    conv = HGConv(5, 3, pyg_compat=pyg_compat)
    torch.nn.init.normal_(conv.bias)
    expected = dense_formula(conv, x, h, w, weighted_messages=not pyg_compat)
    torch.testing.assert_close(conv(x, incidence, w), expected)


def test_hgconv_pyg_compat_is_pyg(hypergraph):
    x, incidence, _, w = hypergraph
    conv, pyg = HGConv(5, 3, pyg_compat=True), HypergraphConv(5, 3)
    torch.nn.init.normal_(conv.bias)
    pyg.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x, incidence, w), pyg(x, incidence, w), rtol=0, atol=0)


def test_hgconv_modes_agree_with_unit_weights(hypergraph):
    x, incidence, _, w = hypergraph
    compat, documented = HGConv(5, 3, pyg_compat=True), HGConv(5, 3, pyg_compat=False)
    documented.load_state_dict(compat.state_dict())
    torch.testing.assert_close(compat(x, incidence), documented(x, incidence))
    torch.testing.assert_close(compat(x, incidence, torch.ones(4)), documented(x, incidence, torch.ones(4)))
    assert not torch.allclose(compat(x, incidence, w), documented(x, incidence, w))
    with pytest.raises(ValueError):
        HGConv(5, 3, use_attention=True, pyg_compat=False)
    with pytest.raises(TypeError):  # one default for pyg_compat: PHG2STConfig's, none here
        HGConv(5, 3)
