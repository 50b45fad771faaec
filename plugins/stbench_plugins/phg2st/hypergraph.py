"""PHG2ST hypergraphs and hypergraph convolution (METHODS.md §3 "Hypergraph convolution", §8.2 (2)-(4)).

* :func:`spot_hypergraph`: the slide-level spot hypergraph, reconstruction [INF] of §8.2 (2) (AMB-20).
  Sim(i,j) = Euclidean distance between feature rows; Pos(i,j) = Euclidean distance between coordinates
  normalised to [0,1] by subtracting the minimum and dividing by the larger side of the bounding box
  (isotropic, so geometry is kept; after Norm any isotropic scaling is immaterial, i.e. µm, pixels and
  grid units give the same hypergraph); Norm = min-max over all off-diagonal pairs of the slide;
  I = Norm(Sim) + Norm(Pos). Hyperedge e_i = {i} ∪ the k spots j ≠ i with the smallest I (ties go to
  the lower index), weight w_i = 1 − ½·mean_{j∈e_i∖{i}} I(i,j) (in [0,1]; closer means heavier).
  N ≤ ``exact_limit`` (4,000): exact, in row chunks (memory O(chunk·N)). Larger slides: O(N·K) memory,
  exact I evaluated on candidate neighbours only (see the function's docstring). PHG2ST builds this
  graph once per slide, on the whole slide, so slides of more than 4,000 spots take the candidate path.
* :func:`dense_spot_hypergraph`: the same construction from full N×N matrices (reference, benchmark).
* :func:`code_spot_hypergraph`: the PH2ST code's spot hypergraph (option ``spot_hyperedges="code"``).
* :func:`neighbour_hypergraphs`: per spot, a weighted hypergraph on its 25 sub-patch nodes (§8.2 (4)).
* :func:`code_neighbour_hypergraphs`: the PH2ST code's complete neighbour hypergraphs with cosine
  weights (option ``neighbour_hyperedges="code"``).
* :class:`HGConv`: PyG's ``HypergraphConv`` with ``pyg_compat`` (§3): True = PyG (hyperedge weights only
  in the node degree D), False = the documented X′ = D⁻¹ H W B⁻¹ Hᵀ X Θ + b.

Hyperedge incidences are PyG's layout: row 0 = node ids, row 1 = hyperedge ids.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist
from torch import Tensor

with warnings.catch_warnings():  # recent torch deprecates torch.jit.script, which PyG calls on import
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from torch_geometric.nn import HypergraphConv
    from torch_geometric.utils import scatter

INF = float("inf")
#: elements of one (rows × N) block of the exact path: 16 MB in float32
_BLOCK_ELEMS = 1 << 22
#: elements of the large path's candidate gather buffer: 128 MB
_BUFFER_ELEMS = 1 << 25
#: large path: rows used to fit the PCA, principal components searched, random pairs for the Sim maximum
_PCA_ROWS, _PCA_DIMS, _SIM_PAIRS = 8192, 8, 8192


# ----------------------------------------------------------------------------------------------
# shared pieces: the dense and the chunked constructions call the same float32 operations on row
# blocks, so they produce identical hypergraphs (elementwise ops are exact; the Gram product of a row
# block equals the same rows of the full product with torch's CPU BLAS, which the tests check)


def shared_tensor(x: np.ndarray) -> Tensor:
    """A tensor on the memory of ``x``, also when ``x`` is read-only (a slide's arrays are shared
    across folds, and a 100,000-spot slide's neighbour features take GBs): callers never write into it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(x)


def _inputs(features, coords, k):
    f = np.ascontiguousarray(features, dtype=np.float32)  # no copy for float32 input (100k × 1024 = 400 MB)
    c = np.asarray(coords, dtype=np.float64)
    if f.ndim != 2 or c.shape != (len(f), 2):
        raise ValueError(f"need features (N, d) and coords (N, 2), got {f.shape} and {c.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (np.isfinite(f.sum(dtype=np.float64)) and np.isfinite(c).all()):
        raise ValueError("features and coords must be finite")
    c = c - c.min(0)
    side = c.max()
    c = c / side if side > 0 else c  # the larger side of the bounding box becomes 1
    return shared_tensor(f), torch.from_numpy(c.astype(np.float32)), min(k, len(f) - 1)


def _sim_block(x, sq, rows: slice):
    """Sim from `rows` to every spot, Gram form on centred features (x: (N,d), sq = row norms²)."""
    s = torch.addmm(sq, x[rows], x.T, alpha=-2)
    return s.add_(sq[rows, None]).clamp_(min=0).sqrt_()


def _pos_block(c, rows: slice):
    return torch.cdist(c[rows], c, compute_mode="donot_use_mm_for_euclid_dist")  # elementwise, exact


def _diag(rows: slice):
    r = torch.arange(rows.start, rows.stop)
    return r - rows.start, r


def _normalisers(smin, smax, pmin, pmax):
    scale = lambda lo, hi: 1.0 / (hi - lo) if hi > lo else 0.0
    smin, smax, pmin, pmax = map(float, (smin, smax, pmin, pmax))
    return smin, scale(smin, smax), pmin, scale(pmin, pmax)


def _combine(s, p, norm):
    """I = Norm(Sim) + Norm(Pos), in place in `s`."""
    smin, sa, pmin, pa = norm
    return s.sub_(smin).mul_(sa).add_(p.sub_(pmin).mul_(pa))


def _k_smallest(v, k):
    """Columns of the k smallest entries of each row, ordered by (value, column)."""
    top = v.topk(k, dim=1, largest=False).indices.sort(dim=1).values
    kth = v.gather(1, top).amax(1, keepdim=True)
    tied = (v <= kth).sum(1) > k  # another column ties the k-th value: topk's pick among ties is arbitrary
    if tied.any():
        top[tied] = v[tied].sort(dim=1, stable=True).indices[:, :k].sort(dim=1).values
    return top.gather(1, v.gather(1, top).sort(dim=1, stable=True).indices)


def _assemble(nbrs, values):
    """(N, k) neighbour ids and their I -> PyG incidence (centre first) and hyperedge weights."""
    n, k = nbrs.shape
    centre = torch.arange(n)
    nodes = torch.cat([centre[:, None], nbrs], 1).reshape(-1)
    edges = centre.repeat_interleave(k + 1)
    weights = (1 - 0.5 * values.double().mean(1)).clamp(0, 1).float()
    return torch.stack([nodes, edges]).numpy(), weights.numpy()


def _single(n):
    return np.zeros((2, n), np.int64), np.ones(n, np.float32)  # one spot: e_0 = {0}, weight 1


# ----------------------------------------------------------------------------------------------
# slide-level spot hypergraph


def dense_spot_hypergraph(features: np.ndarray, coords: np.ndarray, k: int = 4):
    """The construction of :func:`spot_hypergraph` from full N×N float32 matrices (N² × 4 bytes each)."""
    x, c, k = _inputs(features, coords, k)
    if len(x) == 1:
        return _single(1)
    x = x - x.mean(0)  # centring leaves distances unchanged and limits cancellation in the Gram form
    sq = x.square().sum(1)
    everything = slice(0, len(x))
    s, p = _sim_block(x, sq, everything), _pos_block(c, everything)
    eye = torch.eye(len(x), dtype=torch.bool)
    norm = _normalisers(s.masked_fill(eye, INF).min(), s.max(), p.masked_fill(eye, INF).min(), p.max())
    i = _combine(s, p, norm).fill_diagonal_(INF)
    nbrs = _k_smallest(i, k)
    return _assemble(nbrs, i.gather(1, nbrs))


def spot_hypergraph(features: np.ndarray, coords: np.ndarray, k: int = 4, exact_limit: int = 4000,
                    n_candidates: int = 32, *, chunk: int | None = None, seed: int = 0):
    """Slide-level spot hypergraph of PHG2ST (METHODS.md §8.2 (2), reconstruction [INF], AMB-20).

    Args:
        features: (N, d) spot features (Sim = Euclidean distance between rows).
        coords: (N, 2) spot coordinates, any unit.
        k: neighbours per hyperedge (clamped to N − 1); each hyperedge has k + 1 spots.
        exact_limit: up to this many spots the construction is exact.
        n_candidates: large slides only, spatial and feature candidates per spot (at least k).
        chunk: exact path only, rows per block (default: 4M elements per block).
        seed: large slides only, seed of the PCA rows and of the sampled pairs (deterministic).

    Returns:
        hyperedge_index (2, N·(k+1)) int64, row 0 node ids, row 1 hyperedge ids (e_i has id i and
        contains i, listed first, then its neighbours by increasing I); weights (N,) float32.

    N ≤ ``exact_limit``: exact (equal to :func:`dense_spot_hypergraph`), two passes over row blocks
    (normalisers, then selection), never more than chunk × N elements per matrix.

    N > ``exact_limit``: an approximation in O(N·n_candidates) memory.

    * Neighbours are exact within a candidate set: the union of each spot's ``n_candidates`` nearest
      spatial neighbours and its ``n_candidates`` nearest feature neighbours in the top ≤ 8 principal
      components (PCA fitted on ≤ 8192 sampled rows), both exact kNN by cKDTree. Sim and Pos of the
      candidates are exact. The result is close to the exact hypergraph when the top components
      carry the feature distances (measured: 99.2-99.4 % of memberships on smooth synthetic slides
      with noise variance half the signal's, 80 % with noise 8× the signal), not when noise spread
      over all dimensions dominates them.
    * Pos normalisers are exact: min = smallest nearest-neighbour distance, max = diameter (pairwise
      over the convex hull's vertices).
    * Sim normalisers are approximate scale constants: min = the smallest candidate distance;
      max = the largest over 8192 random pairs and over the distances from the two spots at the ends
      of the top principal direction to every spot (a lower bound of the true maximum).
    """
    x, c, k = _inputs(features, coords, k)
    n = len(x)
    if n == 1:
        return _single(1)
    if n <= exact_limit:
        return _exact(x, c, k, chunk or max(1, _BLOCK_ELEMS // n))
    return _approximate(x, c, k, min(max(n_candidates, k), n - 1), seed)


def _exact(x, c, k, chunk):
    n = len(x)
    x = x - x.mean(0)
    sq = x.square().sum(1)
    blocks = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    # pass 1: off-diagonal min and max of both distances over the whole slide
    lo_s = lo_p = INF
    hi_s = hi_p = 0.0
    for rows in blocks:
        s, p = _sim_block(x, sq, rows), _pos_block(c, rows)
        hi_s, hi_p = max(hi_s, float(s.max())), max(hi_p, float(p.max()))  # diagonal ≈ 0: harmless
        s[_diag(rows)], p[_diag(rows)] = INF, INF
        lo_s, lo_p = min(lo_s, float(s.min())), min(lo_p, float(p.min()))
    norm = _normalisers(lo_s, hi_s, lo_p, hi_p)
    # pass 2: I per block, k smallest per row
    nbrs, values = [], []
    for rows in blocks:
        i = _combine(_sim_block(x, sq, rows), _pos_block(c, rows), norm)
        i[_diag(rows)] = INF
        top = _k_smallest(i, k)
        nbrs.append(top)
        values.append(i.gather(1, top))
    return _assemble(torch.cat(nbrs), torch.cat(values))


def code_spot_hypergraph(features: np.ndarray, coords: np.ndarray, k: int = 4, *, chunk: int | None = None):
    """The PH2ST code's spot hypergraph (METHODS.md §8.2 (2), code delta; AMB-20), exact, in row blocks.

    For spot i: s_ij = a_ij / Σ_j a_ij + δ_ij / Σ_j δ_ij, with a = 1 for i's k nearest spots in space
    (self excluded; ties: lower index) and δ = Euclidean feature distance. The k + 1 largest s_ij over
    every j (ties: lower index) are i's incidences, node i in hyperedge j, largest first: the k spatial
    neighbours and the most dissimilar spot, i itself not included. Hyperedge j is the set of spots
    that chose j. The code passes s_ij per incidence, where PyG reads one weight per hyperedge id:
    hyperedge j weighs the j-th incidence's score (spot j // (k+1)'s (j mod (k+1))-th choice), over
    largest chosen id + 1 hyperedges (some empty).

    Returns the (2, N·(k+1)) incidence and the hyperedge weights as PyG reads them.
    """
    x, c, k = _inputs(features, coords, k)
    n = len(x)
    if n == 1:
        return _single(1)
    x = x - x.mean(0)
    sq = x.square().sum(1)
    chunk = chunk or max(1, _BLOCK_ELEMS // n)
    chosen, scores = [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        pos = _pos_block(c, rows)
        pos[_diag(rows)] = INF
        spatial = _k_smallest(pos, k)
        delta = _sim_block(x, sq, rows)
        delta[_diag(rows)] = 0.0
        total = delta.sum(1, keepdim=True)
        s = torch.where(total > 0, delta / total.clamp(min=1e-30), torch.zeros_like(delta))
        s.scatter_add_(1, spatial, torch.full(spatial.shape, 1.0 / k))
        top = _k_smallest(-s, min(k + 1, n))  # the largest scores, largest first
        chosen.append(top)
        scores.append(s.gather(1, top))
    chosen, scores = torch.cat(chosen), torch.cat(scores)
    width = chosen.shape[1]
    nodes = torch.arange(n).repeat_interleave(width)
    hyperedges = chosen.reshape(-1)
    per_incidence = scores.reshape(-1)
    n_edges = int(hyperedges.max()) + 1
    return torch.stack([nodes, hyperedges]).numpy(), per_incidence[:n_edges].float().numpy()


def _diameter(c):
    try:
        ends = c[ConvexHull(c).vertices]
    except QhullError:  # all spots on a line: its two ends along the principal axis
        u = c - c.mean(0)
        proj = u @ np.linalg.svd(u, full_matrices=False)[2][0]
        ends = c[[proj.argmin(), proj.argmax()]]
    return pdist(ends).max()


def _approximate(x, c, k, m, seed):
    n, d = x.shape
    rng = np.random.default_rng(seed)
    cn = c.numpy()
    # spatial candidates, and the exact Pos normalisers
    dist, near = cKDTree(cn).query(cn, k=m + 1, workers=-1)  # + 1: the spot itself (removed below)
    pmin, pmax = dist[:, 1].min(), _diameter(cn.astype(np.float64))
    # feature candidates: exact kNN in the top principal components (fitted on sampled rows). A kd-tree
    # needs few dimensions; brute force over 32 components took 15-20 s at 100,000 spots on 2 cores
    # (bound by writing the N² distances) for +0.03 % agreement with the exact hypergraph.
    mean = x.mean(0)
    fit = x[torch.from_numpy(np.sort(rng.choice(n, min(n, _PCA_ROWS), replace=False)))] - mean
    basis = torch.linalg.eigh(fit.T @ fit).eigenvectors[:, -min(_PCA_DIMS, d):]  # ascending eigenvalues
    z = x @ basis - mean @ basis
    zn = z.numpy()
    similar = cKDTree(zn).query(zn, k=m + 1, workers=-1)[1]
    # Sim maximum (a scale constant): random pairs, and every spot against the two ends of the top
    # principal direction (a double-sweep style lower bound of the diameter)
    ends = torch.stack([z[:, -1].argmin(), z[:, -1].argmax()])
    sq = torch.linalg.vector_norm(x, dim=1).square()
    from_ends = (sq[:, None] + sq[ends] - 2 * (x @ x[ends].T)).clamp(min=0).sqrt()
    a, b = torch.from_numpy(rng.integers(0, n, (2, _SIM_PAIRS)))
    smax = max(float(from_ends.max()), float(torch.linalg.vector_norm(x[a] - x[b], dim=1).max()))
    # candidates: sorted by id so that the stable sort below breaks ties by the lower id
    cand = torch.from_numpy(np.concatenate([near, similar], 1)).sort(dim=1).values
    invalid = cand == torch.arange(n)[:, None]
    invalid[:, 1:] |= cand[:, 1:] == cand[:, :-1]
    # exact Sim and Pos of the candidates, through one reused gather buffer
    width = cand.shape[1]
    rows = max(1, _BUFFER_ELEMS // (width * d))
    buf = torch.empty(rows * width, d)
    s = torch.empty(n, width)
    for r in range(0, n, rows):
        e = min(r + rows, n)
        g = torch.index_select(x, 0, cand[r:e].reshape(-1), out=buf[: (e - r) * width]).view(e - r, width, d)
        s[r:e] = torch.linalg.vector_norm(g.sub_(x[r:e, None]), dim=2)  # differences, not Gram: precise
    p = torch.linalg.vector_norm(c[cand] - c[:, None], dim=2)
    norm = _normalisers(s.masked_fill(invalid, INF).min(), smax, pmin, pmax)
    i = _combine(s, p, norm).masked_fill_(invalid, INF)
    order = i.sort(dim=1, stable=True).indices[:, :k]
    return _assemble(cand.gather(1, order), i.gather(1, order))


# ----------------------------------------------------------------------------------------------
# per-spot neighbour hypergraphs


def neighbour_hypergraphs(features: Tensor, mask: Tensor | None = None, k: int = 4, weighted: bool = True):
    """One hypergraph per spot on its sub-patch nodes (METHODS.md §8.2 (4)).

    Node u of spot b has id b·n + u (n = 25 for a 5×5 grid); its hyperedge has the same id and holds
    u and its k nearest valid sub-patches by Euclidean feature distance (ties: lower index). Masked
    nodes (outside the image) get no hyperedge and are in none; with fewer than k + 1 valid nodes a
    hyperedge holds all valid ones.

    Weights (``weighted``), as the spot hypergraph's (AMB-20): the spot's distances between valid
    sub-patches are min–max normalised over its off-diagonal pairs, and w_e = 1 − the mean normalised
    distance of e's other members to its centre (in [0, 1]; 1 when e holds only its centre or all
    distances are equal). Unweighted: every weight is 1.

    Returns the (2, nnz) incidence, centre first in each hyperedge, and the (B·n,) hyperedge weights
    (1 for the hyperedges of masked nodes, which have no members).
    """
    bsz, n, _ = features.shape
    f = features.detach().float()
    valid = torch.ones(bsz, n, dtype=torch.bool, device=f.device) if mask is None else mask.to(f.device, torch.bool)
    dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # exact: no Gram cancellation
    pair = valid[:, :, None] & valid[:, None, :]
    pair.diagonal(dim1=1, dim2=2).fill_(False)  # the centre is added explicitly
    dist.masked_fill_(~pair, INF)
    near = dist.sort(dim=2, stable=True)
    kk = min(k, n - 1)
    local = torch.arange(n, device=f.device)
    members = torch.cat([local.expand(bsz, n)[..., None], near.indices[..., :kk]], 2)  # (B, n, kk+1)
    chosen = near.values[..., :kk]
    keep = torch.cat([valid[..., None], chosen.isfinite()], 2)
    offset = torch.arange(bsz, device=f.device)[:, None, None] * n
    edges = (local[None, :, None] + offset).expand_as(members)
    incidence = torch.stack([(members + offset)[keep], edges[keep]])
    if not weighted:
        return incidence, f.new_ones(bsz * n)
    finite = dist.isfinite()
    lo = dist.masked_fill(~finite, INF).amin((1, 2))
    hi = dist.masked_fill(~finite, -INF).amax((1, 2))
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))[:, None, None]
    normed = ((chosen - lo[:, None, None]) / span).clamp(0, 1)
    ok = chosen.isfinite()
    n_members = ok.sum(2)
    mean = torch.where(ok, normed, torch.zeros_like(normed)).sum(2) / n_members.clamp(min=1)
    weights = torch.where(n_members > 0, 1 - mean, torch.ones_like(mean))
    return incidence, weights.reshape(-1)


def code_neighbour_hypergraphs(features: Tensor) -> tuple[Tensor, Tensor]:
    """The PH2ST code's neighbour hypergraph (METHODS.md §8.2 (4), code delta), one per spot.

    Every pair (u, v) of the spot's n sub-patches with a non-zero cosine similarity is an incidence,
    node u in hyperedge v, so each hyperedge holds every node: n identical hyperedges (a zero feature
    vector, i.e. a masked sub-patch, has cosine 0 with everything and drops out). The code passes the
    cosines per incidence (row-major), where PyG reads one weight per hyperedge id, so hyperedge j
    weighs the j-th incidence's cosine: cos(node 0, node j) when node 0 is valid. A spot with fewer
    than n incidences (at most 4 valid nodes; the code would fail) gets weight 1 past its last one.

    Ids are b·n + u as in :func:`neighbour_hypergraphs`. Returns the incidence and the (B·n,) weights.
    """
    bsz, n, _ = features.shape
    f = features.detach().float()
    unit = f / torch.linalg.vector_norm(f, dim=2, keepdim=True).clamp(min=1e-8)  # a zero vector stays 0
    cos = unit @ unit.transpose(1, 2)  # (B, n, n), as torch's cosine_similarity without its (B, n, n, d) buffer
    flat = cos.reshape(bsz, n * n)
    present = flat != 0
    b, pair = present.nonzero(as_tuple=True)  # row-major within each spot
    u, v = pair // n, pair % n
    incidence = torch.stack([b * n + u, b * n + v])
    # PyG's reading: hyperedge j of spot b takes the weight of that spot's j-th incidence
    rank = present.long().cumsum(1) - 1  # position of each present entry among its spot's incidences
    weights = f.new_ones(bsz, n)
    first = present & (rank < n)
    weights[first.nonzero(as_tuple=True)[0], rank[first]] = flat[first]
    return incidence, weights.reshape(-1)


# ----------------------------------------------------------------------------------------------
# hypergraph convolution


class HGConv(HypergraphConv):
    """PyG ``HypergraphConv`` with a switch for the hyperedge weights (METHODS.md §3).

    ``pyg_compat=True``: exactly PyG, whose messages ignore the hyperedge weights (they only enter the
    node degree D; PyG issue #6918). ``pyg_compat=False``: X′ = D⁻¹ H W B⁻¹ Hᵀ X Θ + b, the documented
    formula (no attention). With all-ones weights both are the same. ``pyg_compat`` has no default here:
    its one default is ``PHG2STConfig.pyg_compat``.
    """

    def __init__(self, in_channels: int, out_channels: int, *args, pyg_compat: bool, **kwargs):
        super().__init__(in_channels, out_channels, *args, **kwargs)
        self.pyg_compat = pyg_compat
        if self.use_attention and not pyg_compat:
            raise ValueError("HGConv: pyg_compat=False does not support attention")

    def forward(self, x: Tensor, hyperedge_index: Tensor, hyperedge_weight: Tensor | None = None,
                hyperedge_attr: Tensor | None = None, num_edges: int | None = None) -> Tensor:
        if self.pyg_compat:
            return super().forward(x, hyperedge_index, hyperedge_weight, hyperedge_attr, num_edges)
        n = x.size(0)
        if num_edges is None:
            num_edges = int(hyperedge_index[1].max()) + 1 if hyperedge_index.numel() > 0 else 0
        if hyperedge_weight is None:
            hyperedge_weight = x.new_ones(num_edges)
        x = self.lin(x)
        nodes, edges = hyperedge_index
        deg = scatter(hyperedge_weight[edges], nodes, dim=0, dim_size=n, reduce="sum")
        size = scatter(x.new_ones(edges.numel()), edges, dim=0, dim_size=num_edges, reduce="sum")
        inv = lambda t: torch.where(t == 0, torch.zeros_like(t), 1.0 / t)
        # the one difference from PyG: the node → hyperedge step is scaled by w_e / |e|, not 1 / |e|
        out = self.propagate(hyperedge_index, x=x, norm=inv(size) * hyperedge_weight, alpha=None,
                             size=(n, num_edges))
        out = self.propagate(hyperedge_index.flip([0]), x=out, norm=inv(deg), alpha=None, size=(num_edges, n))
        out = out.view(-1, self.out_channels)
        return out + self.bias if self.bias is not None else out
