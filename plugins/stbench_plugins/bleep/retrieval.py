"""BLEEP's prediction by retrieval (METHODS.md §5, inference): top-k reference spots by cosine similarity.

A :class:`ReferenceSet` holds the reference spots' embeddings (as the spot head gives them: kept as unit
vectors and their lengths) and expression vectors. :meth:`ReferenceSet.predict` L2-normalises the
queries, finds each query's ``k`` most similar reference spots and aggregates their expression:

* ``average``: the unweighted mean of the ``k`` expression vectors (BLEEP's and TRIPLEX's default);
* ``simple``: the expression of the single most similar spot (``k`` = 1);
* ``weighted_average``: weights w_j = exp(−(‖e_rj − e_q‖² − ‖e_r1 − e_q‖² + 1)) over the top ``k``
  (r1 = the most similar spot), with Euclidean distances between the *unnormalised* embeddings,
  prediction Σ_j w_j y_j / Σ_j w_j. Computed as a softmax of the exponents, which is the same number
  without overflow (the exponent is positive when a spot lower in cosine order is nearer in distance).

``k`` larger than the reference set uses every reference spot.

Scaling: the search never loops over reference spots in Python. Queries are processed in chunks of
``query_chunk`` and the reference in chunks of ``reference_chunk``: one matrix product per pair of
chunks, ``torch.topk`` on it, and a running top-k merged across reference chunks, so memory is
O(query_chunk × reference_chunk) beyond the data itself. The distances of ``weighted_average`` come
from the cosine, the lengths and the query's norm (‖r − q‖² = ‖r‖² + ‖q‖² − 2‖r‖‖q‖ cos), with no
gather of embedding rows. Extra spots (a test slide's prompts) are added as a second block without
copying the cached reference (:meth:`ReferenceSet.extended`).
"""

from __future__ import annotations

import torch

from stbench.errors import ConfigError
from stbench_plugins.bleep import AGGREGATES

#: queries per matrix product, and reference spots per product: a 1,024 × 16,384 float32 block is 64 MiB
QUERY_CHUNK = 1024
REFERENCE_CHUNK = 16384
_EPS = 1e-12


def l2_normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit rows, row lengths) of a float matrix; a zero row stays zero."""
    norm = x.norm(dim=1)
    return x / norm.clamp_min(_EPS).unsqueeze(1), norm


class ReferenceSet:
    """Reference spots: ``embeddings`` (M, P) from the spot head and ``expression`` (M, G), row-aligned.

    Kept as blocks (the cached fold reference, then any extra spots), each as unit vectors, lengths and
    expression; indices returned by :meth:`search` run over the blocks in order.
    """

    def __init__(self, embeddings: torch.Tensor, expression: torch.Tensor):
        if len(embeddings) != len(expression):
            raise ValueError(f"{len(embeddings)} reference embeddings but {len(expression)} expression vectors")
        unit, norm = l2_normalise(embeddings.float())
        self.blocks = [(unit, norm, expression.float())]

    def extended(self, embeddings: torch.Tensor, expression: torch.Tensor) -> "ReferenceSet":
        """This reference set plus more spots (a new object; this one and its tensors are not changed)."""
        out = ReferenceSet.__new__(ReferenceSet)
        out.blocks = self.blocks + ReferenceSet(embeddings, expression).blocks
        return out

    def __len__(self) -> int:
        return sum(len(unit) for unit, _, _ in self.blocks)

    @property
    def n_genes(self) -> int:
        return self.blocks[0][2].shape[1]

    def _chunks(self, reference_chunk: int):
        """(global offset, unit vectors) of each reference chunk, over all blocks."""
        offset = 0
        for unit, _, _ in self.blocks:
            for start in range(0, len(unit), reference_chunk):
                yield offset + start, unit[start:start + reference_chunk]
            offset += len(unit)

    def _gather(self, part: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (any shape, global indices) of block field ``part`` (1 = lengths, 2 = expression)."""
        if len(self.blocks) == 1:
            return self.blocks[0][part][idx]
        first = self.blocks[0][part]
        out = first.new_empty(idx.shape + first.shape[1:])
        offset = 0
        for block in self.blocks:
            values = block[part]
            inside = (idx >= offset) & (idx < offset + len(values))
            out[inside] = values[idx[inside] - offset]
            offset += len(values)
        return out

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, query_chunk: int = QUERY_CHUNK,
               reference_chunk: int = REFERENCE_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each query row: the ``min(k, M)`` most similar reference spots by cosine similarity,
        most similar first. Returns (similarities (Q, k), indices (Q, k), squared Euclidean distances
        between the unnormalised embeddings (Q, k))."""
        k = min(int(k), len(self))
        sims, idxs, dists = [], [], []
        for start in range(0, len(queries), query_chunk):
            q = queries[start:start + query_chunk].float()
            q_unit, q_norm = l2_normalise(q)
            best_sim = best_idx = None
            for offset, ref in self._chunks(reference_chunk):
                sim = q_unit @ ref.T
                top_sim, top_idx = torch.topk(sim, min(k, sim.shape[1]), dim=1)
                top_idx = top_idx + offset
                if best_sim is not None:  # merge with the best of the earlier reference chunks
                    both = torch.cat([best_sim, top_sim], 1)
                    top_sim, pick = torch.topk(both, min(k, both.shape[1]), dim=1)
                    top_idx = torch.gather(torch.cat([best_idx, top_idx], 1), 1, pick)
                best_sim, best_idx = top_sim, top_idx
            r_norm = self._gather(1, best_idx)
            qn = q_norm.unsqueeze(1)
            dist = (r_norm ** 2 + qn ** 2 - 2 * r_norm * qn * best_sim).clamp_min(0.0)
            sims.append(best_sim)
            idxs.append(best_idx)
            dists.append(dist)
        return torch.cat(sims), torch.cat(idxs), torch.cat(dists)

    @torch.no_grad()
    def predict(self, queries: torch.Tensor, k: int, aggregate: str = "average", query_chunk: int = QUERY_CHUNK,
                reference_chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
        """(Q, G) predicted expression of each query embedding."""
        if aggregate not in AGGREGATES:
            raise ConfigError(f"bleep: aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r} "
                              "(key methods.bleep.aggregate)")
        if aggregate == "simple":
            k = 1
        out = self.blocks[0][2].new_empty((len(queries), self.n_genes))
        for start in range(0, len(queries), query_chunk):
            _, idx, dist = self.search(queries[start:start + query_chunk], k, query_chunk, reference_chunk)
            out[start:start + query_chunk] = aggregate_neighbours(self._gather(2, idx), dist, aggregate)
        return out


def aggregate_neighbours(expression: torch.Tensor, sq_distance: torch.Tensor, aggregate: str) -> torch.Tensor:
    """(Q, G) from the neighbours' expression (Q, k, G), most similar first, and their squared distances
    to the query (Q, k) (used by ``weighted_average`` only)."""
    if aggregate == "simple":
        return expression[:, 0]
    if aggregate == "average":
        return expression.mean(1)
    if aggregate == "weighted_average":
        exponent = -(sq_distance.double() - sq_distance[:, :1].double() + 1.0)
        weights = torch.softmax(exponent, dim=1).to(expression.dtype)  # exp(e_j) / Σ exp(e_j)
        return (weights.unsqueeze(-1) * expression).sum(1)
    raise ConfigError(f"bleep: aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r} "
                      "(key methods.bleep.aggregate)")
