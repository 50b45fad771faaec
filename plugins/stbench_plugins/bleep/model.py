"""BLEEP's network, loss, training and retrieval (METHODS.md §5); see the package docstring for choices."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stbench.errors import ConfigError
from stbench.images.augment import random_flips_rot90, to_float
from stbench.method import FitContext, FinetuneSettings, FittedState, training_slides
from stbench.nn import PromptProjection
from stbench.torch_method import TorchMethod, pool_batch_size, spot_batches, spot_pool, standardiser
from stbench.weights import create_timm_model, resolve_weights
from stbench_plugins.bleep import AGGREGATES, MATCH_ON, bleep_patches
from stbench_plugins.bleep.retrieval import ReferenceSet

#: spots per forward pass when embedding queries (patches) and reference spots (expression vectors)
EVAL_BATCH = 256
SPOT_BATCH = 8192


def bleep_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The symmetric soft-target contrastive loss of §5 on a batch of B pairs (B × P each), in float32.

    logits = S Iᵀ / τ; T = row-softmax((I Iᵀ + S Sᵀ) / 2 / τ);
    L = mean_i ½ [CE_soft(logits_i, T_i) + CE_soft(logitsᵀ_i, Tᵀ_i)], CE_soft(l, t) = −Σ_j t_j log softmax(l)_j.
    """
    i, s = image_emb.float(), spot_emb.float()
    logits = s @ i.T / temperature
    targets = torch.softmax((i @ i.T + s @ s.T) / 2 / temperature, dim=-1)
    spots_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return ((spots_loss + images_loss) / 2).mean()


# ------------------------------------------------------------------------------------------------------
# the backbone and the network


def _weights_args(config) -> dict:
    return dict(label=f"method bleep's backbone {config.backbone}", option="--set methods.bleep.backbone_weights={}")


def check_backbone(config) -> None:
    """Fail early (when the method is configured): an unknown timm name or weights that cannot be found."""
    import timm

    if not timm.is_model(config.backbone):
        raise ConfigError(f"bleep: backbone {config.backbone!r} is not a timm model; use e.g. resnet18, resnet50 "
                          "or frozen (key methods.bleep.backbone)")
    resolve_weights(config.backbone, config.backbone_weights, **_weights_args(config))


def build_backbone(config) -> tuple[nn.Module, str]:
    """The trainable timm CNN with global pooling and no classifier (``num_classes=0``), and its weights id."""
    model, weights_id, _ = create_timm_model(config.backbone, config.backbone_weights, num_classes=0,
                                             **_weights_args(config))
    model.requires_grad_(True)
    return model, weights_id


class BLEEPNet(nn.Module):
    """Image encoder (None in the frozen variant: the inputs are features) and the two projection heads."""

    def __init__(self, in_dim: int, n_genes: int, projection_dim: int, dropout: float,
                 backbone: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.image_projection = PromptProjection(in_dim, projection_dim, dropout, residual=True)
        self.spot_projection = PromptProjection(n_genes, projection_dim, dropout, residual=True)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) if self.backbone is not None else x

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.image_features(x))

    def embed_spots(self, y: torch.Tensor) -> torch.Tensor:
        return self.spot_projection(y)


# ------------------------------------------------------------------------------------------------------
# the method


class BLEEP(TorchMethod):
    """Trains the contrastive model, then predicts by retrieval from the fold's reference set.

    After :meth:`fit`: ``history`` (one record per epoch: ``train_loss``, ``val_loss``), ``reference``
    (a :class:`~stbench_plugins.bleep.retrieval.ReferenceSet` of every training-patient spot, embedded
    once per fold) and ``best_epoch``.
    """

    saved_weights_fields = ("backbone_weights",)

    def __init__(self, config):
        for key, allowed in (("aggregate", AGGREGATES), ("match_on", MATCH_ON)):
            if getattr(config, key) not in allowed:
                raise ConfigError(f"bleep: {key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r} "
                                  f"(key methods.bleep.{key})")
        for key, low in (("k", 1), ("batch_size", 2), ("epochs", 1), ("projection_dim", 1), ("patience", 0)):
            if getattr(config, key) < low:
                raise ConfigError(f"bleep: {key} must be at least {low}, got {getattr(config, key)} "
                                  f"(key methods.bleep.{key})")
        if not config.temperature > 0:
            raise ConfigError(f"bleep: temperature must be positive, got {config.temperature} (key methods.bleep.temperature)")
        self.config = config
        self.frozen = config.backbone == "frozen"
        if not self.frozen:
            check_backbone(config)  # a missing checkpoint stops the run before any data is read
        self.lr, self.batch_size = config.lr, config.batch_size
        self.model: Optional[BLEEPNet] = None
        self.device = torch.device("cpu")
        self.history: list[dict] = []
        self.best_epoch: Optional[int] = None
        self.weights_id = "none"
        self.reference: Optional[ReferenceSet] = None
        self._reference_expr: Optional[torch.Tensor] = None
        self._rng = np.random.default_rng(0)

    # -- inputs ---------------------------------------------------------------------------------------
    def _patch_name(self) -> str:
        return bleep_patches(self.config)[0].name

    def _trainable_spots(self, slide) -> np.ndarray:
        """Training spots: those whose patch lies in the image (whose features are real, when frozen)."""
        keep = slide.features["spot_mask"] if self.frozen else slide.patches[self._patch_name()].mask[:, 0]
        return np.flatnonzero(keep)

    def _inputs(self, slide, idx: np.ndarray, augment: bool) -> torch.Tensor:
        """Backbone inputs of spots ``idx``: normalised patches, or standardised features (frozen)."""
        if self.frozen:
            x = (slide.features["spot"][idx] - self.mu_) / self.sd_
            return torch.tensor(x, dtype=torch.float32, device=self.device)
        patches = slide.patches[self._patch_name()].read(idx)[:, 0]
        x = torch.from_numpy(patches).to(self.device)
        if augment:
            x = random_flips_rot90(x, self._rng, channels_last=True)
        return to_float(x, "imagenet")

    def _autocast(self):
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=enabled)

    def _loss(self, slide_batches, augment: bool) -> torch.Tensor:
        """The contrastive loss of one batch given as [(slide, spot indices)], pooled across slides."""
        images = torch.cat([self._inputs(s, idx, augment) for s, idx in slide_batches])
        truth = torch.tensor(np.concatenate([s.expr[idx] for s, idx in slide_batches]), dtype=torch.float32,
                             device=self.device)
        return self._pair_loss(images, truth)

    def _pair_loss(self, images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            image_emb, spot_emb = self.model.embed_images(images), self.model.embed_spots(truth)
        return bleep_loss(image_emb, spot_emb, self.config.temperature)

    @staticmethod
    def _batches(pool: list, slides, order: np.ndarray, size: int, drop_last: bool):
        return spot_batches(pool, slides, order, size, drop_last, min_size=2)  # a contrastive batch needs a negative

    # -- Method API ---------------------------------------------------------------------------------------
    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        torch.manual_seed(context.seed)
        self._rng = np.random.default_rng(context.seed)
        if self.frozen:
            stack = np.concatenate([s.features["spot"][s.features["spot_mask"]] for s in train])
            self.mu_, self.sd_ = standardiser(stack)
            backbone, in_dim = None, stack.shape[1]
        else:
            backbone, self.weights_id = build_backbone(cfg)
            in_dim = backbone.num_features
        if cfg.match_on == "unprojected" and in_dim != cfg.projection_dim:
            raise ConfigError(f"bleep: match_on=unprojected compares {in_dim}-d image features with {cfg.projection_dim}-d "
                              f"spot embeddings; set methods.bleep.projection_dim={in_dim}")
        self.model = BLEEPNet(in_dim, len(context.genes), cfg.projection_dim, cfg.dropout, backbone).to(self.device)
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg.lr)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.device.type == "cuda")

        pool = spot_pool(train, self._trainable_spots)
        if len(pool) < 2:
            raise ConfigError(f"bleep: only {len(pool)} training spot(s) have their patch inside the image; "
                              "a contrastive model needs at least 2")
        batch = pool_batch_size(len(pool), cfg.batch_size, "bleep")
        val_pool = spot_pool(val, self._trainable_spots)
        # validation batches: one fixed random order, so the loss of every epoch is over the same batches
        val_order = np.random.default_rng(context.seed + 1).permutation(len(val_pool))
        best, best_state, stale = math.inf, None, 0
        self.history, self.best_epoch = [], None
        for epoch in range(cfg.epochs):
            self.model.train()
            losses = []
            for batch_slides in self._batches(pool, train, self._rng.permutation(len(pool)), batch, cfg.drop_last):
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(batch_slides, augment=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
            record = {"epoch": epoch, "train_loss": float(np.mean(losses))}
            if val_pool:
                record["val_loss"] = self._evaluate(val_pool, val, val_order, batch)
                if record["val_loss"] < best:
                    best, stale, self.best_epoch = record["val_loss"], 0, epoch
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    stale += 1
            self.history.append(record)
            if val_pool and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:  # the checkpoint with the lowest inner-validation loss
            self.model.load_state_dict(best_state)
        self.model.eval()
        # the reference set: every spot of the training patients (training and validation slides)
        self._reference_expr = torch.tensor(np.concatenate([s.expr for s in training_slides(train, val, context)]), dtype=torch.float32,
                                            device=self.device)
        self._embed_reference()

    @torch.no_grad()
    def _evaluate(self, pool, slides, order, batch: int) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for batch_slides in self._batches(pool, slides, order, batch, drop_last=False):
            size = sum(len(ix) for _, ix in batch_slides)
            total += float(self._loss(batch_slides, augment=False)) * size
            n += size
        return total / max(n, 1)

    @torch.no_grad()
    def _embed_spots(self, expr: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        out = []
        for start in range(0, len(expr), SPOT_BATCH):
            with self._autocast():
                out.append(self.model.embed_spots(expr[start:start + SPOT_BATCH]).float())
        return torch.cat(out)

    def _embed_reference(self) -> None:
        """Embed the reference spots once (after training, and again after any fine-tuning)."""
        self.reference = ReferenceSet(self._embed_spots(self._reference_expr), self._reference_expr)

    @torch.no_grad()
    def _embed_queries(self, slide) -> torch.Tensor:
        """The query vector of every spot: the projected image embedding (or TRIPLEX's un-projected features)."""
        self.model.eval()
        out = []
        for start in range(0, slide.n_spots, EVAL_BATCH):
            x = self._inputs(slide, np.arange(start, min(start + EVAL_BATCH, slide.n_spots)), augment=False)
            with self._autocast():
                feats = self.model.image_features(x)
                out.append((feats if self.config.match_on == "unprojected" else self.model.image_projection(feats)).float())
        return torch.cat(out)

    def reference_for(self, slide) -> ReferenceSet:
        """The reference set used for ``slide``: the fold's, plus its prompt spots if ``prompts_in_reference``."""
        if not self.config.prompts_in_reference or slide.prompt_idx is None or len(slide.prompt_idx) == 0:
            return self.reference
        expr = torch.tensor(np.asarray(slide.prompt_expr), dtype=torch.float32, device=self.device)
        return self.reference.extended(self._embed_spots(expr), expr)

    @torch.no_grad()
    def predict(self, slide) -> np.ndarray:
        queries = self._embed_queries(slide)
        pred = self.reference_for(slide).predict(queries, self.config.k, self.config.aggregate)
        return pred.cpu().numpy().astype(np.float32)

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)

    def spot_loss(self, slide, spots: np.ndarray, truth: torch.Tensor) -> torch.Tensor:
        """The contrastive loss on prompt spots. Used only if a spec lets the harness fine-tune BLEEP; the
        registered one says ``finetune=False`` (PHG2ST does not fine-tune BLEEP, METHODS.md §9.1)."""
        return self._pair_loss(self._inputs(slide, np.asarray(spots), augment=True), truth)

    def finetune(self, slide, settings: FinetuneSettings) -> None:
        super().finetune(slide, settings)
        self._embed_reference()  # the spot head changed: the cached reference embeddings are stale

    # -- saving and loading (stbench.torch_method) ----------------------------------------------------------
    def network_meta(self) -> dict:
        return {"in_dim": self.model.image_projection.w.in_features, "n_genes": self.model.spot_projection.w.in_features}

    def build_network(self, meta: dict) -> BLEEPNet:
        backbone = None if self.frozen else build_backbone(self.config)[0]  # untrained: weights are loaded next
        return BLEEPNet(meta["in_dim"], meta["n_genes"], self.config.projection_dim, self.config.dropout, backbone)

    def extra_state(self) -> FittedState:
        # the reference set as it was embedded after training, so retrieval after loading is the same
        emb = torch.cat([unit * norm[:, None] for unit, norm, _ in self.reference.blocks[:1]])
        arrays = {"reference_expr": self._reference_expr.cpu().numpy(), "reference_embeddings": emb.cpu().numpy()}
        if self.frozen:
            arrays.update(mu=self.mu_, sd=self.sd_)
        return FittedState(arrays, {"weights_id": self.weights_id, "best_epoch": self.best_epoch,
                                    "history": self.history})

    def load_extra_state(self, state: FittedState) -> None:
        if self.frozen:
            self.mu_, self.sd_ = state.arrays["mu"], state.arrays["sd"]
        self._reference_expr = torch.as_tensor(state.arrays["reference_expr"], dtype=torch.float32, device=self.device)
        embeddings = torch.as_tensor(state.arrays["reference_embeddings"], dtype=torch.float32, device=self.device)
        self.reference = ReferenceSet(embeddings, self._reference_expr)
        self.weights_id = state.meta["weights_id"]
        self.best_epoch = state.meta["best_epoch"]
        self.history = list(state.meta["history"])

    def summary(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.model else 0
        best = self.history[self.best_epoch].get("val_loss") if self.best_epoch is not None else None
        return {"recipe": self.config.recipe, "backbone": self.config.backbone, "weights_id": self.weights_id,
                "epochs_run": len(self.history), "best_epoch": self.best_epoch, "best_val_loss": best,
                "reference_spots": len(self.reference) if self.reference is not None else 0,
                "trainable_parameters": trainable, "device": str(self.device)}
