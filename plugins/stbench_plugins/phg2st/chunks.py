"""Slide parts: how PHG2ST runs a slide of more than ``max_spots`` spots (not in the sources).

The PH2ST code encodes every slide whole and splits only the per-spot inputs (METHODS.md §8.4); a
slide-level attention over 100,000 spots does not fit a CPU budget, so stbench cuts large slides into
parts, keeping what the sources compute wherever that is cheap:

* the spot hypergraph is built once on the whole slide (its Norm min–max over the slide, every spot's
  hyperedges as the slide has them), then restricted to each part;
* a part's *core* is a spatially contiguous set of at most ``max_spots`` spots (:func:`spatial_chunks`,
  median bisection); the core's spots are scored and in the loss, each spot in exactly one core;
* its *halo* (:func:`halo`) is the spots within ``halo`` spot pitches of the core: the global encoder
  reads them (PEG neighbours and attention context at the core's border) but they are neither scored
  nor in the loss;
* the hypergraph convolution also reads the members of every hyperedge that reaches the core or the
  halo (``hops`` times over for stacked convolutions, :func:`restrict`), so its output at every spot of
  the part is exactly the whole-slide output.

What remains approximate at a border: self-attention sees the core and its halo, not the whole slide.
A slide of at most ``max_spots`` spots is one part: the whole slide, no halo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


def spatial_chunks(positions: np.ndarray, max_spots: int) -> list[np.ndarray]:
    """Spatially contiguous parts of at most ``max_spots`` spots, by median bisection.

    Each split halves a part along the longer side of its bounding box, ordering spots by that
    coordinate and then by the other one, so spots tied at the median are split along a line: on a grid
    every part is a connected set of cells. Parts are returned sorted, in order of their first spot.
    """
    if max_spots < 1:
        raise ValueError(f"max_spots must be >= 1, got {max_spots}")
    parts, todo = [], [np.arange(len(positions))]
    while todo:
        idx = todo.pop()
        if len(idx) <= max_spots:
            parts.append(np.sort(idx))
            continue
        pts = positions[idx]
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        order = idx[np.lexsort((pts[:, 1 - axis], pts[:, axis]))]
        half = len(order) // 2
        todo += [order[:half], order[half:]]
    return sorted(parts, key=lambda p: p[0])


def spot_pitch(positions: np.ndarray, tree: cKDTree | None = None) -> float:
    """The median distance from a spot to its nearest other spot (0 for fewer than two spots)."""
    if len(positions) < 2:
        return 0.0
    tree = tree or cKDTree(positions)
    return float(np.median(tree.query(positions, k=2)[0][:, 1]))


def halo(positions: np.ndarray, core: np.ndarray, radius: float, tree: cKDTree | None = None) -> np.ndarray:
    """Sorted indices of the spots outside ``core`` within ``radius`` of a core spot."""
    if radius <= 0 or len(core) == len(positions):
        return np.zeros(0, np.int64)
    tree = tree or cKDTree(positions)
    near = np.zeros(len(positions), bool)
    for hits in tree.query_ball_point(positions[core], r=radius * (1 + 1e-9)):
        near[hits] = True
    near[core] = False
    return np.flatnonzero(near)


def restrict(edges: np.ndarray, weights: np.ndarray, n_nodes: int, local: np.ndarray, hops: int):
    """The part of a slide's hypergraph that ``hops`` stacked convolutions read at the ``local`` spots.

    Args:
        edges: (2, nnz) incidence of the whole slide, row 0 node ids, row 1 hyperedge ids.
        weights: (E,) hyperedge weights, indexed by hyperedge id.
        n_nodes: spots in the slide.
        local: the spots whose output must be exact.
        hops: hypergraph convolutions in a row (0: none, nothing is read).

    Returns:
        inputs: the ``local`` spots first (in their order), then the spots only the convolution reads
        (sorted); incidence: (2, nnz') in the numbering of ``inputs`` and of the kept hyperedges;
        weights of the kept hyperedges. A kept hyperedge keeps all its members, so the degree of
        every local spot (and, for stacked convolutions, of every spot it reads) is the whole slide's.
    """
    local = np.asarray(local, dtype=np.int64)
    nodes, hedges = np.asarray(edges[0]), np.asarray(edges[1])
    need = np.zeros(n_nodes, bool)
    need[local] = True
    keep_edge = np.zeros(len(weights), bool)
    for _ in range(hops):
        keep_edge[hedges[need[nodes]]] = True  # hyperedges that reach a needed spot ...
        need[nodes[keep_edge[hedges]]] = True  # ... and all their members
    extra = need.copy()
    extra[local] = False
    inputs = np.concatenate([local, np.flatnonzero(extra)])
    node_id = np.full(n_nodes, -1, np.int64)
    node_id[inputs] = np.arange(len(inputs))
    kept = np.flatnonzero(keep_edge)
    edge_id = np.full(len(weights), -1, np.int64)
    edge_id[kept] = np.arange(len(kept))
    on = keep_edge[hedges]
    incidence = np.stack([node_id[nodes[on]], edge_id[hedges[on]]])
    return inputs, incidence, np.asarray(weights)[kept]


@dataclass
class SlidePart:
    """One part of a slide, in slide spot indices (see the module docstring)."""

    #: scored spots, sorted
    core: np.ndarray
    #: the core then its halo: what the global encoder reads
    local: np.ndarray
    #: ``local`` then the spots only the hypergraph convolution reads
    inputs: np.ndarray
    #: the spot hypergraph in the numbering of ``inputs`` (row 0) and of its own hyperedges (row 1)
    edges: np.ndarray
    weights: np.ndarray


def slide_parts(positions: np.ndarray, edges: np.ndarray, weights: np.ndarray, max_spots: int, halo_pitches: float,
                hops: int) -> list[SlidePart]:
    """The parts of one slide (see the module docstring): cores of at most ``max_spots`` spots, halos of
    ``halo_pitches`` spot pitches, the whole-slide hypergraph restricted to each."""
    n = len(positions)
    cores = spatial_chunks(positions, max_spots)
    tree = cKDTree(positions) if len(cores) > 1 else None
    radius = halo_pitches * spot_pitch(positions, tree) if tree is not None else 0.0
    parts = []
    for core in cores:
        local = np.concatenate([core, halo(positions, core, radius, tree)]) if tree is not None else core
        inputs, incidence, w = restrict(edges, weights, n, local, hops)
        parts.append(SlidePart(core, local, inputs, incidence, w))
    return parts
