"""The TRIPLEX network, loss, training and inference (METHODS.md §6); see the package docstring."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stbench.errors import ConfigError
from stbench.images.augment import random_flips_rot90, to_float
from stbench.method import FitContext, FittedState
from stbench.metrics import pcc
from stbench.nn import CrossEncoder, GlobalEncoder, NeighborEncoder
from stbench.torch_method import TorchMethod, spot_batches, spot_pool, standardiser
from stbench.weights import create_timm_model, resolve_weights
from stbench_plugins.triplex.checkpoint import load_backbone_file

OPTION = "--set methods.triplex.backbone_weights={}"


def _fit_width(d_in: int, d_out: int) -> nn.Module:
    """Linear(d_in → d_out), or nothing to do when the widths already agree."""
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class TRIPLEXNet(nn.Module):
    """Target, neighbour and global encoders, the shared fusion CrossEncoder and the four heads."""

    def __init__(self, cfg, feat_dim: int, n_genes: int, backbone: Optional[nn.Module] = None):
        super().__init__()
        D = cfg.dim
        self.backbone = backbone
        if backbone is not None:
            self.target_proj = _fit_width(backbone.num_features, D)
        else:  # frozen variant: one token from the cached spot features
            self.target_proj = nn.Linear(feat_dim, D)
        self.neighbour_proj = _fit_width(feat_dim, D)
        self.global_proj = nn.Linear(feat_dim, D)
        self.neighbour_encoder = NeighborEncoder(D, cfg.depth3, cfg.heads3, cfg.mlp_ratio3, cfg.dropout3)
        self.global_encoder = GlobalEncoder(D, cfg.depth2, cfg.heads2, cfg.mlp_ratio2, cfg.dropout2)
        self.fusion = CrossEncoder(D, cfg.depth1, cfg.heads1, cfg.mlp_ratio1, cfg.dropout1)
        self.fusion_norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, n_genes)
        self.fc_target = nn.Linear(D, n_genes)
        self.fc_neighbour = nn.Linear(D, n_genes)
        self.fc_global = nn.Linear(D, n_genes)
        self.clamp = bool(cfg.clamp)

    def target_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, px, px) images → (B, h·w, D) tokens; or (B, d) frozen features → (B, 1, D)."""
        if self.backbone is None:
            return self.target_proj(x)[:, None, :]
        fmap = self.backbone.forward_features(x)  # (B, c, h, w): the last stage, unpooled
        return self.target_proj(fmap.flatten(2).transpose(1, 2))

    def encode_slide(self, spot_features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(N, d) features of every spot of a slide and their (N, 2) grid coordinates → (N, D) t_g."""
        return self.global_encoder(self.global_proj(spot_features), grid)

    def forward(self, target: torch.Tensor, neighbours: torch.Tensor, neighbour_mask: torch.Tensor,
                t_g: torch.Tensor) -> dict:
        """The four predictions of B spots: ``f`` (fused), ``t`` (target), ``n`` (neighbour), ``g`` (global)."""
        T_t = self.target_tokens(target)
        T_n = self.neighbour_encoder(self.neighbour_proj(neighbours), neighbour_mask)
        query = t_g[:, None, :]
        f1 = self.fusion(query, T_t)
        f2 = self.fusion(query, T_n, neighbour_mask)
        z = self.fusion_norm(f1 + f2)[:, 0]
        out = {"f": self.fc(z), "t": self.fc_target(T_t.mean(1)), "n": self.fc_neighbour(T_n.mean(1)),
               "g": self.fc_global(t_g)}
        if self.clamp:
            out = {k: v.clamp(min=0.0) for k, v in out.items()}
        return out

    def heads(self):
        return (self.fc, self.fc_target, self.fc_neighbour, self.fc_global)


def triplex_loss(pred: dict, truth: torch.Tensor, alpha: float) -> torch.Tensor:
    """L = MSE(ŷ_f, y) + Σ_{b ∈ t, n, g} [(1 − α) MSE(ŷ_b, y) + α MSE(ŷ_f, ŷ_b)], no stop-gradient."""
    fused = pred["f"]
    total = F.mse_loss(fused, truth)
    for branch in ("t", "n", "g"):
        total = total + (1 - alpha) * F.mse_loss(pred[branch], truth) + alpha * F.mse_loss(fused, pred[branch])
    return total


class _SingleSampleBatchNorm:
    """With one sample BatchNorm has no batch statistics: use the running ones for that forward pass."""

    def __init__(self, model: nn.Module, n: int):
        self.layers = [m for m in model.modules()
                       if n == 1 and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def __enter__(self):
        for m in self.layers:
            m.eval()

    def __exit__(self, *exc):
        for m in self.layers:
            m.train()


class TRIPLEX(TorchMethod):
    saved_weights_fields = ("backbone_weights",)

    def __init__(self, config):
        self.config = config
        self.frozen = config.backbone == "frozen"
        if not self.frozen:  # a missing checkpoint stops the run before any data is read
            resolve_weights(config.backbone, config.backbone_weights,
                            label=f"method triplex's backbone {config.backbone}", option=OPTION)
        self.lr, self.batch_size = config.lr, config.batch_size
        self.model: Optional[TRIPLEXNet] = None
        self.device = torch.device("cpu")
        self.history: list[dict] = []
        self.best_epoch: Optional[int] = None
        self.weights_id = "none" if self.frozen else "unbuilt"
        self.mu_: Optional[np.ndarray] = None
        self.sd_: Optional[np.ndarray] = None
        self._rng = np.random.default_rng(0)
        #: slide name → (standardised spot features, grid) tensors of the global branch
        self._slide_inputs: dict[str, tuple] = {}

    @property
    def finetune_lr(self) -> float:
        return self.config.finetune_lr

    # -- inputs ------------------------------------------------------------------------------------------
    def _request(self) -> str:
        from stbench_plugins.triplex import triplex_patches

        return triplex_patches(self.config)[0].name

    def _usable(self, slide) -> np.ndarray:
        """(N,) bool: the spot's target input is real (patch or spot features inside the image)."""
        if self.frozen:
            return np.asarray(slide.features["spot_mask"], dtype=bool)
        return np.asarray(slide.patches[self._request()].mask[:, 0], dtype=bool)

    def _feat(self, x) -> torch.Tensor:
        x = np.array(x, dtype=np.float32)  # a copy: the store's arrays are read-only
        if self.mu_ is not None:
            x = (x - self.mu_) / self.sd_
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def _target(self, slide, idx: np.ndarray, augment: bool) -> torch.Tensor:
        if self.frozen:
            return self._feat(slide.features["spot"][idx])
        raw = slide.patches[self._request()].read(np.asarray(idx))[:, 0]
        x = torch.from_numpy(np.ascontiguousarray(raw)).to(self.device)
        if augment and self.config.augment:
            x = random_flips_rot90(x, self._rng, channels_last=True)
        return to_float(x, self.config.input_norm)

    def _global(self, slide) -> torch.Tensor:
        """t_g of every spot of the slide (gradient flows when the caller allows it)."""
        key = slide.name
        if key not in self._slide_inputs:  # the frozen inputs of the slide, moved to the device once
            grid = torch.as_tensor(np.array(slide.grid, dtype=np.int64), device=self.device)
            self._slide_inputs[key] = (self._feat(slide.features["spot"]), grid)
        return self.model.encode_slide(*self._slide_inputs[key])

    def _predict_spots(self, slide, idx: np.ndarray, t_g: torch.Tensor, augment: bool) -> dict:
        idx = np.asarray(idx)
        nb = self._feat(slide.features["neighbour"][idx])
        mask = torch.as_tensor(np.array(slide.features["neighbour_mask"][idx], dtype=bool), device=self.device)
        target = self._target(slide, idx, augment)
        with _SingleSampleBatchNorm(self.model, len(idx)):
            return self.model(target, nb, mask, t_g[torch.as_tensor(idx, device=self.device)])

    def _loss(self, groups, truth_of) -> torch.Tensor:
        """The TRIPLEX loss of one batch [(slide, spot indices)], re-encoding each slide's global branch."""
        preds, truths = [], []
        for slide, idx in groups:
            preds.append(self._predict_spots(slide, idx, self._global(slide), augment=True))
            truths.append(truth_of(slide, idx))
        pred = {k: torch.cat([p[k] for p in preds]) for k in preds[0]}
        return triplex_loss(pred, torch.cat(truths), self.config.alpha)

    # -- Method API ---------------------------------------------------------------------------------------
    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        self._slide_inputs = {}
        torch.manual_seed(context.seed)
        self._rng = np.random.default_rng(context.seed)
        pool = spot_pool(train, self._usable)
        if not pool:
            raise ConfigError("triplex: no training spot has its target inside the image; check the images and "
                              "images.min_inside")
        feats = np.concatenate([np.asarray(s.features["spot"])[np.asarray(s.features["spot_mask"], bool)]
                                for s in train]).astype(np.float64)
        if cfg.standardise_features:
            mu, sd = standardiser(feats)
            self.mu_, self.sd_ = mu.astype(np.float32), sd.astype(np.float32)
        backbone = None
        if not self.frozen:
            label = f"method triplex's backbone {cfg.backbone}"
            path, source = resolve_weights(cfg.backbone, cfg.backbone_weights, label=label, option=OPTION)
            # a local file may be Ciga's Lightning checkpoint (prefixed names): checkpoint.py reads both kinds
            backbone, self.weights_id, _ = create_timm_model(
                cfg.backbone, "random" if source == "file" else cfg.backbone_weights, label=label, option=OPTION,
                num_classes=0)
            if source == "file":
                self.weights_id = load_backbone_file(backbone, path, arch=cfg.backbone,
                                                     option="methods.triplex.backbone_weights")
        self.model = TRIPLEXNet(cfg, feats.shape[1], len(context.genes), backbone)
        if cfg.init_bias_to_mean:
            mean = torch.as_tensor(np.concatenate([np.asarray(s.expr) for s in train]).mean(0), dtype=torch.float32)
            with torch.no_grad():
                for head in self.model.heads():
                    head.bias.copy_(mean)
        self.model.to(self.device)

        optimizer = self.make_optimizer(list(self.model.parameters()), cfg.lr)
        if cfg.optimizer == "adamw_plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience) if val else None
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        if not val:
            warnings.warn("triplex: no inner-validation slides: every epoch runs and the last one is kept",
                          stacklevel=2)

        def truth_of(slide, idx):
            return torch.as_tensor(np.asarray(slide.expr)[idx], dtype=torch.float32, device=self.device)

        best, best_state, stale = -math.inf, None, 0
        self.history, self.best_epoch = [], None
        for epoch in range(cfg.epochs):
            self.model.train()
            losses, sizes = [], []
            order = self._rng.permutation(len(pool))
            for groups in spot_batches(pool, train, order, cfg.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(groups, truth_of)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                sizes.append(sum(len(idx) for _, idx in groups))
            record = {"epoch": epoch, "train_loss": float(np.average(losses, weights=sizes)),
                      "lr": optimizer.param_groups[0]["lr"]}
            if cfg.optimizer == "adam_step":
                scheduler.step()
            if val:
                score = record["val_pcc"] = self._validate(val)
                if scheduler is not None and cfg.optimizer == "adamw_plateau" and np.isfinite(score):
                    scheduler.step(score)
                if np.isfinite(score) and score > best:
                    best, stale, self.best_epoch = score, 0, epoch
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                elif np.isfinite(score):
                    stale += 1
            self.history.append(record)
            if val and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            self.best_epoch = len(self.history) - 1
        self.model.eval()
        self._slide_inputs = {}  # training tensors are not needed any more (and the harness copies the method)

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        if self.config.optimizer == "adamw_plateau":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)
        return torch.optim.Adam(params, lr=lr)

    @torch.no_grad()
    def _validate(self, val) -> float:
        """Mean over validation slides of the gene-mean PCC on spots whose target lies inside the image."""
        scores = []
        for slide in val:
            idx = np.flatnonzero(self._usable(slide))
            if len(idx):
                scores.append(pcc(self._predict_idx(slide, idx), np.asarray(slide.expr)[idx]).value)
        finite = [s for s in scores if np.isfinite(s)]
        return float(np.mean(finite)) if finite else float("nan")

    @torch.no_grad()
    def _predict_idx(self, slide, idx: np.ndarray) -> np.ndarray:
        """ŷ_f of spots ``idx``: the global branch once for the slide, then the spots in chunks."""
        self.model.eval()
        t_g = self._global(slide)
        out = [self._predict_spots(slide, idx[s:s + self.config.eval_chunk], t_g, augment=False)["f"].float().cpu().numpy()
               for s in range(0, len(idx), self.config.eval_chunk)]
        return np.concatenate(out) if out else np.zeros((0, self.model.fc.out_features), np.float32)

    def spot_loss(self, slide, spots: np.ndarray, truth: torch.Tensor) -> torch.Tensor:
        """Prompt fine-tuning: the TRIPLEX loss on the prompt spots whose target lies inside the image."""
        spots = np.asarray(spots)
        keep = self._usable(slide)[spots]
        if not keep.any():
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        kept = torch.as_tensor(keep, device=truth.device)
        target = truth[kept].to(self.device)
        return self._loss([(slide, spots[keep])], lambda s, i: target)

    @torch.no_grad()
    def predict(self, slide) -> np.ndarray:
        pred = self._predict_idx(slide, np.arange(slide.n_spots)).astype(np.float32)
        self._slide_inputs.pop(slide.name, None)  # test slides are seen once
        return pred

    # -- saving and loading (stbench.torch_method) ----------------------------------------------------------
    def network_meta(self) -> dict:
        return {"feat_dim": self.model.global_proj.in_features, "n_genes": self.model.fc.out_features}

    def build_network(self, meta: dict) -> TRIPLEXNet:
        backbone = None
        if not self.frozen:  # untrained: the saved weights are loaded next
            backbone, _, _ = create_timm_model(self.config.backbone, "random", label=f"method triplex's backbone "
                                               f"{self.config.backbone}", option=OPTION, num_classes=0)
        return TRIPLEXNet(self.config, meta["feat_dim"], meta["n_genes"], backbone)

    def extra_state(self) -> FittedState:
        arrays = {"mu": self.mu_, "sd": self.sd_} if self.mu_ is not None else {}
        return FittedState(arrays, {"weights_id": self.weights_id, "best_epoch": self.best_epoch,
                                    "history": self.history})

    def load_extra_state(self, state: FittedState) -> None:
        self.mu_ = state.arrays["mu"].astype(np.float32) if "mu" in state.arrays else None
        self.sd_ = state.arrays["sd"].astype(np.float32) if "sd" in state.arrays else None
        self.weights_id = state.meta["weights_id"]
        self.best_epoch = state.meta["best_epoch"]
        self.history = list(state.meta["history"])
        self._slide_inputs = {}

    def summary(self) -> dict:
        cfg = self.config
        best = self.history[self.best_epoch] if self.best_epoch is not None and self.history else {}
        last = self.history[-1] if self.history else {}
        return {"setting": cfg.setting, "backbone": cfg.backbone, "weights_id": self.weights_id,
                "optimizer": cfg.optimizer, "clamp": bool(cfg.clamp), "epochs_run": len(self.history),
                "best_epoch": self.best_epoch, "best_val_pcc": best.get("val_pcc"),
                "final_train_loss": last.get("train_loss"), "final_lr": last.get("lr"),
                "parameters": sum(p.numel() for p in self.model.parameters()) if self.model else 0,
                "device": str(self.device)}
