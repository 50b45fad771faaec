"""What a plugin registers: one small frozen dataclass per kind of item.

Factories may be given as a callable or as a lazy ``"package.module:attribute"`` string, so that a plugin's
``__init__`` stays light (no torch import) and ``stbench list`` stays fast; :func:`resolve` imports them
when the item is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

Factory = Union[str, Callable[..., Any]]

#: What a method may ask the harness to prepare. ``expression`` is always provided.
NEEDS = {
    "expression": "normalised panel expression of training slides and of test prompt spots",
    "coords": "spot grid and pixel coordinates",
    "image": "the section's full-resolution image (methods that cut their own patches)",
    "image_patches": "RGB patches (spot, niche or 5x5 neighbour) at a stated size in µm and output pixels, "
                     "declared in MethodSpec.patches (methods that train their own backbone)",
    "image_features": "frozen encoder features of each spot patch",
    "neighbour_features": "frozen encoder features of each spot's 5x5 neighbour grid, with an in-image mask",
    "niche_features": "frozen encoder features of a patch covering the spot and its lattice neighbours",
    "slide_context": "the whole slide at once (slide-level models)",
    "niche_expression": "each spot's niche profile: the normalised mean raw counts of the spot and its lattice "
                        "neighbours (training slides; HyperST)",
}


def resolve(factory: Factory) -> Callable[..., Any]:
    """Import a lazy ``"module:attr"`` factory; return callables unchanged."""
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Resources:
    """What one unit of a method (its fit, predictions and scores on one fold) asks the executor for.

    Attributes:
        cpus: CPU cores the unit uses. Ray reserves this many for it, and every executor (the local one
            too) runs the unit with exactly this many torch threads, so runs on one machine, with
            ``--jobs`` or on a Ray cluster compute the same numbers.
        gpu: the unit runs faster on a GPU: Ray gives it one when the cluster has any (else it runs on a
            CPU, as it would locally). Where the unit runs is chosen as for a local run (``--device``).
    """

    cpus: int = 1
    gpu: bool = False

    def __post_init__(self):
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise ValueError(f"Resources.cpus must be a whole number of at least 1, got {self.cpus!r}")


@dataclass(frozen=True)
class MethodSpec:
    """A method or baseline.

    Attributes:
        name: registry name used on the command line (``--methods NAME``).
        factory: ``factory(config) -> stbench.method.Method``; ``config`` is an instance of ``config``.
        config: a dataclass type whose field defaults are the method's hyperparameters (the one source
            of its defaults); ``--set methods.NAME.FIELD=VALUE`` overrides them.
        needs: what the harness must prepare, a subset of :data:`NEEDS`; or a function
            ``needs(config) -> iterable`` when it depends on the method's settings (a frozen-feature
            variant and a trainable variant of one method read different inputs, and a run prepares
            only what the chosen variant reads).
        patches: with ``image_patches`` among the needs, the patches to cut: a tuple of
            :class:`stbench.images.patches.PatchRequest` (kind, size in µm, output pixels), or a
            function ``patches(config) -> iterable``. The harness cuts them once per section, caches
            them on disk and attaches them to every slide as read-only memory-mapped uint8 arrays
            (``slide.patches[request.name]``).
        finetune: whether the harness's prompt fine-tuning protocol (METHODS.md §9.1) applies when it is
            switched on; retrieval methods such as BLEEP declare ``False``.
        takes_prompts: the method reads a slide's prompt spots (``slide.prompt_idx``, ``prompt_expr``) as
            input to predict it (PHG2ST, ``prompt_knn``): a slide without measured prompt spots cannot be
            predicted, so ``stbench predict`` asks for ``--prompts FILE``.
        constant_predictor: the method predicts one vector for every spot of a slide by design (the
            ``mean`` baseline). Its correlation metrics (``MetricSpec.undefined_for_constant``) are
            reported as undefined instead of 0. Any other method whose prediction happens to be constant
            on a slide scores 0 there, so returning constants cannot raise its mean.
        test_settings: config overrides that make the method tiny and fast (a few epochs, a narrow
            network) for the registry-driven contract test (``tests/test_contract.py``), which runs every
            registered method on a small synthetic dataset with these settings.
        description: one line for ``stbench list``.
        reference: paper, venue, year and DOI/arXiv id.
        resources: what one unit of the method (one fold) asks the executor for (:class:`Resources`):
            CPU cores, which are also its torch thread count in every executor, and whether it wants a
            GPU. The default, one CPU and no GPU, suits the closed-form baselines; a network that trains
            on many cores declares more (``Resources(cpus=4, gpu=True)``).
    """

    name: str
    factory: Factory
    config: type
    needs: Union[frozenset, Callable[[Any], Any]] = frozenset({"expression"})
    patches: Union[tuple, Callable[[Any], Any]] = ()
    finetune: bool = True
    takes_prompts: bool = False
    constant_predictor: bool = False
    test_settings: dict = field(default_factory=dict)
    description: str = ""
    reference: str = ""
    resources: Resources = Resources()

    def __post_init__(self):
        if not isinstance(self.resources, Resources):
            raise ValueError(f"method {self.name!r}: resources must be a stbench.specs.Resources, got {self.resources!r}")
        if not callable(self.needs):
            self._check(self.needs)

    def _check(self, needs) -> frozenset:
        needs = frozenset(needs) | {"expression"}
        unknown = needs - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        return needs

    def needs_for(self, config: Any) -> frozenset:
        """What this method, with these settings, needs the harness to prepare."""
        return self._check(self.needs(config) if callable(self.needs) else self.needs)

    def patches_for(self, config: Any) -> tuple:
        """The patch requests of this method with these settings (empty unless it needs image_patches)."""
        if "image_patches" not in self.needs_for(config):
            return ()
        return tuple(self.patches(config) if callable(self.patches) else self.patches)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset.

    Attributes:
        factory: ``factory(data_dir, options) -> stbench.data.Dataset``; ``data_dir`` is ``None`` when
            the user gave none (the plugin then looks at its environment variable and cache directory).
        options: a dataclass type of dataset options (``--set dataset_options.FIELD=VALUE``), or None.
        needs_data_dir: False for datasets generated in code.
        data_env: the environment variable that points at the data, for the error message.
        source: where ``stbench data fetch NAME`` downloads the data from: a
            :class:`stbench.fetch.HttpSource` or :class:`stbench.fetch.HuggingFaceSource`, or a lazy
            ``"module:attribute"`` naming one; None when the dataset cannot be fetched.
    """

    name: str
    factory: Factory
    options: Optional[type] = None
    needs_data_dir: bool = True
    description: str = ""
    reference: str = ""
    source: Optional[Factory] = None


@dataclass(frozen=True)
class SplitSpec:
    """A split protocol.

    Attributes:
        func: ``func(sections, seed, **params) -> list[stbench.splits.Fold]``.
        unit: what the protocol holds out: ``"patient"`` (patients never cross train and test),
            ``"section"`` or ``"slide-random"`` (may put one patient's sections on both sides; the harness
            refuses those unless the benchmark declares a section-level protocol).
        params: a dataclass type of the protocol's parameters (or a lazy ``"module:Class"`` string),
            or None.
    """

    name: str
    func: Factory
    unit: str = "patient"
    params: Optional[Factory] = None
    description: str = ""


@dataclass(frozen=True)
class MetricSpec:
    """A metric.

    Attributes:
        func: for ``level="slide"``, ``func(pred, truth) -> MetricValue`` on one slide's scored spots;
            for ``level="fold"``, ``func(preds, truths, context) -> MetricValue`` over all test slides of
            a fold (pooled metrics, PCC@k).
        higher_is_better: drives the ↑/↓ markers of leaderboards.
        aggregation: how the number is aggregated, in words, for tables and docs.
        undefined_for_constant: a correlation, which has no meaning for a method that predicts one
            vector for every spot by design (``MethodSpec.constant_predictor``): such methods get NaN,
            shown as "undefined". For every other method a constant prediction scores 0.
    """

    name: str
    func: Factory
    higher_is_better: bool
    aggregation: str
    level: str = "slide"
    description: str = ""
    undefined_for_constant: bool = False


@dataclass(frozen=True)
class PromptSpec:
    """A prompt selection strategy.

    Attributes:
        func: ``func(coords, n, rng) -> np.ndarray`` of ``n`` distinct spot indices, where ``coords`` is
            an (N, 2) float array of spot positions and ``rng`` a ``numpy.random.Generator``.
        nested_by_subset: in a prompt-ratio sweep, a smaller ratio's prompts may be a uniform random
            subset of the largest ratio's (true of uniform random spots: a random subset of a random
            sample is a random sample), so the ratios nest. False: each ratio is drawn by ``func``
            itself, and the sweep reports whether they happen to nest.
    """

    name: str
    func: Factory
    description: str = ""
    nested_by_subset: bool = False


@dataclass(frozen=True)
class EncoderSpec:
    """An image encoder (patch → feature vector); filled in by image plugins."""

    name: str
    factory: Factory
    description: str = ""
    extra: dict = field(default_factory=dict)
