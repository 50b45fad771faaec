"""The contract every method plugin implements.

A method is built from its config dataclass (``MethodSpec.factory(config)``), then for each fold:

1. :meth:`Method.fit` on the fold's training slides, with the inner validation slides (taken from
   training patients) for model selection;
2. for each test slide, optionally :meth:`Method.finetune` on a *copy* of the fitted method with the
   slide's prompt spots (METHODS.md §9.1; the harness makes the copy, so the fold's model is untouched);
3. :meth:`Method.predict` on the masked test slide: ``slide.expr`` is ``None``; ``slide.prompt_idx`` and
   ``slide.prompt_expr`` hold the prompt spots' measured expression. It returns an (N, G) array for
   every spot of the slide; prompt spots are scored only in the ``*_all`` columns.

Data the method sees. The training and validation slides are read-only: their arrays (``expr``,
``grid``, ``pixel``, ``features``) are shared across folds and methods, so a method copies before it
changes anything. The validation slides come from training patients (inner validation), never from the
test fold.

The rule for choosing and refitting (one rule for every method): use the validation slides only to
*select* (a penalty, an epoch, a checkpoint), then make the final model from *all training patients*.
A closed-form method (``mean``, ``ridge``) refits on ``train + val`` at the selected setting; a method
with nothing to select uses ``train + val`` directly; a trained network keeps the checkpoint chosen on
validation (refitting it would need a new stopping rule).

What ``predict`` returns: a NumPy array of shape ``(slide.n_spots, slide.n_genes)``, finite (no NaN or
inf), in the benchmark's normalisation (the units of ``slide.expr``), one row per spot in the slide's
order, prompt spots included. Anything else stops the run with an error naming the method and slide.

What a method needs beyond expression (coordinates, image features, whole-slide context) is declared in
``MethodSpec.needs``; the harness prepares only that and hands it over through :class:`FitContext`.
Slide-level models (PHG2ST) receive whole slides in both calls; spot-level models iterate over spots.

Saving and loading (``stbench run --save-models``, ``stbench predict``). A method that can outlive the run
implements :meth:`Method.get_state` and :meth:`Method.set_state`: its fitted state as plain data, named
arrays (saved as one ``.safetensors`` file) and JSON metadata, never pickled objects, so loading a model
cannot run code. :meth:`Method.from_state` rebuilds a method from its config and a saved state; a torch
method gets all three from :class:`stbench.torch_method.TorchMethod` by describing how to rebuild its
network from JSON metadata. The harness saves the fitted method *before* any fine-tuning on a test slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from stbench.data.model import Slide


@dataclass
class FitContext:
    """What the harness tells a method about the fold it is fitting."""

    seed: int
    genes: np.ndarray
    fold: int = 0
    #: torch device string chosen by the harness ("cpu" here; "cuda" where one is available)
    device: str = "cpu"
    #: a directory the method may write checkpoints to (inside the run directory)
    workdir: Optional[Path] = None
    #: the run's prompt settings, for methods that simulate prompts while training (PHG2ST)
    prompt_ratio: float = 0.1
    prompt_strategy: str = "random"
    #: the registered strategy itself (a PromptSpec), so plugin strategies work inside methods too
    prompt_selector: Any = None
    #: resources prepared for the method's declared needs (e.g. an image-feature provider)
    resources: dict = field(default_factory=dict)
    #: True under ``selection: test_fold`` (the sources' leaky protocol, protocol study only): ``val`` is
    #: the fold's test slides, to *select* on and never to fit on; see :func:`training_slides`
    val_is_test: bool = False


def training_slides(train, val, context: FitContext) -> list:
    """The slides the final model is fitted on under the refit rule: training and validation patients
    (``train + val``), or ``train`` alone when ``val`` is the test fold (``context.val_is_test``)."""
    return list(train) + ([] if getattr(context, "val_is_test", False) else list(val or []))


@dataclass
class FinetuneSettings:
    """The prompt fine-tuning protocol's settings (METHODS.md §9.1)."""

    epochs: int = 5
    #: learning rate; None means "the method's training learning rate"
    lr: Optional[float] = None
    seed: int = 0


@dataclass
class FittedState:
    """A fitted method as plain data.

    ``arrays``: name → NumPy array (or torch tensor, for torch methods), saved as one ``.safetensors``
    file; ``meta``: JSON-serialisable numbers, strings, lists and dicts (chosen penalties, network
    widths, training history). Nothing else is saved, so nothing but data is ever loaded.
    """

    arrays: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class Method:
    """Base class of methods. Subclasses implement :meth:`fit` and :meth:`predict`, and optionally
    :meth:`finetune` and the pair :meth:`get_state` / :meth:`set_state` (saving fitted models)."""

    def fit(self, train: list[Slide], val: list[Slide], context: FitContext) -> None:
        raise NotImplementedError

    def predict(self, slide: Slide) -> np.ndarray:
        raise NotImplementedError

    def finetune(self, slide: Slide, settings: FinetuneSettings) -> None:
        """Adapt in place to a masked test slide's prompt spots. The harness calls it on a copy."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fine-tuning on prompt spots")

    @classmethod
    def supports_finetune(cls) -> bool:
        return cls.finetune is not Method.finetune

    # -- saving and loading the fitted state ---------------------------------------------------------
    def get_state(self) -> FittedState:
        """The fitted state (after :meth:`fit`) as arrays and JSON metadata: everything :meth:`predict`
        and :meth:`finetune` need beyond the config."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its fitted state")

    def set_state(self, state: FittedState, device: str = "cpu") -> None:
        """Restore what :meth:`get_state` returned, on a method freshly built from the same config, so
        that :meth:`predict` gives what the fitted method gave. ``device``: the torch device to use."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a fitted state")

    @classmethod
    def supports_save(cls) -> bool:
        return cls.get_state is not Method.get_state and cls.set_state is not Method.set_state

    @classmethod
    def from_state(cls, config: Any, state: FittedState, device: str = "cpu") -> "Method":
        """A fitted method rebuilt from its config and a saved state. Override when building from the
        config alone would read something the saved state replaces (e.g. a backbone's weights file)."""
        method = cls(config)
        method.set_state(state, device)
        return method

    # Optional: a method may describe itself for the run record (e.g. chosen hyperparameters).
    def summary(self) -> dict[str, Any]:
        return {}
