"""The PHG2ST network and its stbench Method (METHODS.md §8)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stbench.errors import ConfigError
from stbench.method import FitContext, Method
from stbench.metrics import pcc
from stbench.nn import CrossEncoder, GlobalEncoder, NeighborEncoder, PromptProjection
from stbench.nn import init_vit_style as init_like_triplex
from stbench.prompts import select_prompts
from stbench_plugins.phg2st.hypergraph import HGConv, neighbour_hypergraphs, spot_hypergraph

#: hidden width of the PH2ST code's two-layer hypergraph block
CODE_HIDDEN = 512


class HypergraphBlock(nn.Module):
    """Paper: Dropout(LN(ReLU(HGConv(x)))). Code: HGConv(D→512) → ReLU → LN → Dropout → HGConv(512→D) + x."""

    def __init__(self, dim: int, dropout: float, pyg_compat: bool, variant: str):
        super().__init__()
        self.variant = variant
        if variant == "paper":
            self.conv = HGConv(dim, dim, pyg_compat=pyg_compat)
            self.norm = nn.LayerNorm(dim)
        else:
            self.conv = HGConv(dim, CODE_HIDDEN, pyg_compat=pyg_compat)
            self.norm = nn.LayerNorm(CODE_HIDDEN)
            self.conv2 = HGConv(CODE_HIDDEN, dim, pyg_compat=pyg_compat)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, edges, weights=None):
        h = self.drop(self.norm(F.relu(self.conv(x, edges, weights))))
        if self.variant == "paper":
            return h
        return self.conv2(h, edges, weights) + x


class PHG2STNet(nn.Module):
    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        # UNI features (1024) enter as they are; other encoders' features are projected to the width
        self.proj = nn.Identity() if in_dim == d else nn.Linear(in_dim, d)
        self.spot_hg = HypergraphBlock(d, cfg.dropout_hypergraph, cfg.pyg_compat, cfg.hgnn_variant) if cfg.use_spot_hypergraph else None
        self.nb_hg = HypergraphBlock(d, cfg.dropout_hypergraph, cfg.pyg_compat, cfg.hgnn_variant) if cfg.use_neighbour_hypergraph else None
        self.global_enc = GlobalEncoder(d, cfg.depth_global, cfg.heads_global, cfg.mlp_ratio_global, cfg.dropout_global)
        self.nb_enc = NeighborEncoder(d, cfg.depth_neighbour, cfg.heads_neighbour, cfg.mlp_ratio_neighbour, cfg.dropout_neighbour)
        if cfg.use_prompt:
            self.prompt = PromptProjection(n_genes, d, cfg.dropout_cross, residual=cfg.prompt_residual)
        else:  # ablation: one learned query for every spot, so the prompts cannot inform anything
            self.query = nn.Parameter(torch.zeros(d))
        self.cross = CrossEncoder(d, cfg.depth_cross, cfg.heads_cross, cfg.mlp_ratio_cross, cfg.dropout_cross)
        self.fusion_norm = nn.LayerNorm(d) if cfg.fusion == "code" else None
        self.head_z, self.head_spot, self.head_nb = nn.Linear(d, n_genes), nn.Linear(d, n_genes), nn.Linear(d, n_genes)
        self.head_prompt = nn.Linear(d, n_genes) if cfg.heads == "code" else None
        init_like_triplex(self)
        if not cfg.use_prompt:
            nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, b: dict):
        n = b["spot"].shape[0]
        phi_s = self.proj(b["spot"])
        phi_n = self.proj(b["nb"])
        h_s = self.spot_hg(phi_s, b["spot_edges"], b["spot_weights"]) if self.spot_hg is not None else phi_s
        if self.nb_hg is not None:
            d = phi_n.shape[-1]
            h_n = self.nb_hg(phi_n.reshape(-1, d), b["nb_edges"]).reshape(n, -1, d)
        else:
            h_n = phi_n
        t_s = self.global_enc(h_s, b["grid"])
        t_n = self.nb_enc(h_n, b["nb_mask"])
        q = self.prompt(b["y_masked"]) if self.cfg.use_prompt else self.query.expand(n, -1)
        t_ng = self.cross(q[:, None], t_n, b["nb_mask"])[:, 0]
        if self.fusion_norm is None:
            z = t_ng + t_s  # paper eq. 6
        else:  # PH2ST code: one CrossEncoder applied to both branches, the second time without the mask
            z = self.fusion_norm(self.cross(q[:, None], t_s[:, None])[:, 0] + self.cross(q[:, None], t_n)[:, 0])
        p_z = self.head_z(z)
        if self.head_prompt is None:
            branches = [self.head_spot(t_s), self.head_nb(t_ng)]
        else:
            branches = [self.head_prompt(q), self.head_nb(t_n.mean(1)), self.head_spot(t_s)]
        return p_z, branches


def phg2st_loss(p_z: torch.Tensor, branches: list, truth: torch.Tensor, lam: float) -> torch.Tensor:
    """L = MSE(p_Z, g) + Σ_b [(1 − λ) MSE(p_b, g) + λ MSE(p_b, p_Z)] (METHODS.md §8.3; no stop-gradient)."""
    loss = F.mse_loss(p_z, truth)
    for p in branches:
        loss = loss + (1 - lam) * F.mse_loss(p, truth) + lam * F.mse_loss(p, p_z)
    return loss


def spatial_chunks(positions: np.ndarray, max_spots: int) -> list[np.ndarray]:
    """Split spots into spatially contiguous parts of at most ``max_spots`` by median bisection."""
    parts, todo = [], [np.arange(len(positions))]
    while todo:
        idx = todo.pop()
        if len(idx) <= max_spots:
            parts.append(np.sort(idx))
            continue
        pts = positions[idx]
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        half = len(order) // 2
        todo += [order[:half], order[half:]]
    return sorted(parts, key=lambda p: p[0])


@dataclass
class Chunk:
    """The tensors of one slide part, with its hypergraphs (they depend only on frozen features)."""

    spots: np.ndarray
    tensors: dict


class PHG2ST(Method):
    def __init__(self, config):
        for key, allowed in (("loss_on", ("all", "non_prompt")), ("hgnn_variant", ("paper", "code")),
                             ("fusion", ("sum", "code")), ("heads", ("paper", "code"))):
            if getattr(config, key) not in allowed:
                raise ConfigError(f"phg2st: {key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r} (key methods.phg2st.{key})")
        if not 0 < config.train_prompt_ratio < 1:
            raise ConfigError("phg2st: train_prompt_ratio must be in (0, 1) (key methods.phg2st.train_prompt_ratio)")
        self.config = config
        self.device = torch.device("cpu")  # the harness's choice (FitContext.device) is taken in fit
        self.net: Optional[PHG2STNet] = None
        self._chunks: dict[str, list[Chunk]] = {}
        self.history: list[dict] = []

    # -- inputs ---------------------------------------------------------------------------------
    def _standardise(self, x: np.ndarray) -> np.ndarray:
        if not self.config.standardise_features:
            return x.astype(np.float32)
        return ((x - self.mu_) / self.sd_).astype(np.float32)

    def _prepare(self, slide) -> list[Chunk]:
        """Per-slide tensors and hypergraphs, built once and reused by every epoch and prediction."""
        key = slide.name
        if key in self._chunks:
            return self._chunks[key]
        raw_spot, raw_nb = slide.features["spot"], slide.features["neighbour"]
        spot, nb = self._standardise(raw_spot), self._standardise(raw_nb)
        nb_mask = slide.features["neighbour_mask"].astype(bool)
        pos = slide.positions_um()
        chunks = []
        for part in spatial_chunks(pos, self.config.max_spots):
            # hyperedges from Euclidean distances between the encoder's own features (§8.2 (2), (4))
            edges, weights = spot_hypergraph(raw_spot[part].astype(np.float32), pos[part], k=self.config.k)
            nb_t = torch.from_numpy(nb[part])
            mask_t = torch.from_numpy(nb_mask[part])
            tensors = {
                "spot": torch.from_numpy(spot[part]),
                "nb": nb_t,
                "nb_mask": mask_t,
                "grid": torch.from_numpy(np.asarray(slide.grid[part], dtype=np.int64)),
                "spot_edges": torch.from_numpy(np.asarray(edges, dtype=np.int64)),
                "spot_weights": torch.from_numpy(np.asarray(weights, dtype=np.float32)),
                "nb_edges": neighbour_hypergraphs(torch.from_numpy(raw_nb[part].astype(np.float32)), mask_t, k=self.config.k),
            }
            chunks.append(Chunk(part, {k: v.to(self.device) for k, v in tensors.items()}))
        self._chunks[key] = chunks
        return chunks

    def _forward(self, chunk: Chunk, y_masked: np.ndarray):
        batch = dict(chunk.tensors, y_masked=torch.from_numpy(y_masked[chunk.spots]).to(self.device))
        return self.net(batch)

    # -- Method API -----------------------------------------------------------------------------
    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        self._chunks.clear()  # tensors of an earlier fit may live on another device
        torch.manual_seed(context.seed)
        rng = np.random.default_rng(context.seed)
        stack = np.concatenate([s.features["spot"][s.features["spot_mask"]] for s in train])
        self.mu_, self.sd_ = stack.mean(0), stack.std(0)
        self.sd_[self.sd_ == 0] = 1.0
        self.net = PHG2STNet(cfg, stack.shape[1], len(context.genes))
        if cfg.init_bias_to_mean:
            mean = torch.from_numpy(np.concatenate([s.expr for s in train]).mean(0))
            for head in (self.net.head_z, self.net.head_spot, self.net.head_nb, self.net.head_prompt):
                if head is not None:
                    head.bias.data.copy_(mean)
        self.net.to(self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        work = [(s, c) for s in train for c in self._prepare(s)]
        strategy = context.prompt_selector or context.prompt_strategy
        self._val_prompts = {s.name: select_prompts(strategy, s.positions_um(), context.prompt_ratio, s.name, context.seed)
                             for s in val}
        best, best_state, stale = -math.inf, None, 0
        for epoch in range(cfg.epochs):
            self.net.train()
            losses = []
            for i in rng.permutation(len(work)):
                slide, chunk = work[i]
                expr = slide.expr[chunk.spots]
                n = len(chunk.spots)
                # 30 % of the chunk's spots are prompts, drawn afresh at every step (paper)
                prompt = rng.choice(n, size=max(1, int(round(cfg.train_prompt_ratio * n))), replace=False)
                y_masked = np.zeros_like(slide.expr)
                y_masked[chunk.spots[prompt]] = expr[prompt]
                p_z, branches = self._forward(chunk, y_masked)
                truth = torch.from_numpy(expr).to(self.device)
                if cfg.loss_on == "non_prompt":
                    keep = torch.ones(n, dtype=torch.bool, device=self.device)
                    keep[torch.from_numpy(prompt)] = False
                    p_z, branches, truth = p_z[keep], [b[keep] for b in branches], truth[keep]
                loss = phg2st_loss(p_z, branches, truth, cfg.lam)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            scheduler.step()
            score = self._validate(val) if val else -float(np.mean(losses))
            self.history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_pcc": score if val else None})
            if score > best:
                best, stale = score, 0
                best_state = copy.deepcopy(self.net.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.best_score_ = best
        self._chunks = {}  # training tensors are not needed any more

    def _predict_with(self, slide, prompt_idx, prompt_expr) -> np.ndarray:
        self.net.eval()
        y_masked = np.zeros((slide.n_spots, slide.n_genes), dtype=np.float32)
        y_masked[prompt_idx] = prompt_expr
        out = np.zeros_like(y_masked)
        with torch.inference_mode():
            for chunk in self._prepare(slide):
                p_z, _ = self._forward(chunk, y_masked)
                out[chunk.spots] = p_z.float().cpu().numpy()
        return out

    def _validate(self, val) -> float:
        scores = []
        for s in val:
            idx = self._val_prompts[s.name]
            pred = self._predict_with(s, idx, s.expr[idx])
            keep = np.ones(s.n_spots, bool)
            keep[idx] = False
            scores.append(pcc(pred[keep], s.expr[keep]).value)
        scores = np.asarray(scores, dtype=float)
        return float(np.nanmean(scores)) if np.isfinite(scores).any() else -math.inf

    def predict(self, slide) -> np.ndarray:
        pred = self._predict_with(slide, slide.prompt_idx, slide.prompt_expr)
        self._chunks.pop(slide.name, None)
        return pred

    def summary(self):
        return {"epochs_run": len(self.history), "best_val_pcc": getattr(self, "best_score_", None),
                "device": str(self.device), "parameters": sum(p.numel() for p in self.net.parameters()) if self.net else 0}

