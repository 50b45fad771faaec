"""Shared torch building blocks, known to no single method.

Imported only by torch methods (their ``model`` modules); the core harness never imports this package at
import time, so ``import stbench`` stays free of torch.

* :mod:`stbench.nn.blocks`: PreNorm transformer blocks, PEG, the slide (global), neighbour and cross
  encoders, the prompt projection head and a ViT-style init (METHODS.md §3).
* :mod:`stbench.nn.resmlp`: the residual MLP encoder (METHODS.md §7.2 item 4).
"""

from stbench.nn.blocks import (PEG, CrossAttention, CrossEncoder, FeedForward, GlobalEncoder, NeighborEncoder,
                               PreNormBlock, PromptProjection, SelfAttention, init_vit_style, relative_offsets)
from stbench.nn.resmlp import ResidualMLPBlock, ResMLP

__all__ = ["FeedForward", "SelfAttention", "PreNormBlock", "PEG", "GlobalEncoder", "relative_offsets",
           "NeighborEncoder", "CrossAttention", "CrossEncoder", "PromptProjection", "init_vit_style",
           "ResidualMLPBlock", "ResMLP"]
