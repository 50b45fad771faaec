"""ST-Net's network, losses, training and test-time augmentation (METHODS.md §4); see the package
docstring for the recipes and every choice."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stbench.errors import ConfigError
from stbench.images.augment import N_DIHEDRAL, dihedral, random_flips_rot90, to_float
from stbench.method import FitContext, FittedState
from stbench.metrics import pcc
from stbench.torch_method import TorchMethod, group_by_slide, spot_pool, standardiser
from stbench.weights import create_timm_model, resolve_weights

#: spots per forward pass at prediction and validation time (times 8 with TTA)
EVAL_BATCH = 128
OPTION = "--set methods.stnet.backbone_weights={}"
#: what summary() says about epoch selection, per select_on
SELECTION_LABEL = {
    "pcc": "best inner-validation mean PCC (the TRIPLEX re-implementation early-stops on the test fold)",
    "loss": "lowest inner-validation summed squared error (ST-Net's code: a 4-fold CV inside the training "
            "patients, then a refit on all of them)",
}


# ------------------------------------------------------------------------------------------------------
# losses


def sse_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """ST-Net's loss: the squared error summed over spots and genes, divided by the number of genes."""
    return (pred - truth).pow(2).sum() / pred.shape[-1]


def mse_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The re-implementation's loss: the squared error averaged over spots and genes."""
    return F.mse_loss(pred, truth)


LOSSES = {"sse": sse_loss, "mse": mse_loss}


# ------------------------------------------------------------------------------------------------------
# the network


def check_backbone_weights(config) -> None:
    """Fail early (when the method is configured) if the backbone is unknown or its weights cannot be found."""
    import timm

    if not timm.is_model(config.backbone):
        raise ConfigError(f"stnet: unknown timm model {config.backbone!r} (key methods.stnet.backbone); "
                          "e.g. densenet121, or frozen for the run's encoder features")
    resolve_weights(config.backbone, config.backbone_weights, label=f"method stnet's backbone {config.backbone}",
                    option=OPTION)


def build_backbone(config) -> tuple[nn.Module, str]:
    """The timm CNN without its classifier (``num_classes=0``: pooled features) and its weights id."""
    model, weights_id, _ = create_timm_model(config.backbone, config.backbone_weights,
                                             label=f"method stnet's backbone {config.backbone}", option=OPTION,
                                             num_classes=0)
    return model, weights_id


class STNetNet(nn.Module):
    """Backbone (None: the inputs are already features) → Linear(features → G) → optional clamp at ≥ 0."""

    def __init__(self, in_dim: int, n_genes: int, backbone: Optional[nn.Module] = None, clamp: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(in_dim, n_genes)
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x) if self.backbone is not None else x
        out = self.head(features)
        return out.clamp(min=0.0) if self.clamp else out

    def init_head_to_mean(self, mean) -> None:
        """ST-Net's initialisation: zero weights, bias = the training mean expression."""
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))


@contextlib.contextmanager
def _batchnorm_eval_if_single(model: nn.Module, n: int):
    """A one-sample training batch has no batch statistics: BatchNorm layers use their running ones."""
    switched = []
    if n == 1 and model.training:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()
                switched.append(m)
    try:
        yield
    finally:
        for m in switched:
            m.train()


# ------------------------------------------------------------------------------------------------------
# the method


class STNet(TorchMethod):
    saved_weights_fields = ("backbone_weights",)

    def __init__(self, config):
        self.config = config
        self.frozen = config.backbone == "frozen"
        if not self.frozen:
            check_backbone_weights(config)  # a missing checkpoint stops the run before any data is read
        self.lr, self.batch_size = config.lr, config.batch_size
        self.loss_fn = LOSSES[config.loss]
        self.model: Optional[STNetNet] = None
        self.device = torch.device("cpu")
        self.history: list[dict] = []
        self.weights_id = "none"
        self.best_epoch: Optional[int] = None
        #: per-channel input mean/std in [0, 1] scale (input_norm=estimated), feature mean/std (frozen)
        self.input_mean_: Optional[np.ndarray] = None
        self.input_std_: Optional[np.ndarray] = None
        self.mu_: Optional[np.ndarray] = None
        self.sd_: Optional[np.ndarray] = None
        self._rng = np.random.default_rng(0)

    # -- inputs ---------------------------------------------------------------------------------------
    @property
    def uses_tta(self) -> bool:
        return bool(self.config.tta) and not self.frozen

    def _request(self) -> str:
        from stbench_plugins.stnet import stnet_patches

        return stnet_patches(self.config)[0].name

    def _in_image(self, slide) -> np.ndarray:
        """(N,) bool: the spot's patch lies inside the image (its features are real)."""
        if self.frozen:
            return np.asarray(slide.features["spot_mask"], dtype=bool)
        return np.asarray(slide.patches[self._request()].mask[:, 0], dtype=bool)

    def _read_patches(self, slide, idx: np.ndarray) -> torch.Tensor:
        """uint8 (B, px, px, 3) patches of spots ``idx`` on the device, in ``idx``'s order."""
        patches = slide.patches[self._request()].read(np.asarray(idx))[:, 0]
        return torch.from_numpy(np.ascontiguousarray(patches)).to(self.device)

    def _normalise(self, uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → float (B, 3, H, W) with the recipe's input normalisation."""
        if self.config.input_norm == "imagenet":
            return to_float(uint8, "imagenet")
        x = to_float(uint8, "none")
        mean = torch.as_tensor(self.input_mean_, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.as_tensor(self.input_std_, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def _features(self, slide, idx: np.ndarray) -> torch.Tensor:
        x = (np.asarray(slide.features["spot"][np.asarray(idx)], dtype=np.float32) - self.mu_) / self.sd_
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def _inputs(self, slide, idx: np.ndarray, augment: bool, k: Optional[int] = None) -> torch.Tensor:
        """Network inputs of spots ``idx``: standardised features (frozen) or normalised patches,
        randomly flipped and turned (``augment``) or under dihedral transform ``k``."""
        if self.frozen:
            return self._features(slide, idx)
        x = self._read_patches(slide, idx)
        if augment and self.config.augment:
            x = random_flips_rot90(x, self._rng, channels_last=True)
        if k is not None:
            x = dihedral(x, k, channels_last=True)
        return self._normalise(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with _batchnorm_eval_if_single(self.model, len(x)):
            return self.model(x)

    def _estimate_input_norm(self, pool: list[tuple[int, int]], train) -> None:
        """ST-Net's input statistics: per-channel mean and std (in [0, 1] scale) over the pixels of
        ``norm_batches`` random training batches."""
        cfg = self.config
        n = min(len(pool), cfg.norm_batches * cfg.batch_size)
        pick = [pool[i] for i in self._rng.choice(len(pool), size=n, replace=False)]
        total = np.zeros(3)
        total_sq = np.zeros(3)
        count = 0
        for start in range(0, n, EVAL_BATCH):
            for slide, idx in self._group(pick[start:start + EVAL_BATCH], train):
                x = self._read_patches(slide, idx).double().div_(255.0)  # (B, H, W, 3)
                total += x.sum(dim=(0, 1, 2)).cpu().numpy()
                total_sq += x.pow(2).sum(dim=(0, 1, 2)).cpu().numpy()
                count += x.shape[0] * x.shape[1] * x.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
        self.input_mean_ = mean.astype(np.float32)
        self.input_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)

    _group = staticmethod(group_by_slide)

    # -- Method API ---------------------------------------------------------------------------------------
    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        torch.manual_seed(context.seed)
        self._rng = np.random.default_rng(context.seed)
        pool = spot_pool(train, self._in_image)
        if not pool:
            raise ConfigError("stnet: no training spot has its patch inside the image; check the images and "
                              "images.min_inside")
        if self.frozen:
            stack = np.concatenate([np.asarray(s.features["spot"])[self._in_image(s)] for s in train]).astype(np.float64)
            mean, sd = standardiser(stack)
            self.mu_, self.sd_ = mean.astype(np.float32), sd.astype(np.float32)
            backbone, in_dim = None, stack.shape[1]
        else:
            backbone, self.weights_id = build_backbone(cfg)
            in_dim = backbone.num_features
            if cfg.input_norm == "estimated":
                self._estimate_input_norm(pool, train)
        self.model = STNetNet(in_dim, len(context.genes), backbone, clamp=cfg.clamp)
        if cfg.head_init == "mean":
            mean = np.concatenate([np.asarray(s.expr)[self._in_image(s)] for s in train]).mean(0)
            self.model.init_head_to_mean(mean)
        self.model.to(self.device)
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg.lr)
        higher = cfg.select_on == "pcc"
        scheduler = None
        if cfg.scheduler == "plateau" and val:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max" if higher else "min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        if not val:
            warnings.warn("stnet: no inner-validation slides: every epoch runs and the last one is kept "
                          "(no early stopping, no learning-rate schedule)", stacklevel=2)

        best, best_state, stale = -math.inf, None, 0
        self.history, self.best_epoch = [], None
        for epoch in range(cfg.epochs):
            self.model.train()
            losses, weights = [], []
            order = self._rng.permutation(len(pool))
            for start in range(0, len(order), cfg.batch_size):
                pick = [pool[i] for i in order[start:start + cfg.batch_size]]
                optimizer.zero_grad(set_to_none=True)
                loss = self._batch_loss(self._group(pick, train))
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                weights.append(len(pick))
            record = {"epoch": epoch, "train_loss": float(np.average(losses, weights=weights)),
                      "lr": optimizer.param_groups[0]["lr"]}
            if val:
                record["val_pcc"], record["val_loss"] = self._validate(val)
                score = record["val_pcc"] if higher else -record["val_loss"]
                if scheduler is not None and np.isfinite(score):
                    scheduler.step(score if higher else -score)
                if np.isfinite(score) and score > best:
                    best, stale, self.best_epoch = score, 0, epoch
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                elif np.isfinite(score):  # an undefined score (no usable validation gene) neither helps nor stops
                    stale += 1
            self.history.append(record)
            if val and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            self.best_epoch = len(self.history) - 1
        self.model.eval()

    def _batch_loss(self, slide_batches) -> torch.Tensor:
        """The recipe's loss of one training batch given as [(slide, spot indices)], pooled across slides."""
        x = torch.cat([self._inputs(slide, idx, augment=True) for slide, idx in slide_batches])
        truth = np.concatenate([np.asarray(slide.expr)[idx] for slide, idx in slide_batches])
        return self.loss_fn(self._forward(x), torch.as_tensor(truth, dtype=torch.float32, device=self.device))

    @torch.no_grad()
    def _validate(self, val) -> tuple[float, float]:
        """(mean over slides of the gene-mean PCC, the recipe's loss) on the validation spots inside the image.
        The loss pools every validation spot: Σ squared error ÷ G for ``sse``, the mean for ``mse``."""
        self.model.eval()
        scores, sq, n = [], 0.0, 0
        for slide in val:
            idx = np.flatnonzero(self._in_image(slide))
            if len(idx) == 0:
                continue
            pred = self._predict_idx(slide, idx)
            truth = np.asarray(slide.expr)[idx]
            scores.append(pcc(pred, truth).value)
            sq += float(((pred.astype(np.float64) - truth) ** 2).sum())
            n += truth.size
        if n == 0:
            return float("nan"), float("nan")
        n_genes = val[0].n_genes
        loss = sq / n_genes if self.config.loss == "sse" else sq / n
        finite = [s for s in scores if np.isfinite(s)]
        return (float(np.mean(finite)) if finite else float("nan")), float(loss)

    @torch.no_grad()
    def _predict_idx(self, slide, idx: np.ndarray) -> np.ndarray:
        """Predictions (float32, (len(idx), G)) of spots ``idx``: the mean over the 8 dihedral transforms
        of each patch with TTA, else of the patch itself."""
        self.model.eval()
        out = []
        for start in range(0, len(idx), EVAL_BATCH):
            chunk = idx[start:start + EVAL_BATCH]
            if self.uses_tta:
                pred = sum(self.model(self._inputs(slide, chunk, augment=False, k=k)) for k in range(N_DIHEDRAL))
                pred = pred / N_DIHEDRAL
            else:
                pred = self.model(self._inputs(slide, chunk, augment=False))
            out.append(pred.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.head.out_features), np.float32)

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def spot_loss(self, slide, spots: np.ndarray, truth: torch.Tensor) -> torch.Tensor:
        """Prompt fine-tuning: the recipe's loss on the prompt spots whose patch lies in the image."""
        spots = np.asarray(spots)
        keep = self._in_image(slide)[spots]
        if not keep.any():  # nothing to learn from: a zero loss that still reaches every parameter
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        keep_t = torch.as_tensor(keep, device=truth.device)
        x = self._inputs(slide, spots[keep], augment=True)
        return self.loss_fn(self._forward(x), truth[keep_t].to(self.device))

    @torch.no_grad()
    def predict(self, slide) -> np.ndarray:
        return self._predict_idx(slide, np.arange(slide.n_spots)).astype(np.float32)

    # -- saving and loading (stbench.torch_method) ----------------------------------------------------------
    #: arrays kept beside the network: feature standardisation (frozen), input statistics (estimated)
    EXTRA = ("mu_", "sd_", "input_mean_", "input_std_")

    def network_meta(self) -> dict:
        return {"in_dim": self.model.head.in_features, "n_genes": self.model.head.out_features}

    def build_network(self, meta: dict) -> STNetNet:
        backbone = None if self.frozen else build_backbone(self.config)[0]  # untrained: weights are loaded next
        return STNetNet(meta["in_dim"], meta["n_genes"], backbone, clamp=self.config.clamp)

    def extra_state(self) -> FittedState:
        arrays = {k: getattr(self, k) for k in self.EXTRA if getattr(self, k) is not None}
        return FittedState(arrays, {"weights_id": self.weights_id, "best_epoch": self.best_epoch,
                                    "history": self.history})

    def load_extra_state(self, state: FittedState) -> None:
        for k in self.EXTRA:
            setattr(self, k, state.arrays[k].astype(np.float32) if k in state.arrays else None)
        self.weights_id = state.meta["weights_id"]
        self.best_epoch = state.meta["best_epoch"]
        self.history = list(state.meta["history"])

    def summary(self) -> dict:
        cfg = self.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.model else 0
        last = self.history[-1] if self.history else {}
        best = self.history[self.best_epoch] if self.best_epoch is not None and self.history else {}
        out = {"recipe": cfg.recipe, "backbone": cfg.backbone, "weights_id": self.weights_id,
               "epochs_run": len(self.history), "best_epoch": self.best_epoch,
               "epoch_selection": SELECTION_LABEL[cfg.select_on] if any("val_pcc" in h for h in self.history)
               else "last epoch (no inner-validation slides)",
               "best_val_pcc": best.get("val_pcc"), "best_val_loss": best.get("val_loss"),
               "final_train_loss": last.get("train_loss"), "final_lr": last.get("lr"),
               "tta": self.uses_tta, "clamp": bool(cfg.clamp), "trainable_parameters": trainable,
               "device": str(self.device)}
        if self.input_mean_ is not None:
            out["input_mean"] = [round(float(v), 4) for v in self.input_mean_]
            out["input_std"] = [round(float(v), 4) for v in self.input_std_]
        return out
