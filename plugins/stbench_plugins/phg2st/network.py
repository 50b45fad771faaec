"""The PHG2ST network (METHODS.md §8.2) and its loss (§8.3).

The forward pass has three parts, so that the spot branch can run on a slide part (a chunk with its
halo, see :mod:`stbench_plugins.phg2st.chunks`) while the per-spot parts run on any set of spots:

* :meth:`PHG2STNet.encode_spots`: eq. 3 on the spot hypergraph, then the global encoder (§8.2 (5))
  over the spots of a slide part → T_s;
* :meth:`PHG2STNet.encode_neighbours`: eq. 4 on each spot's 5×5 neighbour hypergraph, then the
  neighbour encoder → T_n (25 tokens per spot);
* :meth:`PHG2STNet.fuse`: the prompt projection (eq. 1), the prompt-guided cross-attention (eq. 5), the
  fusion (eq. 6) and the heads → p_Z and the branch predictions of the loss (eqs. 7–10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stbench.nn import CrossEncoder, GlobalEncoder, NeighborEncoder, PromptProjection, SelfAttention, init_vit_style
from stbench_plugins.phg2st.hypergraph import HGConv

#: hidden width of the PH2ST code's two-layer hypergraph block
CODE_HIDDEN = 512


def uniform_dropout(x: torch.Tensor, p: float, active: bool) -> torch.Tensor:
    """Dropout with the distribution of ``F.dropout`` (each element kept with probability 1 − p and
    scaled by 1/(1 − p)), its mask drawn as uniform numbers ≥ p. On a CPU torch draws Bernoulli masks
    element by element: 9.5 ns per element against 3.1 ns for uniform numbers (measured here), which
    made dropout masks 29 % of a 2,048-spot training step at width 128. Other random numbers than
    ``F.dropout`` draws, so results differ from ``dropout_masks="torch"`` as two seeds do."""
    if not active or p == 0:
        return x
    if p >= 1:
        return x * 0
    keep = torch.empty(x.shape, device=x.device).uniform_() >= p
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def _torch_dropout(x: torch.Tensor, p: float, active: bool) -> torch.Tensor:
    return F.dropout(x, p, active)


class UniformDropout(nn.Module):
    """``nn.Dropout`` through :func:`uniform_dropout` (PHG2STConfig.dropout_masks="uniform")."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return uniform_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HypergraphBlock(nn.Module):
    """Paper (eqs. 3-4): Dropout(LN(ReLU(HGConv(x)))). Code: HGConv(D→512) → ReLU → LN → Dropout →
    HGConv(512→D) + x.

    ``eval_dropout``: the dropout stays active in evaluation mode, as in the PH2ST code (functional
    dropout called without the training flag).
    """

    def __init__(self, dim: int, dropout: float, pyg_compat: bool, variant: str, eval_dropout: bool = False,
                 uniform_masks: bool = False):
        super().__init__()
        self.variant, self.p, self.eval_dropout = variant, dropout, eval_dropout
        self.dropout = uniform_dropout if uniform_masks else _torch_dropout
        if variant == "paper":
            self.conv = HGConv(dim, dim, pyg_compat=pyg_compat)
            self.norm = nn.LayerNorm(dim)
        else:
            self.conv = HGConv(dim, CODE_HIDDEN, pyg_compat=pyg_compat)
            self.norm = nn.LayerNorm(CODE_HIDDEN)
            self.conv2 = HGConv(CODE_HIDDEN, dim, pyg_compat=pyg_compat)

    #: hypergraph convolutions in a row: a node's output depends on hyperedges this many hops away
    @property
    def hops(self) -> int:
        return 1 if self.variant == "paper" else 2

    def forward(self, x, edges, weights=None):
        """``weights``: one per hyperedge id (hyperedges without members included)."""
        n_edges = len(weights) if weights is not None else None
        h = self.dropout(self.norm(F.relu(self.conv(x, edges, weights, num_edges=n_edges))), self.p,
                         self.training or self.eval_dropout)
        if self.variant == "paper":
            return h
        return self.conv2(h, edges, weights, num_edges=n_edges) + x


class AttentionWithDropout(SelfAttention):
    """The shared self-attention with dropout on the attention probabilities, as in the PH2ST code's
    global encoder (flash attention called with ``dropout_p`` = its dropout2, 0.3). ``at_eval``: also in
    evaluation mode (flash attention applies ``dropout_p`` whatever the mode)."""

    def __init__(self, dim: int, heads: int, dropout: float, attn_dropout: float, at_eval: bool = False,
                 uniform_masks: bool = False):
        super().__init__(dim, heads, dropout)
        self.attn_dropout, self.at_eval, self.uniform_masks = attn_dropout, at_eval, uniform_masks

    def forward(self, x, bias=None, key_mask=None):
        if bias is not None or key_mask is not None:
            raise ValueError("the global encoder's attention takes no bias and no key mask")
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if (self.training or self.at_eval) else 0.0
        if p > 0 and self.uniform_masks and not x.is_cuda:
            # the explicit attention (torch's own path when dropout_p > 0 on a CPU), uniform masks
            probs = (q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)).softmax(-1)
            y = uniform_dropout(probs, p, True) @ v
        else:  # fused kernels: without dropout on a CPU, with it on a GPU
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def global_encoder(cfg, dim: int) -> GlobalEncoder:
    """The TRIPLEX/PH2ST global encoder (1 block → PEG → depth−1 blocks → LN) with attention dropout."""
    enc = GlobalEncoder(dim, cfg.depth_global, cfg.heads_global, cfg.mlp_ratio_global, cfg.dropout_global)
    for block in (enc.first, *enc.rest):
        block.attn = AttentionWithDropout(dim, cfg.heads_global, cfg.dropout_global, cfg.attn_dropout_global,
                                          at_eval=cfg.eval_dropout, uniform_masks=cfg.dropout_masks == "uniform")
    return enc


def use_uniform_dropout(module: nn.Module) -> None:
    """Replace every ``nn.Dropout`` under ``module`` by a :class:`UniformDropout` of the same rate."""
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, UniformDropout(child.p))
        else:
            use_uniform_dropout(child)


class PHG2STNet(nn.Module):
    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        # UNI features (1024) enter as they are; other encoders' features are projected to the width
        self.proj = nn.Identity() if in_dim == d else nn.Linear(in_dim, d)
        uniform = cfg.dropout_masks == "uniform"
        block = lambda: HypergraphBlock(d, cfg.dropout_hypergraph, cfg.pyg_compat, cfg.hgnn_variant, cfg.eval_dropout,
                                        uniform_masks=uniform)
        self.spot_hg = block() if cfg.use_spot_hypergraph else None
        self.nb_hg = block() if cfg.use_neighbour_hypergraph else None
        self.global_enc = global_encoder(cfg, d)
        self.nb_enc = NeighborEncoder(d, cfg.depth_neighbour, cfg.heads_neighbour, cfg.mlp_ratio_neighbour, cfg.dropout_neighbour)
        if cfg.use_prompt:
            self.prompt = PromptProjection(n_genes, d, cfg.dropout_prompt, residual=cfg.prompt_residual)
        else:  # ablation: one learned query for every spot, so the prompts cannot inform anything
            self.query = nn.Parameter(torch.zeros(d))
        self.cross = CrossEncoder(d, cfg.depth_cross, cfg.heads_cross, cfg.mlp_ratio_cross, cfg.dropout_cross)
        self.fusion_norm = nn.LayerNorm(d) if cfg.fusion == "code" else None
        self.head_z, self.head_spot, self.head_nb = nn.Linear(d, n_genes), nn.Linear(d, n_genes), nn.Linear(d, n_genes)
        self.head_prompt = nn.Linear(d, n_genes) if cfg.heads == "code" else None
        if uniform:  # the shared blocks' nn.Dropout too (after every layer exists, before any runs)
            use_uniform_dropout(self)
        if cfg.init == "trunc_normal":
            init_vit_style(self)
        if not cfg.use_prompt:
            nn.init.trunc_normal_(self.query, std=0.02)

    @property
    def spot_hops(self) -> int:
        """Hyperedge hops the spot branch reads around a spot (0 without the spot hypergraph)."""
        return self.spot_hg.hops if self.spot_hg is not None else 0

    def heads(self) -> list[nn.Linear]:
        return [h for h in (self.head_z, self.head_spot, self.head_nb, self.head_prompt) if h is not None]

    def encode_spots(self, spot: torch.Tensor, edges, weights, grid: torch.Tensor, n_local: int) -> torch.Tensor:
        """T_s of a slide part.

        ``spot`` holds the features of the part's ``n_local`` spots first (the chunk and its halo), then
        of the spots only the hypergraph convolution reads (members of hyperedges that reach the part);
        ``edges``/``weights``: the spot hypergraph restricted to them; ``grid``: the part's grid cells.
        Returns T_s of the ``n_local`` spots.
        """
        h = self.proj(spot)
        if self.spot_hg is not None:
            h = self.spot_hg(h, edges, weights)
        return self.global_enc(h[:n_local], grid)

    def encode_neighbours(self, nb: torch.Tensor, mask: torch.Tensor, edges, weights) -> torch.Tensor:
        """T_n (B, 25, D) of B spots from their (B, 25, d) neighbour features and hypergraphs."""
        h = self.proj(nb)
        if self.nb_hg is not None:
            n, t, d = h.shape
            h = self.nb_hg(h.reshape(-1, d), edges, weights).reshape(n, t, d)
        return self.nb_enc(h, mask)

    def fuse(self, t_s: torch.Tensor, t_n: torch.Tensor, mask: torch.Tensor, y_masked: torch.Tensor):
        """p_Z and the branch predictions of B spots (eqs. 1, 5, 6 and the heads of §8.2 (8))."""
        n = t_s.shape[0]
        q = self.prompt(y_masked) if self.cfg.use_prompt else self.query.expand(n, -1)
        t_ng = self.cross(q[:, None], t_n, mask)[:, 0]
        if self.fusion_norm is None:
            z = t_ng + t_s  # paper eq. 6
        else:  # PH2ST code: one CrossEncoder applied to both branches, the second time without the mask
            z = self.fusion_norm(self.cross(q[:, None], t_s[:, None])[:, 0] + self.cross(q[:, None], t_n)[:, 0])
        p_z = self.head_z(z)
        if self.head_prompt is None:  # paper: p_spot from T_s, p_neighbor from T_n^G [INF]
            branches = [self.head_spot(t_s), self.head_nb(t_ng)]
        else:  # code: prompt branch, neighbour-token mean, spot branch
            branches = [self.head_prompt(q), self.head_nb(t_n.mean(1)), self.head_spot(t_s)]
        return p_z, branches


def phg2st_loss(p_z: torch.Tensor, branches: list, truth: torch.Tensor, lam: float) -> torch.Tensor:
    """L = MSE(p_Z, g) + Σ_b [(1 − λ) MSE(p_b, g) + λ MSE(p_b, p_Z)] (METHODS.md §8.3; no stop-gradient)."""
    loss = F.mse_loss(p_z, truth)
    for p in branches:
        loss = loss + (1 - lam) * F.mse_loss(p, truth) + lam * F.mse_loss(p, p_z)
    return loss
