"""PHG2ST as an stbench Method: inputs, training and model selection (METHODS.md §8.4), prediction."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from stbench.errors import ConfigError, DataError
from stbench.method import FitContext, FittedState, Method
from stbench.metrics import pcc
from stbench.prompts import n_prompts, select_prompts
from stbench.torch_method import group_by_slide, spot_pool
from stbench_plugins.phg2st.chunks import SlidePart, slide_parts
from stbench_plugins.phg2st.hypergraph import (code_neighbour_hypergraphs, code_spot_hypergraph, neighbour_hypergraphs,
                                               shared_tensor, spot_hypergraph)
from stbench_plugins.phg2st.network import PHG2STNet, phg2st_loss

#: the allowed values of the string options
CHOICES = {
    "loss_on": ("all", "non_prompt"),
    "hgnn_variant": ("paper", "code"),
    "fusion": ("sum", "code"),
    "heads": ("paper", "code"),
    "spot_hyperedges": ("paper", "code"),
    "neighbour_hyperedges": ("paper", "code"),
    "batching": ("slide", "spots"),
    "optimizer": ("paper", "code"),
    "init": ("torch", "trunc_normal"),
    "precision": ("32", "bf16-mixed", "16-mixed"),
    "dropout_masks": ("torch", "uniform"),
}
#: the autocast type of each mixed precision
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: optimizer="code": ReduceLROnPlateau on the validation PCC (PH2ST config: factor 0.1, patience 10)
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.1, 10


@dataclass
class SlideState:
    """What PHG2ST keeps of one slide while it uses it: network inputs on the device, the raw neighbour
    features its neighbour hypergraphs are built from, and its parts (:mod:`.chunks`)."""

    spot: torch.Tensor  # (N, d)
    nb: torch.Tensor  # (N, 25, d)
    nb_mask: torch.Tensor  # (N, 25) bool
    nb_raw: torch.Tensor  # (N, 25, d) on the CPU
    grid: torch.Tensor  # (N, 2)
    parts: list[SlidePart]
    part_of: np.ndarray  # (N,) the part whose core holds each spot
    row_in_core: np.ndarray  # (N,) the spot's row in that core
    tensors: list[dict] = field(default_factory=list)  # per part, on the device


class PHG2ST(Method):
    def __init__(self, config):
        for key, allowed in CHOICES.items():
            if getattr(config, key) not in allowed:
                raise ConfigError(f"phg2st: {key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r} (key methods.phg2st.{key})")
        if not 0 < config.train_prompt_ratio < 1:
            raise ConfigError("phg2st: train_prompt_ratio must be in (0, 1) (key methods.phg2st.train_prompt_ratio)")
        if config.max_spots < 1 or config.batch_size < 1 or config.chunk_halo < 0:
            raise ConfigError("phg2st: max_spots and batch_size must be >= 1 and chunk_halo >= 0 (keys methods.phg2st.max_spots, .batch_size, .chunk_halo)")
        self.config = config
        self.device = torch.device("cpu")  # the harness's choice (FitContext.device) is taken in fit
        self.net: Optional[PHG2STNet] = None
        self._states: dict[str, SlideState] = {}
        self.history: list[dict] = []
        self.seed = 0

    # -- inputs ---------------------------------------------------------------------------------
    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        """Network input features: as they are (the sources), or standardised with training statistics."""
        x = np.asarray(x, dtype=np.float32)
        if self.config.standardise_features:
            x = ((x - self.mu_) / self.sd_).astype(np.float32)
        return shared_tensor(x)

    def _spot_graph(self, features: np.ndarray, positions: np.ndarray):
        """The whole slide's spot hypergraph, from the encoder's own (raw) features (§8.2 (2))."""
        build = code_spot_hypergraph if self.config.spot_hyperedges == "code" else spot_hypergraph
        return build(features, positions, k=self.config.k)

    def _neighbour_graph(self, raw: torch.Tensor, mask: torch.Tensor):
        """The 5×5 neighbour hypergraphs of B spots from their raw (B, 25, d) features (§8.2 (4))."""
        if self.config.neighbour_hyperedges == "code":
            edges, weights = code_neighbour_hypergraphs(raw)
        else:
            edges, weights = neighbour_hypergraphs(raw, mask, k=self.config.k, weighted=self.config.weight_neighbour_hyperedges)
        return edges.to(self.device), weights.to(self.device)

    def _prepare(self, slide) -> SlideState:
        """A slide's inputs and hypergraphs, built once and reused by every epoch and prediction."""
        if slide.name in self._states:
            return self._states[slide.name]
        grid = np.asarray(slide.grid, dtype=np.int64)
        cells, counts = np.unique(grid, axis=0, return_counts=True)
        if (counts > 1).any():
            cell = tuple(int(v) for v in cells[np.argmax(counts > 1)])
            raise DataError(f"phg2st: slide {slide.name}: {int((counts[counts > 1]).sum())} spots share grid cells "
                            f"(e.g. {cell}); PEG places one spot per cell: fix the section's grid coordinates")
        raw_spot = np.asarray(slide.features["spot"], dtype=np.float32)
        raw_nb = np.asarray(slide.features["neighbour"], dtype=np.float32)
        pos = slide.positions_um()
        if self.net.spot_hops:
            edges, weights = self._spot_graph(raw_spot, pos)
        else:
            edges, weights = np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
        parts = slide_parts(pos, edges, weights, self.config.max_spots, self.config.chunk_halo, self.net.spot_hops)
        part_of, row_in_core = np.empty(len(grid), np.int64), np.empty(len(grid), np.int64)
        for i, part in enumerate(parts):
            part_of[part.core], row_in_core[part.core] = i, np.arange(len(part.core))
        dev = self.device
        state = SlideState(spot=self._inputs(raw_spot).to(dev), nb=self._inputs(raw_nb).to(dev),
                           nb_mask=torch.from_numpy(np.asarray(slide.features["neighbour_mask"], dtype=bool)).to(dev),
                           nb_raw=shared_tensor(raw_nb), grid=shared_tensor(grid).to(dev), parts=parts,
                           part_of=part_of, row_in_core=row_in_core)
        for part in parts:
            state.tensors.append({"inputs": torch.from_numpy(part.inputs).to(dev), "n_local": len(part.local), "grid": torch.from_numpy(grid[part.local]).to(dev),
                                  "edges": torch.from_numpy(part.edges).to(dev),
                                  "weights": torch.from_numpy(np.asarray(part.weights, np.float32)).to(dev)})
        self._states[slide.name] = state
        return state

    # -- forward passes ---------------------------------------------------------------------------
    def _autocast(self):
        """The forward passes' precision (PHG2STConfig.precision); parameters stay float32."""
        dtype = AUTOCAST.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _spot_tokens(self, state: SlideState, i: int) -> torch.Tensor:
        """T_s of the core spots of part ``i`` (the part and its halo encoded together)."""
        t = state.tensors[i]
        t_s = self.net.encode_spots(state.spot[t["inputs"]], t["edges"], t["weights"], t["grid"], t["n_local"])
        return t_s[: len(state.parts[i].core)]

    def _neighbour_tokens(self, states_and_spots, graph=None):
        """T_n and the key masks of spots given as [(state, spot indices), ...], in that order;
        ``graph``: their neighbour hypergraphs when already built."""
        nb = torch.cat([s.nb[torch.from_numpy(idx).to(self.device)] for s, idx in states_and_spots])
        mask = torch.cat([s.nb_mask[torch.from_numpy(idx).to(self.device)] for s, idx in states_and_spots])
        if self.net.nb_hg is None:
            return self.net.encode_neighbours(nb, mask, None, None), mask
        if graph is None:
            raw = torch.cat([s.nb_raw[torch.from_numpy(idx)] for s, idx in states_and_spots])
            graph = self._neighbour_graph(raw, mask.cpu())
        return self.net.encode_neighbours(nb, mask, *graph), mask

    def _part_neighbour_graph(self, state: SlideState, i: int):
        """The neighbour hypergraphs of part ``i``'s core, built at its first use and kept."""
        t = state.tensors[i]
        if "nb_graph" not in t and self.net.nb_hg is not None:
            core = torch.from_numpy(state.parts[i].core)
            t["nb_graph"] = self._neighbour_graph(state.nb_raw[core], state.nb_mask.cpu()[core])
        return t.get("nb_graph")

    def _forward_part(self, state: SlideState, i: int, y_masked: np.ndarray):
        """p_Z and the branch predictions of the core spots of part ``i``; ``y_masked``: their rows."""
        t_s = self._spot_tokens(state, i)
        t_n, mask = self._neighbour_tokens([(state, state.parts[i].core)], self._part_neighbour_graph(state, i))
        return self.net.fuse(t_s, t_n, mask, torch.from_numpy(y_masked).to(self.device))

    def _forward_spots(self, groups, y_masked: np.ndarray):
        """p_Z and branch predictions of spots pooled across slides, [(state, spot indices), ...]: each
        slide's spot branch runs on the whole parts that hold the batch's spots (the PH2ST code encodes
        the whole slide of every slide in a batch)."""
        t_s = []
        for state, idx in groups:
            rows = torch.empty(len(idx), self.config.dim, device=self.device)
            for i in np.unique(state.part_of[idx]):
                here = np.flatnonzero(state.part_of[idx] == i)
                in_core = torch.from_numpy(state.row_in_core[idx[here]]).to(self.device)
                rows[torch.from_numpy(here).to(self.device)] = self._spot_tokens(state, i)[in_core]
            t_s.append(rows)
        t_n, mask = self._neighbour_tokens(groups)
        return self.net.fuse(torch.cat(t_s), t_n, mask, torch.from_numpy(y_masked).to(self.device))

    # -- training -------------------------------------------------------------------------------
    def _steps(self, states, train, rng):
        """One epoch's training steps: (forward() → (p_Z, branches), truth, prompt rows) per step.

        ``batching="slide"`` (paper): one step per part of each training slide, 30 % of its spots
        drawn as prompts afresh at every step. ``"spots"`` (PH2ST code): batches of ``batch_size``
        spots pooled across slides, ``train_prompt_ratio`` of each batch drawn as prompts.
        """
        cfg = self.config
        if cfg.batching == "slide":
            work = [(k, i) for k, s in enumerate(states) for i in range(len(s.parts))]
            for w in rng.permutation(len(work)):
                k, i = work[w]
                core = states[k].parts[i].core
                truth = train[k].expr[core]
                prompt = rng.choice(len(core), size=n_prompts(len(core), cfg.train_prompt_ratio), replace=False)
                y_masked = np.zeros_like(truth)
                y_masked[prompt] = truth[prompt]
                yield (lambda k=k, i=i, y=y_masked: self._forward_part(states[k], i, y)), truth, prompt
        else:
            pool = spot_pool(train, lambda s: np.ones(s.n_spots, bool))
            order = rng.permutation(len(pool))
            for start in range(0, len(order), cfg.batch_size):
                pick = [pool[j] for j in order[start:start + cfg.batch_size]]
                by_slide = group_by_slide(pick, list(range(len(train))))
                groups = [(states[k], idx) for k, idx in by_slide]
                truth = np.concatenate([train[k].expr[idx] for k, idx in by_slide])
                prompt = rng.choice(len(truth), size=n_prompts(len(truth), cfg.train_prompt_ratio), replace=False)
                y_masked = np.zeros_like(truth)
                y_masked[prompt] = truth[prompt]
                yield (lambda g=groups, y=y_masked: self._forward_spots(g, y)), truth, prompt

    def _optimiser(self):
        cfg = self.config
        if cfg.optimizer == "code":
            optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr)
            return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=PLATEAU_FACTOR,
                                                                         patience=PLATEAU_PATIENCE)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)

    def fit(self, train, val, context: FitContext):
        cfg = self.config
        self.device = torch.device(context.device)
        self._states.clear()  # tensors of an earlier fit may live on another device
        self.history, self.seed = [], context.seed
        torch.manual_seed(context.seed)
        rng = np.random.default_rng(context.seed)
        # feature statistics from the training slides only (used with standardise_features)
        stack = np.concatenate([s.features["spot"][s.features["spot_mask"]] for s in train])
        self.mu_, self.sd_ = stack.mean(0), stack.std(0)
        self.sd_[self.sd_ == 0] = 1.0
        self.in_dim_, self.n_genes_ = int(stack.shape[1]), len(context.genes)  # what a saved network is rebuilt from
        self.net = PHG2STNet(cfg, self.in_dim_, self.n_genes_)
        if cfg.init_bias_to_mean:
            mean = torch.from_numpy(np.concatenate([s.expr for s in train]).mean(0))
            for head in self.net.heads():
                head.bias.data.copy_(mean)
        self.net.to(self.device)
        optimizer, scheduler = self._optimiser()
        # float16 gradients underflow without loss scaling (the code's Lightning precision=16 scales too)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "16-mixed")
        states = [self._prepare(s) for s in train]
        strategy = context.prompt_selector or context.prompt_strategy
        self._val_prompts = {s.name: select_prompts(strategy, s.positions_um(), context.prompt_ratio, s.name, context.seed)
                             for s in val}
        if not val:
            warnings.warn("phg2st: no validation slides: early stopping and the kept checkpoint use the training loss "
                          "(summary: selection=train_loss)", stacklevel=2)
        best, best_state, best_epoch, stale = -math.inf, None, None, 0
        for epoch in range(cfg.epochs):
            self.net.train()
            losses = []
            for forward, truth, prompt in self._steps(states, train, rng):
                with self._autocast():
                    p_z, branches = forward()
                p_z, branches = p_z.float(), [b.float() for b in branches]
                target = torch.from_numpy(truth).to(self.device)
                if cfg.loss_on == "non_prompt":
                    keep = torch.ones(len(truth), dtype=torch.bool, device=self.device)
                    keep[torch.from_numpy(prompt).to(self.device)] = False
                    p_z, branches, target = p_z[keep], [b[keep] for b in branches], target[keep]
                loss = phg2st_loss(p_z, branches, target, cfg.lam)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
            train_loss = float(np.mean(losses))
            score = self._validate(val) if val else -train_loss
            self.history.append({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                                 "val_pcc": score if val else None})
            with warnings.catch_warnings():
                # loss scaling skips the steps whose float16 gradients overflowed (while it finds its
                # scale): torch then warns that the schedule stepped before the optimizer, as intended
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step(score) if cfg.optimizer == "code" else scheduler.step()
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(self.net.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
            self.selection_ = {"selection": "val_pcc" if val else "train_loss", "best_epoch": best_epoch,
                               **({"best_val_pcc": best} if val else {"best_train_loss": -best})}
        else:
            warnings.warn("phg2st: the validation PCC was undefined at every epoch (constant predictions or genes): "
                          "the last epoch's weights are kept (summary: selection=last_epoch)", stacklevel=2)
            self.selection_ = {"selection": "last_epoch", "best_epoch": len(self.history) - 1}
        self._states.clear()  # training and validation tensors are not needed any more

    # -- prediction -----------------------------------------------------------------------------
    def _predict_with(self, slide, prompt_idx, prompt_expr) -> np.ndarray:
        self.net.eval()
        state = self._prepare(slide)
        y_masked = np.zeros((slide.n_spots, slide.n_genes), dtype=np.float32)
        y_masked[prompt_idx] = prompt_expr
        out = np.zeros_like(y_masked)
        devices = [self.device] if self.device.type == "cuda" else []
        # eval_dropout (PH2ST code) draws dropout masks at prediction: seeded, so a prediction repeats
        with torch.inference_mode(), torch.random.fork_rng(devices=devices), self._autocast():
            torch.manual_seed(self.seed)
            for i, part in enumerate(state.parts):
                p_z, _ = self._forward_part(state, i, y_masked[part.core])
                out[part.core] = p_z.float().cpu().numpy()
        return out

    def _validate(self, val) -> float:
        """Mean over validation slides of the PCC on their non-prompt spots (−inf if undefined on all)."""
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
        self._states.pop(slide.name, None)
        return pred

    # -- saved models (stbench run --save-models, stbench predict) ---------------------------------
    def get_state(self) -> FittedState:
        arrays = {f"net.{k}": v.detach() for k, v in self.net.state_dict().items()}
        arrays.update({"mu": torch.from_numpy(np.asarray(self.mu_, dtype=np.float32)),
                       "sd": torch.from_numpy(np.asarray(self.sd_, dtype=np.float32))})
        meta = {"in_dim": self.in_dim_, "n_genes": self.n_genes_, "seed": int(self.seed),
                "history": self.history, "selection": getattr(self, "selection_", {})}
        return FittedState(arrays, meta)

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        meta = state.meta
        self.device = torch.device(device)
        self.in_dim_, self.n_genes_ = int(meta["in_dim"]), int(meta["n_genes"])
        self.net = PHG2STNet(self.config, self.in_dim_, self.n_genes_)
        weights = {k[len("net."):]: torch.as_tensor(v) for k, v in state.arrays.items() if k.startswith("net.")}
        self.net.load_state_dict(weights, strict=True)
        self.net.to(self.device).eval()
        self.mu_ = np.asarray(state.arrays["mu"], dtype=np.float32)
        self.sd_ = np.asarray(state.arrays["sd"], dtype=np.float32)
        self.seed, self.history, self.selection_ = int(meta["seed"]), list(meta["history"]), dict(meta["selection"])
        self._states.clear()

    def summary(self):
        return {"epochs_run": len(self.history), **getattr(self, "selection_", {}), "device": str(self.device),
                "parameters": sum(p.numel() for p in self.net.parameters()) if self.net else 0}
