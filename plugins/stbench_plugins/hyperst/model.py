"""HyperST's network, losses and training (METHODS.md §7.2-7.4); see the package docstring for choices."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stbench.errors import ConfigError
from stbench.images.augment import random_dihedral, to_float
from stbench.method import FitContext, FittedState
from stbench.nn import ResMLP
from stbench.torch_method import TorchMethod, pool_batch_size, spot_batches, spot_pool, standardiser
from stbench.weights import UNI_ARCH, UNI_HELP, UNI_TIMM_KWARGS, create_timm_model, resolve_weights, uni_weights
from stbench_plugins.hyperst import lorentz as L
from stbench_plugins.hyperst.losses import hca_loss, hea_loss

#: variant -> (geometry, niche level): the paper's model and the summary's ablations (METHODS.md §7)
VARIANTS = {"hyperst": ("lorentz", True), "euclidean": ("euclidean", True),
            "meru": ("lorentz", False), "clip": ("euclidean", False)}
#: clamps of the learnable scalars (§7.2 item 5, §7.3)
CURVATURE_RANGE = (0.1, 10.0)
MAX_LOGIT_SCALE = 100.0
#: spots per forward pass at prediction and validation time
EVAL_BATCH = 256


# ------------------------------------------------------------------------------------------------------
# the backbone


def _backbone_arch(config) -> tuple[str, dict, object, str, bool]:
    """(timm arch, timm kwargs, weights, help text, use the local timm cache) of the configured backbone."""
    if config.backbone == "uni":
        return UNI_ARCH, {**UNI_TIMM_KWARGS, "img_size": config.input_px}, uni_weights(config.backbone_weights), UNI_HELP, False
    return config.backbone, {"img_size": config.input_px}, config.backbone_weights, "", True


def check_backbone_weights(config) -> None:
    """Fail early (when the method is configured) if the backbone's weights cannot be found."""
    arch, _, weights, help_text, use_cache = _backbone_arch(config)
    resolve_weights(arch, weights, label=f"method hyperst's backbone {config.backbone}",
                    option="--set methods.hyperst.backbone_weights={}", weights_help=help_text, use_timm_cache=use_cache)


def build_backbone(config) -> tuple[nn.Module, str]:
    """The shared ViT, frozen, with LoRA adapters (peft) on ``qkv`` of its last ``lora_blocks`` blocks."""
    from peft import LoraConfig, inject_adapter_in_model

    arch, kwargs, weights, help_text, use_cache = _backbone_arch(config)
    try:
        model, weights_id, _ = create_timm_model(
            arch, weights, label=f"method hyperst's backbone {config.backbone}",
            option="--set methods.hyperst.backbone_weights={}", weights_help=help_text, use_timm_cache=use_cache,
            timm_kwargs=kwargs)
    except TypeError as exc:  # not a ViT: no img_size argument
        raise ConfigError(f"hyperst: backbone {config.backbone!r} is not a timm ViT ({exc}); "
                          "choose one such as vit_tiny_patch16_224 or uni (key methods.hyperst.backbone)") from None
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise ConfigError(f"hyperst: backbone {config.backbone!r} has no transformer blocks with attn.qkv; "
                          "choose a timm ViT (key methods.hyperst.backbone)")
    n = len(blocks)
    if not 0 < config.lora_blocks <= n:
        raise ConfigError(f"hyperst: lora_blocks must be in 1..{n} for {config.backbone}, got {config.lora_blocks} "
                          "(key methods.hyperst.lora_blocks)")
    model.requires_grad_(False)
    targets = [f"blocks.{i}.attn.qkv" for i in range(n - config.lora_blocks, n)]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      bias="none", target_modules=targets)
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model, weights_id


# ------------------------------------------------------------------------------------------------------
# the network


class HyperSTNet(nn.Module):
    """§7.2: projectors, four ResMLP encoders, shared bias-free projections, learnable α, c and s, and
    the decoder on the Euclidean aligned image features. ``backbone`` is None in the frozen variant."""

    def __init__(self, config, in_dim: int, n_genes: int, backbone: Optional[nn.Module] = None):
        super().__init__()
        d = config.dim
        self.config = config
        self.geometry, self.niche_level = VARIANTS[config.variant]
        self.backbone = backbone
        self.image_projector = nn.Linear(in_dim, d)
        self.niche_image_projector = nn.Linear(in_dim, d)
        self.gene_encoder = nn.Linear(n_genes, d)
        self.niche_gene_encoder = nn.Linear(n_genes, d)
        self.spot_image_encoder = ResMLP(d, d, dropout=config.image_dropout)
        self.niche_image_encoder = ResMLP(d, d, dropout=config.image_dropout)
        self.spot_gene_encoder = ResMLP(d, d, dropout=config.gene_dropout)
        self.niche_gene_encoder_mlp = ResMLP(d, d, dropout=config.gene_dropout)
        # shared between spot and niche; bias-free, N(0, D^-1/2)
        self.image_proj = nn.Linear(d, d, bias=False)
        self.gene_proj = nn.Linear(d, d, bias=False)
        for proj in (self.image_proj, self.gene_proj):
            nn.init.normal_(proj.weight, std=d ** -0.5)
        self.log_alpha_img = nn.Parameter(torch.tensor(math.log(d ** -0.5)))
        self.log_alpha_gene = nn.Parameter(torch.tensor(math.log(d ** -0.5)))
        self.log_curvature = nn.Parameter(torch.tensor(math.log(config.curvature_init)))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        dec_in = 2 * d if config.decoder_input == "both" else d
        self.decoder = nn.Sequential(ResMLP(dec_in, d, depth=2, mlp_ratio=2, dropout=0.1), nn.Linear(d, n_genes))

    # -- learnable scalars, clamped as the code does -----------------------------------------------
    @property
    def curvature(self) -> torch.Tensor:
        return self.log_curvature.exp().clamp(*CURVATURE_RANGE)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def _lift(self, x: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
        scaled = x.float() * log_alpha.clamp(max=0.0).exp()  # α ≤ 1
        return L.expmap0(scaled, self.curvature) if self.geometry == "lorentz" else scaled

    # -- branches -----------------------------------------------------------------------------------
    def image_features(self, spot: torch.Tensor, niche: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean aligned image features I_s, I_n from images (one shared backbone) or frozen features."""
        if self.backbone is not None:
            both = self.backbone(torch.cat([spot, niche]))  # the same module (and adapters) for both
            spot, niche = both[: len(spot)], both[len(spot):]
        i_s = self.image_proj(self.spot_image_encoder(self.image_projector(spot)))
        i_n = self.image_proj(self.niche_image_encoder(self.niche_image_projector(niche)))
        return i_s, i_n

    def gene_features(self, spot_expr: torch.Tensor, niche_expr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_s = self.gene_proj(self.spot_gene_encoder(self.gene_encoder(spot_expr)))
        g_n = self.gene_proj(self.niche_gene_encoder_mlp(self.niche_gene_encoder(niche_expr)))
        return g_s, g_n

    def decode(self, i_s: torch.Tensor, i_n: torch.Tensor) -> torch.Tensor:
        x = {"both": lambda: torch.cat([i_s, i_n], -1), "spot": lambda: i_s, "niche": lambda: i_n}[self.config.decoder_input]()
        return self.decoder(x)

    def losses(self, i_s, i_n, g_s, g_n, pred, truth) -> dict[str, torch.Tensor]:
        """§7.3: L = L_pred + α (L_HCA + β L_HEA), with the configured variant and ablations."""
        cfg = self.config
        out = {"pred": F.mse_loss(pred.float(), truth.float())}
        zero = out["pred"].new_zeros(())
        hi_s, hi_n = self._lift(i_s, self.log_alpha_img), self._lift(i_n, self.log_alpha_img)
        hg_s, hg_n = self._lift(g_s, self.log_alpha_gene), self._lift(g_n, self.log_alpha_gene)
        c = self.curvature if self.geometry == "lorentz" else None
        out["hca"] = hca_loss(hi_s, hi_n, hg_s, hg_n, self.logit_scale, self.geometry, c,
                              niche=self.niche_level) if cfg.hca else zero
        if not cfg.hea:
            out["hea"] = zero
        elif self.niche_level:
            out["hea"] = hea_loss(hi_s, hi_n, hg_s, hg_n, c, form=cfg.hea_form, geometry=self.geometry,
                                  include_gene_image=cfg.hea_gene_image, reverse=cfg.reverse_entailment,
                                  min_radius=cfg.min_radius)
        else:  # MERU / CLIP: the one spot-level pair, spot image ⊒ spot gene (reversed if asked)
            parent, child = (hg_s, hi_s) if cfg.reverse_entailment else (hi_s, hg_s)
            if self.geometry == "lorentz":
                out["hea"] = L.entailment(parent, child, c, min_radius=cfg.min_radius).mean()
            else:
                out["hea"] = L.euclidean_entailment(parent, child, K=cfg.min_radius).mean()
        out["total"] = out["pred"] + cfg.alpha * (out["hca"] + cfg.beta * out["hea"])
        return out


# ------------------------------------------------------------------------------------------------------
# the method


class HyperST(TorchMethod):
    saved_weights_fields = ("backbone_weights",)

    def __init__(self, config):
        checks = (("variant", tuple(VARIANTS)), ("decoder_input", ("both", "spot", "niche")),
                  ("hea_form", ("code", "paper")), ("checkpoint", ("last", "best")))
        for key, allowed in checks:
            if getattr(config, key) not in allowed:
                raise ConfigError(f"hyperst: {key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r} "
                                  f"(key methods.hyperst.{key})")
        if config.batch_size < 2:
            raise ConfigError("hyperst: batch_size must be at least 2 (contrastive negatives; key methods.hyperst.batch_size)")
        self.config = config
        self.frozen = config.backbone == "frozen"
        if not self.frozen:
            check_backbone_weights(config)  # a missing checkpoint stops the run before any data is read
        self.lr, self.batch_size = config.lr, config.batch_size
        self.model: Optional[HyperSTNet] = None
        self.device = torch.device("cpu")
        self.history: list[dict] = []
        self.weights_id = "none"
        self._rng = np.random.default_rng(0)

    # -- inputs ---------------------------------------------------------------------------------------
    def _requests(self):
        from stbench_plugins.hyperst import hyperst_patches

        return [r.name for r in hyperst_patches(self.config)]

    def _trainable_spots(self, slide) -> np.ndarray:
        """Spots used for training: spot and niche inside the image, and a complete niche if asked."""
        if self.frozen:
            keep = slide.features["spot_mask"] & slide.features["niche_mask"]
        else:
            spot, niche = (slide.patches[n] for n in self._requests())
            keep = spot.mask[:, 0] & niche.mask[:, 0]
        if self.config.complete_niches_only:
            keep = keep & slide.niche_complete
        return np.flatnonzero(keep)

    def _images(self, slide, idx: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs of spots ``idx``: normalised patches (trainable backbone) or standardised features."""
        if self.frozen:
            spot = (slide.features["spot"][idx] - self.mu_) / self.sd_
            niche = (slide.features["niche"][idx] - self.mu_n_) / self.sd_n_
            return (torch.tensor(spot, dtype=torch.float32, device=self.device),
                    torch.tensor(niche, dtype=torch.float32, device=self.device))
        spot_set, niche_set = (slide.patches[n] for n in self._requests())
        spot, niche = spot_set.read(idx)[:, 0], niche_set.read(idx)[:, 0]
        spot_t = torch.from_numpy(spot).to(self.device)
        niche_t = torch.from_numpy(niche).to(self.device)
        if augment:  # one of the 8 dihedral transforms per spot, the same for its niche (§7.1)
            spot_t, niche_t = random_dihedral([spot_t, niche_t], self._rng, channels_last=True)
        return to_float(spot_t, "imagenet"), to_float(niche_t, "imagenet")

    def _batch_losses(self, slide_batches, augment: bool) -> dict:
        """Losses of one batch given as [(slide, spot indices)], pooled across slides."""
        spots, niches, y, yn = [], [], [], []
        for slide, idx in slide_batches:
            s, n = self._images(slide, idx, augment)
            spots.append(s)
            niches.append(n)
            y.append(slide.expr[idx])
            yn.append(slide.niche_expr[idx])
        truth = torch.tensor(np.concatenate(y), dtype=torch.float32, device=self.device)
        niche_truth = torch.tensor(np.concatenate(yn), dtype=torch.float32, device=self.device)
        with self._autocast():
            i_s, i_n = self.model.image_features(torch.cat(spots), torch.cat(niches))
            g_s, g_n = self.model.gene_features(truth, niche_truth)
            pred = self.model.decode(i_s, i_n)
        return self.model.losses(i_s, i_n, g_s, g_n, pred, truth)

    def _autocast(self):
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=enabled)

    def _batches(self, pool: list[tuple[int, int]], slides, size: int, shuffle: bool, drop_last: bool):
        order = self._rng.permutation(len(pool)) if shuffle else np.arange(len(pool))
        return spot_batches(pool, slides, order, size, drop_last, min_size=2)  # contrastive terms need a negative

    # -- Method API ---------------------------------------------------------------------------------------
    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        torch.manual_seed(context.seed)
        self._rng = np.random.default_rng(context.seed)
        if self.frozen:
            stack = np.concatenate([s.features["spot"][s.features["spot_mask"]] for s in train])
            niche = np.concatenate([s.features["niche"][s.features["niche_mask"]] for s in train])
            (self.mu_, self.sd_), (self.mu_n_, self.sd_n_) = standardiser(stack), standardiser(niche)
            backbone, in_dim = None, stack.shape[1]
        else:
            backbone, self.weights_id = build_backbone(cfg)
            in_dim = backbone.num_features
        self.model = HyperSTNet(cfg, in_dim, len(context.genes), backbone)
        if cfg.init_bias_to_mean:
            mean = np.concatenate([s.expr for s in train]).mean(0)
            self.model.decoder[-1].bias.data.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.model.to(self.device)
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg.lr)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.device.type == "cuda")

        pool = spot_pool(train, self._trainable_spots)
        if len(pool) < 2:
            raise ConfigError(f"hyperst: only {len(pool)} training spot(s) have their spot and niche inside the image "
                              "and a complete niche; set methods.hyperst.complete_niches_only=false or use more slides")
        batch = pool_batch_size(len(pool), cfg.batch_size, "hyperst")
        val_pool = spot_pool(val, self._trainable_spots)
        best, best_state, stale = math.inf, None, 0
        self.history = []
        for epoch in range(cfg.epochs):
            self.model.train()
            train_loss = []
            for batch_slides in self._batches(pool, train, batch, shuffle=True, drop_last=True):
                optimizer.zero_grad(set_to_none=True)
                losses = self._batch_losses(batch_slides, augment=True)
                scaler.scale(losses["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                train_loss.append(float(losses["total"].detach()))
            record = {"epoch": epoch, "train_loss": float(np.mean(train_loss))}
            if val_pool:
                record["val_loss"] = self._evaluate(val_pool, val)
                if record["val_loss"] < best:
                    best, stale = record["val_loss"], 0
                    if cfg.checkpoint == "best":
                        best_state = self._trainable_state()
                else:
                    stale += 1
            self.history.append(record)
            if val_pool and stale >= cfg.patience:
                break
        if cfg.checkpoint == "best" and best_state is not None:
            self.model.load_state_dict(best_state, strict=False)
        self.model.eval()

    def _trainable_state(self) -> dict:
        """A copy of what training changes (adapters, heads, scalars): the frozen backbone is not copied."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in names}

    @torch.no_grad()
    def _evaluate(self, pool, slides) -> float:
        self.model.eval()
        totals, weights = [], []
        for batch_slides in self._batches(pool, slides, EVAL_BATCH, shuffle=False, drop_last=False):
            n = sum(len(ix) for _, ix in batch_slides)
            totals.append(float(self._batch_losses(batch_slides, augment=False)["total"]) * n)
            weights.append(n)
        return sum(totals) / max(sum(weights), 1)

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)

    def _predict_spots(self, slide, idx: np.ndarray, augment: bool = False) -> torch.Tensor:
        spot, niche = self._images(slide, idx, augment)
        with self._autocast():
            i_s, i_n = self.model.image_features(spot, niche)
            return self.model.decode(i_s, i_n).float()

    def spot_loss(self, slide, spots: np.ndarray, truth: torch.Tensor) -> torch.Tensor:
        """Prompt fine-tuning: the prediction loss only (a test slide has no niche profiles to align)."""
        return F.mse_loss(self._predict_spots(slide, np.asarray(spots), augment=True), truth)

    @torch.no_grad()
    def predict(self, slide) -> np.ndarray:
        self.model.eval()
        out = np.empty((slide.n_spots, slide.n_genes), dtype=np.float32)
        for start in range(0, slide.n_spots, EVAL_BATCH):
            idx = np.arange(start, min(start + EVAL_BATCH, slide.n_spots))
            out[idx] = self._predict_spots(slide, idx).cpu().numpy()
        return out

    # -- saving and loading (stbench.torch_method) ----------------------------------------------------------
    #: the frozen variant's feature standardisation (spot and niche)
    EXTRA = ("mu_", "sd_", "mu_n_", "sd_n_")

    def network_meta(self) -> dict:
        return {"in_dim": self.model.image_projector.in_features, "n_genes": self.model.gene_encoder.in_features}

    def build_network(self, meta: dict) -> HyperSTNet:
        # the whole network is saved, the frozen ViT included: built untrained (with its adapters), then loaded
        backbone = None if self.frozen else build_backbone(self.config)[0]
        return HyperSTNet(self.config, meta["in_dim"], meta["n_genes"], backbone)

    def extra_state(self) -> FittedState:
        arrays = {k: getattr(self, k) for k in self.EXTRA} if self.frozen else {}
        return FittedState(arrays, {"weights_id": self.weights_id, "history": self.history})

    def load_extra_state(self, state: FittedState) -> None:
        for k in self.EXTRA:
            if k in state.arrays:
                setattr(self, k, state.arrays[k])
        self.weights_id = state.meta["weights_id"]
        self.history = list(state.meta["history"])

    def summary(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.model else 0
        return {"epochs_run": len(self.history), "backbone": self.config.backbone, "weights_id": self.weights_id,
                "trainable_parameters": trainable, "device": str(self.device),
                "final_val_loss": self.history[-1].get("val_loss") if self.history else None}
