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

This module imports torch; only methods that use it import it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import numpy as np
import torch

from stbench.method import FinetuneSettings, Method


class TorchMethod(Method):
    #: the fitted network (set by ``fit``)
    model: torch.nn.Module = None
    #: training learning rate, and the fine-tuning default
    lr: float = 1e-4
    #: training batch size in spots (fine-tuning batches are min(batch_size, #prompts))
    batch_size: int = 256

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
