"""Transformer building blocks (METHODS.md §3). Used by PHG2ST.

* :class:`FeedForward`: Linear(D→h) – GELU – Dropout – Linear(h→D) – Dropout.
* :class:`SelfAttention`: multi-head self-attention with an optional per-head logit bias and key mask.
* :class:`PreNormBlock`: x ← x + MHSA(LN(x)); x ← x + FFN(LN(x)).
* :class:`PEG`: a depthwise 3×3 convolution on the spots' integer grid, added at occupied cells and read
  back through an explicit index map (so spot order never matters).
* :class:`GlobalEncoder`: 1 block → PEG → depth−1 blocks → LN, over all spots of a slide.
* :func:`relative_offsets` / :class:`NeighborEncoder`: blocks over each spot's 5×5 neighbour tokens, with a
  learnable per-head bias for every distinct (|Δrow|, |Δcol|) offset (LeViT style, initialised to 0) and a
  key mask for sub-patches outside the image.
* :class:`CrossAttention` / :class:`CrossEncoder`: q ← q + Attn(LN(q), LN(kv)); q ← q + FFN(LN(q)), one
  LayerNorm for q and kv.
* :class:`PromptProjection`: a projection of a (masked) expression matrix into the model width.
* :func:`init_vit_style`: truncated-normal(0.02) linear weights, zero biases, unit LayerNorms.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _masked_softmax_attention(q, k, v, bias=None, key_mask=None, dropout=0.0, training=False):
    """softmax(q kᵀ / √d + bias) v over the last two dims; masked keys get the most negative logit.

    q: (B, H, Tq, d); k, v: (B, H, Tk, d); bias broadcasts to (B, H, Tq, Tk); key_mask: (B, Tk), True = valid.
    """
    logits = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias
    if key_mask is not None:  # (B, T) True = valid key
        logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
    attn = F.dropout(logits.softmax(-1), dropout, training)
    return attn @ v


class FeedForward(nn.Sequential):
    """Linear(dim→hidden) – GELU – Dropout – Linear(hidden→dim) – Dropout (METHODS.md §3)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class SelfAttention(nn.Module):
    """qkv = Linear(D→3D, no bias), scale (D/H)^−½, output Linear(D→D) + Dropout (identity if H = 1).

    Without bias and key mask it uses the fused ``scaled_dot_product_attention`` kernel.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # METHODS.md §3: no output projection when a single head spans the whole width
        self.out = nn.Identity() if heads == 1 else nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x, bias=None, key_mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if bias is None and key_mask is None:
            # fused kernel: memory O(T) on long slides instead of an explicit T × T matrix
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = _masked_softmax_attention(q, k, v, bias, key_mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class PreNormBlock(nn.Module):
    """x ← x + MHSA(LN(x)); x ← x + FFN(LN(x)), FFN hidden width int(dim·mlp_ratio)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads, dropout)
        self.norm2, self.ffn = nn.LayerNorm(dim), FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x, bias=None, key_mask=None):
        x = x + self.attn(self.norm1(x), bias, key_mask)
        return x + self.ffn(self.norm2(x))


class PEG(nn.Module):
    """Positional encoding generator on the spot grid ("PEGH", METHODS.md §3).

    Used by PHG2ST.
    """

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """x: (N, D) spot tokens; grid: (N, 2) integer (col, row) coordinates."""
        g = grid - grid.min(0).values
        w, h = int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1
        dense = x.new_zeros(1, x.shape[1], h, w)
        dense[0, :, g[:, 1], g[:, 0]] = x.T
        out = self.conv(dense)[0, :, g[:, 1], g[:, 0]].T  # read back in the original spot order
        return out + x


class GlobalEncoder(nn.Module):
    """Slide transformer: 1 block → PEG → depth−1 blocks → LN over all N spot tokens of one slide."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.first = PreNormBlock(dim, heads, mlp_ratio, dropout)
        self.peg = PEG(dim)
        self.rest = nn.ModuleList(PreNormBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth - 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        x = self.first(x[None])[0]
        x = self.peg(x, grid)[None]
        for block in self.rest:
            x = block(x)
        return self.norm(x[0])


def relative_offsets(grid: int = 5) -> torch.Tensor:
    """(T, T) index of the distinct (|Δrow|, |Δcol|) offset between every two tokens of a grid."""
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    return dr * grid + dc


class NeighborEncoder(nn.Module):
    """PreNorm blocks over a grid×grid token window with a LeViT-style relative-position bias.

    One learnable scalar per head per distinct (|Δrow|, |Δcol|) offset, initialised to 0, one table per
    block; tokens outside the image are masked as keys.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, grid: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.register_buffer("offsets", relative_offsets(grid), persistent=False)
        # one learnable scalar per head per distinct offset, initialised to 0, one table per block
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(heads, grid * grid)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 25, D); key_mask: (B, 25) True where the sub-patch is inside the image."""
        for block, table in zip(self.blocks, self.bias):
            x = block(x, bias=table[:, self.offsets][None], key_mask=key_mask)
        return self.norm(x)


class CrossAttention(nn.Module):
    """q-proj Linear(D→D, no bias), kv-proj Linear(D→2D, no bias), out Linear + Dropout; optional key mask."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, q, kv, key_mask=None):
        b, tq, d = q.shape
        tk, h = kv.shape[1], self.heads
        q = self.q(q).view(b, tq, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(b, tk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = _masked_softmax_attention(q, k, v, key_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(b, tq, d))


class CrossEncoder(nn.Module):
    """depth × [q ← q + Attn(LN(q), LN(kv)); q ← q + FFN(LN(q))], the same LayerNorm for q and kv."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(CrossAttention(dim, heads, dropout) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.ffns = nn.ModuleList(FeedForward(dim, int(dim * mlp_ratio), dropout) for _ in range(depth))

    def forward(self, q, kv, key_mask=None):
        for norm, attn, norm2, ffn in zip(self.norms, self.attns, self.norms2, self.ffns):
            q = q + attn(norm(q), norm(kv), key_mask)  # the same LayerNorm instance for q and kv
            q = q + ffn(norm2(q))
        return q


class PromptProjection(nn.Module):
    """Φ_p = LN(Dropout(FC(GELU(Y W)))); ``residual``: LN(Dropout(FC(GELU(YW + b))) + (YW + b)).

    Used by PHG2ST for its ST prompt (the paper's form; ``residual`` is its reference code's form).
    """

    def __init__(self, n_genes: int, dim: int, dropout: float, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.w = nn.Linear(n_genes, dim, bias=residual)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = self.w(y)
        h = self.drop(self.fc(F.gelu(z)))
        return self.norm(h + z if self.residual else h)


def init_vit_style(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorms (the ViT default).

    Used by PHG2ST.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = ["FeedForward", "SelfAttention", "PreNormBlock", "PEG", "GlobalEncoder", "relative_offsets",
           "NeighborEncoder", "CrossAttention", "CrossEncoder", "PromptProjection", "init_vit_style"]
