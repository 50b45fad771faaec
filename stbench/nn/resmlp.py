"""Residual MLP encoder (METHODS.md §7.2 item 4). Used by HyperST.

    LN(in) → Linear(in→D) → depth × [x + MLP(LN(x))] → LN(D),
    MLP = Linear(D→ratio·D) – GELU – Dropout – Linear(ratio·D→D) – Dropout;

every Linear layer is Xavier-uniform initialised with a zero bias.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLPBlock(nn.Module):
    """x ← x + MLP(LN(x)), MLP = Linear(D→ratio·D) – GELU – Dropout – Linear(ratio·D→D) – Dropout."""

    def __init__(self, dim: int, mlp_ratio: float = 2, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ResMLP(nn.Module):
    """LN(in_dim) → Linear(in_dim→dim) → depth × :class:`ResidualMLPBlock` → LN(dim).

    Input (..., in_dim), output (..., dim). Linear layers: Xavier-uniform weights, zero biases; LayerNorms
    keep torch's default (unit weight, zero bias).
    """

    def __init__(self, in_dim: int, dim: int, depth: int = 2, mlp_ratio: float = 2, dropout: float = 0.0):
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(ResidualMLPBlock(dim, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm_in(x))
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


__all__ = ["ResidualMLPBlock", "ResMLP"]
