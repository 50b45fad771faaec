"""A base class for torch methods that gives them the prompt fine-tuning protocol (METHODS.md §9.1).

The protocol lives here, in the harness, not in each method: before a test slide is predicted, the
harness copies the fold's fitted method and calls :meth:`Method.finetune` on the copy with the slide's
prompt spots; :class:`TorchMethod` implements it once:

* all trainable parameters are updated;
* ``settings.epochs`` epochs (5 by default) over the prompt spots, in batches of
  ``min(self.batch_size, #prompts)``, with no early stopping;
* the method's own loss (:meth:`spot_loss`) and optimiser (:meth:`make_optimizer`);
* learning rate ``settings.lr`` if given, else the method's own ``finetune_lr`` (its training rate
  unless the method says otherwise: TRIPLEX uses 1e-6).

Saving and loading: :class:`TorchMethod` implements :meth:`Method.get_state` / :meth:`Method.set_state`
once. A subclass says how to rebuild its network from JSON metadata (:meth:`TorchMethod.network_meta`:
widths and sizes known only after ``fit``; :meth:`TorchMethod.build_network`: the untrained network of
that shape), and what else it keeps beside the network (:meth:`TorchMethod.extra_state`: feature
standardisation, a retrieval set; :meth:`TorchMethod.load_extra_state`). The network's weights are saved
from its ``state_dict`` (prefix ``model.``) and loaded strictly; the NumPy generator ``self._rng``, when the
method has one, is saved too, so a loaded method fine-tunes exactly as the fitted one would have.
``saved_weights_fields`` names config fields that point at pre-trained weights files (a backbone's
checkpoint): the saved state holds every weight, so they are not read when a model is loaded.

This module imports torch; only methods that use it import it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import numpy as np
import torch

from stbench.errors import DataError
from stbench.method import FinetuneSettings, FittedState, Method


class TorchMethod(Method):
    #: the fitted network (set by ``fit``)
    model: torch.nn.Module = None
    #: training learning rate, and the fine-tuning default
    lr: float = 1e-4
    #: training batch size in spots (fine-tuning batches are min(batch_size, #prompts))
    batch_size: int = 256

    #: config fields naming pre-trained weights files, set to "random" while a saved model is rebuilt
    saved_weights_fields: tuple = ()

    @property
    def finetune_lr(self) -> float:
        return self.lr

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr)

    def spot_loss(self, slide, spots: np.ndarray, truth: torch.Tensor) -> torch.Tensor:
        """The method's training loss on ``spots`` (indices into the slide) against ``truth`` (S, G)."""
        raise NotImplementedError

    def finetune(self, slide, settings: FinetuneSettings) -> None:
        prompts = np.asarray(slide.prompt_idx)
        truth = torch.as_tensor(np.asarray(slide.prompt_expr), dtype=torch.float32)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.make_optimizer(params, settings.lr if settings.lr is not None else self.finetune_lr)
        batch = max(1, min(self.batch_size, len(prompts)))
        rng = np.random.default_rng(settings.seed)
        self.model.train()
        for _ in range(settings.epochs):
            order = rng.permutation(len(prompts))
            for start in range(0, len(order), batch):
                pick = order[start : start + batch]
                optimizer.zero_grad()
                loss = self.spot_loss(slide, prompts[pick], truth[pick].to(next(self.model.parameters()).device))
                loss.backward()
                optimizer.step()
        self.model.eval()

    # -- saving and loading (see the module docstring) -------------------------------------------------
    def network_meta(self) -> dict:
        """JSON metadata from which :meth:`build_network` rebuilds the fitted network's shape (e.g.
        ``{"in_dim": 1024, "n_genes": 785}``); called after ``fit``."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its fitted state")

    def build_network(self, meta: dict) -> torch.nn.Module:
        """An untrained network of the shape ``meta`` describes (its weights are loaded afterwards)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a fitted state")

    def extra_state(self) -> FittedState:
        """What the method keeps beside the network (NumPy arrays and JSON metadata)."""
        return FittedState()

    def load_extra_state(self, state: FittedState) -> None:
        """Restore :meth:`extra_state` (arrays come back as NumPy arrays); ``self.model`` and
        ``self.device`` are already set."""

    @classmethod
    def supports_save(cls) -> bool:
        return (cls.network_meta is not TorchMethod.network_meta
                and cls.build_network is not TorchMethod.build_network)

    def get_state(self) -> FittedState:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: get_state before fit")
        extra = self.extra_state()
        # clones: safetensors refuses tensors that share memory (tied weights, views)
        arrays = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        arrays.update({f"extra.{k}": torch.as_tensor(np.ascontiguousarray(v)) for k, v in extra.arrays.items()})
        meta = {"network": self.network_meta(), "extra": extra.meta}
        rng = getattr(self, "_rng", None)
        if isinstance(rng, np.random.Generator):
            meta["rng"] = rng.bit_generator.state
        return FittedState(arrays, meta)

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        self.device = torch.device(device)
        model = self.build_network(state.meta["network"])
        weights = {k[len("model."):]: torch.as_tensor(v) for k, v in state.arrays.items() if k.startswith("model.")}
        expected = model.state_dict()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            problem = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                       else f"shape of {wrong[:3]}")
            raise DataError(f"{type(self).__name__}: the saved weights do not fit the network rebuilt from the saved "
                            f"metadata ({problem}); the model was saved by another version of the method")
        model.load_state_dict(weights, strict=True)
        self.model = model.to(self.device).eval()
        if "rng" in state.meta:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state.meta["rng"]
        extra = {k[len("extra."):]: _numpy(v) for k, v in state.arrays.items() if k.startswith("extra.")}
        self.load_extra_state(FittedState(extra, state.meta.get("extra", {})))

    @classmethod
    def from_state(cls, config, state: FittedState, device: str = "cpu") -> "TorchMethod":
        # every weight is in the saved state: build without the pre-trained weights files the config
        # names (they may not exist where the model is loaded), then keep the config as it was
        import dataclasses

        building = dataclasses.replace(config, **{f: "random" for f in cls.saved_weights_fields}) \
            if cls.saved_weights_fields else config
        method = cls(building)
        method.set_state(state, device)
        method.config = config
        return method


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# -- helpers shared by spot-level torch methods (batches pooled across slides, standardised features) ----


def group_by_slide(pick: list[tuple[int, int]], slides) -> list[tuple[object, np.ndarray]]:
    """``[(slide index, spot index), ...]`` → ``[(slide, spot indices), ...]``, one entry per slide, in
    first-seen order (a batch pooled across slides is read slide by slide)."""
    by_slide: dict[int, list[int]] = {}
    for s, i in pick:
        by_slide.setdefault(s, []).append(i)
    return [(slides[s], np.asarray(ix)) for s, ix in by_slide.items()]


def spot_batches(pool: list[tuple[int, int]], slides, order: np.ndarray, size: int, drop_last: bool = False,
                 min_size: int = 1) -> Iterator[list[tuple[object, np.ndarray]]]:
    """Batches of ``size`` spots of ``pool`` taken in ``order``, each grouped by slide; the last partial
    batch is dropped with ``drop_last``, and batches smaller than ``min_size`` are skipped (contrastive
    losses need at least 2 spots)."""
    stop = len(order) - (len(order) % size if drop_last else 0)
    for start in range(0, stop, size):
        pick = [pool[i] for i in order[start:start + size]]
        if len(pick) >= min_size:
            yield group_by_slide(pick, slides)


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of training features; a constant column divides by 1."""
    sd = x.std(0)
    return x.mean(0), np.where(sd > 0, sd, 1.0)


def spot_pool(slides, usable: Callable) -> list[tuple[int, int]]:
    """``(slide index, spot index)`` of every spot for which ``usable(slide)`` (an (N,) bool array or an
    index array) holds: the training set of a spot-level method, pooled across slides."""
    out = []
    for k, slide in enumerate(slides):
        keep = np.asarray(usable(slide))
        out += [(k, int(i)) for i in (np.flatnonzero(keep) if keep.dtype == bool else keep)]
    return out


def pool_batch_size(n_spots: int, batch_size: int, method: str) -> int:
    """The training batch size: ``batch_size``, capped (with a warning) at a pool smaller than a batch."""
    if n_spots < batch_size:
        warnings.warn(f"{method}: {n_spots} training spots, fewer than a batch of {batch_size}: using batches of "
                      f"{n_spots}", stacklevel=3)
        return n_spots
    return batch_size
