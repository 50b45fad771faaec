"""The run loop: resolve a config into a plan, then fit, predict and score every method on every fold.

The core never branches on a method's name: what differs between methods is declared in their
:class:`~stbench.specs.MethodSpec` (needs, fine-tuning, resources) and their config dataclass.

Each method x fold is a :class:`Unit`. :func:`compute_unit` computes one and returns its rows,
predictions and fitted state without writing anything; an executor (:mod:`stbench.executors`: in this
process, ``--jobs`` local processes or Ray tasks) runs the units, and the driver (:func:`execute`)
writes each result as it arrives (:func:`write_unit_result`), so every executor leaves the same run
directory.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import stbench
from stbench import atomic
from stbench import config as cfg
from stbench.lock import RunLock
from stbench.benchmark import panel_path
from stbench.data.expression import (UNITS, check_smoothing, high_mean_high_variance_genes, highly_variable_genes,
                                     make_slide, read_panel_file, top_expressed_genes)
from stbench.data.checks import load_checked
from stbench.datasets import open_dataset
from stbench.data.model import Section, SectionInfo, Slide
from stbench.errors import ConfigError, DataError
from stbench.method import FinetuneSettings, FitContext, FittedState, Method
from stbench.metrics import MetricValue
from stbench.plugins import Plugins
from stbench.prompts import check_prompt_counts, n_prompts, nested, sweep_prompts
from stbench import models
from stbench.results import RunDir, write_prediction
from stbench.splits import Fold, check_folds

#: needs that can only be met on sections that have an image
IMAGE_NEEDS = {"image", "image_patches", "image_features", "neighbour_features", "niche_features"}
#: needs met by frozen encoder features, and the patch kind each asks for
FEATURE_KINDS = {"image_features": "spot", "neighbour_features": "neighbour", "niche_features": "niche"}
#: what identifies an encoder's features (batch size and device do not change them)
ENCODER_IDENTITY = ("name", "weights_id", "input_size", "dim", "precision")


@dataclass
class Plan:
    """Everything a run needs, resolved and validated before any work starts."""

    config: cfg.RunConfig
    methods: dict[str, Any]  # name -> resolved method config dataclass instance
    out_dir: Path
    base_dir: Optional[Path]  # the benchmark definition's folder (for relative panel files)
    plugins: Plugins
    dataset: Any = None
    sections: list[SectionInfo] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    encoder: Any = None  # built only when a method needs image features
    patch_specs: list = field(default_factory=list)
    #: what each method needs with its settings (MethodSpec.needs_for)
    needs: dict = field(default_factory=dict)
    #: every patch (stbench.images.patches.PatchRequest) a method of the run reads
    patch_requests: list = field(default_factory=list)
    #: keep each fold's fitted model under RUN_DIR/models/<method>/fold<k> (stbench.models)
    save_models: bool = False
    #: also fit one model per method on every section (no test fold): RUN_DIR/models/<method>/all
    fit_all: bool = False


def resolve_plan(config: cfg.RunConfig, method_names: list[str], out_dir: Path, plugins: Plugins,
                 base_dir: Optional[Path] = None, save_models: bool = False, fit_all: bool = False) -> Plan:
    """Validate names and options, open the dataset and make the folds (no heavy work yet).
    ``save_models``: keep every fold's fitted model; ``fit_all``: also fit and keep one model per method
    on every section (needs ``save_models``)."""
    if not method_names:
        raise ConfigError("no methods given; pass --methods NAME[,NAME...] (see 'stbench list methods')")
    if fit_all and not save_models:
        raise ConfigError("--fit-all fits the models to deploy and keeps nothing without --save-models; add --save-models")
    check_out_dir(Path(out_dir))
    if isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed} (option --seed or key seed)")
    if config.device is not None and not (config.device in ("cpu", "cuda", "mps") or config.device.startswith("cuda:")):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {config.device!r} (option --device or key device)")
    methods = {}
    for name in method_names:
        spec = plugins.methods.get(name, "option --methods")
        methods[name] = cfg.build(spec.config, config.methods.get(name, {}) or {}, f"methods.{name}")
    for name in config.methods:
        plugins.methods.get(name, "config key methods")
    for name in config.metrics:
        plugins.metrics.get(name, "config key metrics")
    plugins.prompts.get(config.prompt.strategy, "option --prompt-strategy / key prompt.strategy")
    for ratio in test_ratios(config):
        n_prompts(100, ratio)  # validates each ratio with the one shared message
    if sum(bool(x) for x in (config.panel.file, config.panel.hvg, config.panel.hmhvg)) > 1:
        raise ConfigError("panel: give one of file, hvg or hmhvg, not several")

    from stbench.data.expression import normaliser

    normaliser(config.normalisation)
    check_smoothing(config.smoothing)
    if config.selection not in cfg.SELECTIONS:
        raise ConfigError(f"unknown selection {config.selection!r} (key selection); choose one of {', '.join(cfg.SELECTIONS)}")
    for name, mconf in methods.items():  # a method rejects bad settings when built: before anything is written
        built = plugins.methods.load(name)(copy.deepcopy(mconf))
        if save_models and not type(built).supports_save():
            from stbench.models import cannot_save

            raise cannot_save(name, type(built))
    dataset = open_dataset(plugins, config.dataset, config.dataset_options, config.data_dir)

    sections = list(dataset.sections())
    measured = [s for s in sections if s.has_counts]
    if not measured:
        raise DataError(f"no section of dataset {config.dataset} has measured counts, so nothing can be trained or "
                        "scored; to predict sections without counts use 'stbench predict --model ...'")
    if len(measured) < len(sections):
        unmeasured = [s.name for s in sections if not s.has_counts]
        warnings.warn(f"{len(unmeasured)} section(s) of dataset {config.dataset} have no counts and are left out of the "
                      f"run ({', '.join(unmeasured[:5])}{' ...' if len(unmeasured) > 5 else ''}); predict them with "
                      "'stbench predict'", stacklevel=2)
        sections = measured
    needs = {m: plugins.methods.get(m).needs_for(c) for m, c in methods.items()}  # from each method's settings
    if any(IMAGE_NEEDS & needs[m] for m in methods):
        imaged = [s for s in sections if s.has_image]
        if not imaged:
            raise DataError(f"the methods {', '.join(methods)} need images, and no section of dataset {config.dataset} has one")
        if len(imaged) < len(sections):
            warnings.warn(f"methods that need images run on the {len(imaged)} of {len(sections)} sections that have one", stacklevel=2)
        sections = imaged

    sspec = plugins.splits.get(config.split, "key split")
    if sspec.unit == "patient" and len({s.patient for s in sections}) == 1 and len(sections) > 1:
        # e.g. her2st: only patient C has images. Say so, and record the section-level protocol.
        warnings.warn(
            f"all {len(sections)} sections usable here come from one patient ({sections[0].patient}); "
            "switching to split leave_one_section_out: sections of one patient are not independent, "
            "so these results are section-level, not patient-level", stacklevel=2)
        config.split, config.protocol_level = "leave_one_section_out", "section"
        config.split_params = {k: v for k, v in config.split_params.items() if k == "inner_val"}
        sspec = plugins.splits.get(config.split)
    params = cfg.build(plugins.splits.load(config.split, "params"), config.split_params, "split_params") if sspec.params else None
    kwargs = vars(params) if params is not None else {}
    split_func = plugins.splits.load(config.split, "func")
    if "base_dir" in inspect.signature(split_func).parameters:  # split files are found beside the definition
        kwargs["base_dir"] = base_dir
    folds = split_func(sections, config.seed, **kwargs)
    check_folds(folds, sections, config.protocol_level, config.split)
    plan = Plan(config, methods, Path(out_dir), base_dir, plugins, dataset, sections, folds,
                save_models=save_models, fit_all=fit_all)
    plan.needs = needs
    plan.patch_requests = sorted({r for m, c in methods.items() for r in plugins.methods.get(m).patches_for(c)},
                                 key=lambda r: r.name)
    plan.patch_specs = feature_specs(config.images, set().union(*needs.values()))
    if plan.patch_specs:
        images = config.images
        plugins.encoders.get(images.encoder, "option --encoder / key images.encoder")
        plan.encoder = plugins.encoders.load(images.encoder)(images.encoder_weights)  # a missing checkpoint fails here
    return plan


def feature_specs(images: cfg.ImageConfig, needs) -> list:
    """The frozen-feature patches (stbench.images.geometry.PatchSpec) that ``needs`` ask for, one per kind."""
    kinds = sorted({FEATURE_KINDS[n] for n in needs if n in FEATURE_KINDS})
    if not kinds:
        return []
    from stbench.images.geometry import PatchSpec

    return [PatchSpec(k, images.spot_um, images.neighbour_grid if k == "neighbour" else 1) for k in kinds]


def slide_features(sets: dict) -> dict:
    """A section's feature sets (kind → FeatureSet) as ``Slide.features``: ``neighbour`` (N, 25, d) with
    its mask, and one (N, d) array per single-patch kind (masked patches are zeros) with its (N,) mask."""
    prepared = {}
    for kind, fs in sets.items():
        if kind == "neighbour":
            prepared["neighbour"], prepared["neighbour_mask"] = fs.features, fs.mask
        else:
            prepared[kind], prepared[f"{kind}_mask"] = fs.features[:, 0], fs.mask[:, 0]
    return prepared


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a run directory, before any data is read."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; give a folder path for the run")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: no write permission in {existing}; give a folder you can write to")


# ------------------------------------------------------------------------------------------------
# provenance


@functools.lru_cache(maxsize=1)
def git_revision() -> Optional[str]:
    """The stbench source revision (computed once per process), or None outside a git checkout."""
    try:
        root = Path(stbench.__file__).resolve().parents[1]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


#: the libraries whose versions every run records
RECORDED_PACKAGES = ("numpy", "scipy", "pandas", "anndata", "pluggy", "torch", "timm", "peft", "torch-geometric")


def installed_versions(packages) -> dict:
    """Each package's installed version (None when absent), from the ``<name>-<version>.dist-info``
    folder names on ``sys.path`` (one listing per folder; importlib.metadata.version reads every
    distribution's metadata per call, 10 ms of an everyday run), falling back to importlib.metadata
    for packages installed otherwise (e.g. .egg-info)."""
    folders: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info") and "-" in name:
                dist, version = name[: -len(".dist-info")].split("-", 1)
                folders.setdefault(dist.lower().replace("_", "-").replace(".", "-"), version)
    out = {}
    for pkg in packages:
        out[pkg] = folders.get(pkg.lower().replace("_", "-").replace(".", "-"))
        if out[pkg] is None:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "stbench": stbench.__version__}
    out.update(installed_versions(RECORDED_PACKAGES))
    out["stbench_git"] = git_revision()
    return out


def _protocol(config: cfg.RunConfig) -> dict:
    out = cfg.to_dict(config)
    out.pop("methods")
    out.pop("data_dir")  # the same data may live elsewhere on a resumed run (the data fingerprint checks it)
    out.pop("device")  # where a model runs does not change what the protocol is
    return out


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    """``"seed 0 → 1, prompt.ratio 0.1 → 0.2"``: what differs between two settings mappings."""
    a, b = cfg.flatten(old), cfg.flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    text = ", ".join(f"{k} {a.get(k, '(absent)')} → {b.get(k, '(absent)')}" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fold_record(plan: Plan) -> list:
    """Every fold's sections and patients, as run.json and split.json record them."""
    patient_of = {s.name: s.patient for s in plan.sections}
    return [f.to_dict(patient_of) for f in plan.folds]


def _check_resumable(run: RunDir, plan: Plan) -> None:
    """A run directory holds one protocol; a rerun with another protocol would mix results. The
    settings are compared first, so the message names the setting the user changed (e.g. the seed),
    not its consequence (other folds)."""
    old = run.read_json("run.json")
    if old is None:
        return
    new = _protocol(plan.config)
    if old.get("protocol") != new:
        raise ConfigError(
            f"output directory {plan.out_dir} holds a run with other settings ({_differences(old.get('protocol') or {}, new)}); "
            "use a new --out, or the same settings to resume"
        )
    if old.get("folds") is not None and old["folds"] != fold_record(plan):
        raise ConfigError(
            f"output directory {plan.out_dir} holds folds over other sections (the methods or the data changed "
            "which sections are usable, e.g. images); use a new --out"
        )
    for name, mconf in plan.methods.items():
        done = old.get("methods", {}).get(name)
        finished = any(run.is_done(name, f.index) for f in plan.folds)  # settings of a method that never finished a fold may change
        if finished and done is not None and done != cfg.to_dict(mconf):
            raise ConfigError(
                f"output directory {plan.out_dir} holds results of method {name} with other hyperparameters "
                f"({_differences(done, cfg.to_dict(mconf))}); use a new --out"
            )


def _check_same_data(run: RunDir, plan: Plan, panels: list[str], data: dict) -> None:
    """Resuming over another gene list (an edited panel file) or changed data files would merge
    predictions of different genes or data into one table."""
    old = run.read_json("run.json") or {}
    for fold, (before, now) in enumerate(zip(old.get("panels") or [], panels)):
        if before != now:
            raise ConfigError(f"output directory {plan.out_dir} holds results over another gene list in fold {fold} "
                              "(the panel file or the data changed since); use a new --out")
    for section, before in (old.get("data") or {}).items():
        if section in data and before != data[section]:
            raise ConfigError(f"output directory {plan.out_dir} holds results computed from other data files of section "
                              f"{section} ({before} now {data[section]}: size or modification time changed); use a new --out")


# ------------------------------------------------------------------------------------------------
# data preparation


class SlideStore:
    """Loads each section once and makes slides for a gene panel (which may differ per fold for HVGs)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._sections: dict[str, Section] = {}
        self._slides: dict[tuple, Slide] = {}
        self._fixed_panel: Optional[list[str]] = None
        self._fold_panels: dict[tuple, list[str]] = {}
        self._features: dict[str, dict] = {}
        self._patches: dict[str, dict] = {}
        self._measured_everywhere: Optional[set] = None

    def section(self, name: str) -> Section:
        if name not in self._sections:
            self._sections[name] = load_checked(self.plan.dataset, name)
        return self._sections[name]

    def panel(self, fold: Fold) -> list[str]:
        pconf = self.plan.config.panel
        if pconf.hvg or pconf.hmhvg or pconf.top_expressed:
            key = fold.train + fold.val
            if key not in self._fold_panels:  # chosen on the fold's training side only
                if self._measured_everywhere is None:  # test sections must have the chosen genes
                    genes = [set(np.asarray(self.section(i.name).genes, dtype=str)) for i in self.plan.sections]
                    self._measured_everywhere = set.intersection(*genes)
                training = [self.section(s) for s in key]
                if pconf.hvg:
                    chosen = highly_variable_genes(training, int(pconf.hvg), candidates=self._measured_everywhere)
                elif pconf.top_expressed:
                    chosen = top_expressed_genes(training, int(pconf.top_expressed), candidates=self._measured_everywhere)
                else:
                    chosen = high_mean_high_variance_genes(training, int(pconf.hmhvg), candidates=self._measured_everywhere)
                self._fold_panels[key] = chosen
            return self._fold_panels[key]
        if self._fixed_panel is None:
            if pconf.file:
                path = panel_path(pconf.file, self.plan.base_dir)
                genes, source = read_panel_file(path), f"gene panel file {path}"
            else:
                genes, source = self.plan.dataset.default_panel(), f"dataset {self.plan.config.dataset}'s panel"
                if genes is None:
                    raise ConfigError(f"dataset {self.plan.config.dataset} has no default gene panel; set panel.file or panel.hvg")
            self._check_panel(genes, source)
            self._fixed_panel = list(genes)
        return self._fixed_panel

    def _check_panel(self, genes: list[str], source: str) -> None:
        for info in self.plan.sections:
            measured = self.section(info.name).gene_index  # a dict: np.isin on strings is slow
            missing = [g for g in genes if g not in measured]
            if missing:
                raise DataError(
                    f"{source} names {len(missing)} gene(s) absent from section {info.name} "
                    f"(e.g. {', '.join(missing[:5])}); remove them from the panel or use panel.hvg"
                )

    def prepare_features(self, progress: Optional[Callable[[str], None]] = None) -> None:
        """Compute (or load from the cache) the image features every method needs, section by section."""
        if self.plan.encoder is None:
            return
        from stbench.images.features import FeatureStore
        from stbench.paths import cache_dir

        images = self.plan.config.images
        features = FeatureStore(self.plan.encoder, images.encoder, self.plan.config.dataset, cache_dir(),
                                min_inside=images.min_inside, progress=progress)
        for info in self.plan.sections:
            self._features[info.name] = slide_features(features.get(self.section(info.name), self.plan.patch_specs))
        self.feature_counts = (features.computed, features.loaded)

    def prepare_patches(self, progress: Optional[Callable[[str], None]] = None) -> None:
        """Cut (or open from the cache) the patches the methods declared, section by section."""
        if not self.plan.patch_requests:
            return
        from stbench.images.patches import PatchStore
        from stbench.paths import cache_dir

        store = PatchStore(cache_dir(), self.plan.config.dataset, min_inside=self.plan.config.images.min_inside,
                           progress=progress)
        for info in self.plan.sections:
            self._patches[info.name] = store.get(self.section(info.name), self.plan.patch_requests)
        self.patch_counts = (store.computed, store.loaded)

    def slide(self, name: str, genes: list[str]) -> Slide:
        key = (name, hashlib.sha1("\n".join(genes).encode()).hexdigest())
        if key not in self._slides:
            niche = any("niche_expression" in n for n in self.plan.needs.values())
            slide = make_slide(self.section(name), genes, self.plan.config.normalisation, niche=niche,
                               smoothing=self.plan.config.smoothing)
            slide.features = self._features.get(name, {})
            slide.patches = self._patches.get(name, {})  # read-only memory maps, shared, never copied
            # shared by every fold and method: read-only, so no plugin can corrupt a later fold's truth
            for array in (slide.expr, slide.grid, slide.pixel, slide.niche_expr, slide.niche_complete,
                          *slide.features.values()):
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False
            self._slides[key] = slide
        return self._slides[key]

    def fingerprints(self) -> dict:
        """Per section, the names, sizes and modification times of the files it was read from."""
        return {info.name: self.section(info.name).fingerprint() for info in self.plan.sections}


def genes_hash(genes: list[str]) -> str:
    return hashlib.sha1("\n".join(genes).encode()).hexdigest()


def pick_device(requested: Optional[str]) -> str:
    """The torch device for methods: ``requested`` (``--device``) if given, else CUDA when torch is
    loaded (a torch method's factory imports it) and sees a GPU, else the CPU."""
    if requested:
        return requested
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:  # only if a method imported it; the core does not need torch
        sys.modules["torch"].manual_seed(seed)


@dataclass
class FoldContext:
    """What fold-level metrics may use: the gene order by training mean (chosen without test data)."""

    train_gene_order: Optional[np.ndarray] = None


def _metric_columns(prefix: str, value: MetricValue, method=None, metric=None) -> dict:
    """The columns of one metric. A method that predicts one vector everywhere by design gets NaN
    ("undefined") for correlations; any other constant prediction keeps the metric's score of 0."""
    number = value.value
    if method is not None and method.constant_predictor and metric.undefined_for_constant:
        number = float("nan")
    out = {prefix: number, f"{prefix}_skipped": value.n_skipped}
    if value.n_pred_constant:
        out[f"{prefix}_pred_constant"] = value.n_pred_constant
    return out


# ------------------------------------------------------------------------------------------------
# the loop


@dataclass
class RunOutcome:
    out_dir: Path
    #: the rows of results.csv and fold_results.csv, as written (strings)
    results: list
    fold_results: list
    units_run: int
    units_skipped: int


def execute(plan: Plan, verbose: bool = True, executor=None) -> RunOutcome:
    """Run every method x fold not yet complete in ``plan.out_dir``. ``verbose``: a progress bar on a
    terminal, one line per step otherwise (logs); nothing when False. ``executor``: where the units
    compute (:mod:`stbench.executors`; default: one after another in this process).

    The run directory is locked for the whole run (a second process into it is refused). Until the
    provenance files are written, a failure leaves nothing behind: a directory this call created is
    removed again. A unit that raises does not stop the others: once they are written,
    :class:`UnitsFailed` names every failed unit, and running the same command again runs only those.
    """
    created = not plan.out_dir.exists()
    lock = RunLock(plan.out_dir)
    lock.acquire()
    started = False
    try:
        run = RunDir(plan.out_dir)
        _check_resumable(run, plan)
        atomic.remove_leftovers(plan.out_dir)  # .tmp-* files of killed runs (we hold the lock)
        started, outcome = _execute_locked(plan, run, verbose, executor)
        return outcome
    except BaseException:
        if created and not started:
            lock.release()
            _remove_if_only_lock(plan.out_dir)
        raise
    finally:
        lock.release()


def _remove_if_only_lock(out_dir: Path) -> None:
    try:
        leftovers = list(out_dir.iterdir())
        if all(p.name == RunLock(out_dir).path.name for p in leftovers):
            for p in leftovers:
                p.unlink()
            out_dir.rmdir()
    except OSError:
        pass


def _execute_locked(plan: Plan, run: RunDir, verbose: bool, executor=None):
    config = plan.config
    patient_of = {s.name: s.patient for s in plan.sections}

    # read and check all data before writing anything, so bad input leaves no half-made run
    store = SlideStore(plan)
    panels = [genes_hash(store.panel(fold)) for fold in plan.folds]
    data = store.fingerprints()
    _check_same_data(run, plan, panels, data)
    test_names = sorted({s for f in plan.folds for s in f.test})
    unique_test = sum(len(f.test) for f in plan.folds) == len(test_names)
    ratios = test_ratios(config)
    check_prompt_counts({n: store.section(n).n_spots for n in test_names}, min(ratios))
    strategy = plan.plugins.prompts.get(config.prompt.strategy)
    # slide -> ratio -> prompt indices (one ratio unless prompt.ratios sweeps several)
    prompts: dict[str, dict[float, np.ndarray]] = {}
    for name in test_names:
        positions = store.section(name).positions_um()
        prompts[name] = sweep_prompts(strategy, positions, ratios, name, config.seed)
    tty = sys.stderr.isatty()
    progress = None
    if verbose:
        progress = lambda msg: print(f"stbench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    store.prepare_features(progress)
    store.prepare_patches(progress)
    # provenance before any method runs, so even a run that dies later says what it was
    old = run.read_json("run.json") or {}
    method_configs = dict(old.get("methods", {}))
    method_configs.update({m: cfg.to_dict(c) for m, c in plan.methods.items()})
    record = {"protocol": _protocol(config), "methods": method_configs, "folds": fold_record(plan),
              "panels": panels, "data": data,
              "constant_predictors": sorted(set(old.get("constant_predictors", []))
                                            | {m for m in plan.methods if plan.plugins.methods.get(m).constant_predictor})}
    encoder = old.get("encoder")
    if plan.encoder is not None:
        encoder = {k: v for k, v in plan.encoder.describe().items() if k in ENCODER_IDENTITY}
        if old.get("encoder") not in (None, encoder):
            raise ConfigError(f"output directory {plan.out_dir} holds results computed with encoder {old['encoder']}; "
                              f"this run uses {encoder}; use a new --out")
    if encoder is not None:
        record["encoder"] = encoder
    units = [Unit(m, f.index) for m in plan.methods for f in plan.folds]
    todo = [u for u in units if not _unit_complete(run, plan, u.method, folds_by_index(plan)[u.fold])]
    # --fit-all: one model per method on every section, complete once saved
    todo += [Unit(m, FIT_ALL) for m in plan.methods
             if plan.fit_all and not models.is_saved(models.model_dir(plan.out_dir, m, models.ALL))]
    device = pick_device(config.device)

    run.write_json("run.json", record)
    full = cfg.to_dict(config)
    full["methods"] = method_configs
    atomic.write_text(plan.out_dir / "config.yaml", cfg.dump_yaml(full))
    run.write_json("split.json", {
        "split": config.split, "protocol_level": config.protocol_level, "seed": config.seed,
        "folds": [f.to_dict(patient_of) for f in plan.folds],
    })
    invocation = {**versions(), "seed": config.seed,
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "plugins": {i.name: i.package for i in plan.plugins.infos.values()},
                  "units": [u.name for u in todo]}
    run.append_versions(invocation)
    ids = lambda n, idx: [str(store.section(n).spot_ids[i]) for i in idx]  # noqa: E731
    record_prompts = {"strategy": config.prompt.strategy, "ratio": max(ratios), "seed": config.seed,
                      "slides": {n: ids(n, sets[max(ratios)]) for n, sets in prompts.items()}}
    if config.prompt.ratios:  # the sweep: every ratio's prompts, and whether they nest
        record_prompts["sweep"] = {str(r): {n: ids(n, sets[r]) for n, sets in prompts.items()} for r in ratios}
        record_prompts["nested"] = all(nested(sets) for sets in prompts.values())
    run.write_json("prompts.json", record_prompts)

    if executor is None:
        from stbench.executors import LocalExecutor

        executor = LocalExecutor()
    session = UnitSession(plan, store, prompts, device)
    failures = _run_units(session, run, executor, todo, invocation, unique_test, progress, verbose and tty)
    if failures:
        raise UnitsFailed(failures, len(todo), run.root)
    results, fold_results = run.merge()
    n_folds = len([u for u in todo if u.fold != FIT_ALL])
    return True, RunOutcome(plan.out_dir, results, fold_results, n_folds, len(units) - n_folds)


def _run_units(session: "UnitSession", run: RunDir, executor, units: list, invocation: dict, unique_test: bool,
               progress: Optional[Callable[[str], None]], bar: bool) -> list:
    """Run ``units`` on ``executor``, writing each result as it arrives; returns the failures."""
    plan = session.plan
    failures: list[UnitFailure] = []
    shown: set = set()  # warnings shown once per run, as Python shows one per process
    announced: set = set()
    finished = 0
    tqdm_bar = None
    if bar and units:
        from tqdm import tqdm

        # a live bar on a terminal; one line per unit in logs (CI, nohup), where \r-redraws are noise
        tqdm_bar = tqdm(total=len(units), desc="stbench", unit="unit", file=sys.stderr, leave=False)

    def say(message: str) -> None:  # a line above the bar, or a log line
        if tqdm_bar is not None:
            tqdm_bar.write(f"stbench: {message}", file=sys.stderr)
        elif progress:
            progress(message)

    def what(unit: Unit) -> str:
        if unit.fold == FIT_ALL:
            return f"{unit.method}: fitting on every section (the model to deploy, models/{unit.method}/{models.ALL})"
        fold = folds_by_index(plan)[unit.fold]
        return f"{unit.method}: fold {fold.index + 1}/{len(plan.folds)} ({fold.name})"

    def started(unit: Unit) -> None:  # executors that run one unit at a time say which
        announced.add(unit)
        if tqdm_bar is not None:
            tqdm_bar.set_postfix_str(unit.name)
        elif progress:
            progress(what(unit))

    def done(unit: Unit, outcome) -> None:
        nonlocal finished
        finished += 1
        if isinstance(outcome, UnitResult):
            for message, category, filename, lineno in outcome.warnings:
                if (message, category, filename, lineno) not in shown:
                    shown.add((message, category, filename, lineno))
                    warnings.showwarning(message, category, filename, lineno)
            try:
                write_unit_result(session, run, outcome, unique_test, invocation)
                error_path(run, unit).unlink(missing_ok=True)  # the traceback of an earlier attempt
            except Exception as exc:  # e.g. a fitted state that is not JSON: this unit fails, not the run
                outcome = UnitFailure.of(unit, exc)
        if isinstance(outcome, UnitFailure):
            failures.append(outcome)
            atomic.write_text(error_path(run, unit), outcome.report())
            say(f"{unit.name} failed: {outcome.error} [{finished}/{len(units)}]")
        elif progress and tqdm_bar is None and unit not in announced:  # parallel executors: one line per result
            progress(f"{what(unit)} done in {outcome.seconds:.1f} s on {outcome.host} [{finished}/{len(units)}]")
        if tqdm_bar is not None:
            tqdm_bar.update(1)

    try:
        executor.run(session, units, done, started)
    finally:
        if tqdm_bar is not None:
            tqdm_bar.close()
    return failures


# ------------------------------------------------------------------------------------------------
# units: what an executor runs (stbench.executors)

#: the fold index of a --fit-all unit (whole_dataset_fold)
FIT_ALL = -1


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``method`` fitted on fold ``fold``, then predicting and scoring its test slides;
    or, with ``fold`` = :data:`FIT_ALL` (--fit-all), fitted on every section and saved."""

    method: str
    fold: int

    @property
    def name(self) -> str:
        """``ridge/fold2``, ``ridge/all``: as versions.json lists the units an invocation ran."""
        return f"{self.method}/{models.ALL if self.fold == FIT_ALL else models.fold_scope(self.fold)}"


@dataclass
class SlidePrediction:
    slide: str
    #: the prompt ratio of a sweep (each ratio has its prediction folder); None in a one-ratio run
    ratio: Optional[float]
    pred: np.ndarray  # (N, G) float32, as the .h5ad file stores it
    is_prompt: np.ndarray


@dataclass
class UnitResult:
    """What a unit computed, handed to the driver, which writes it (:func:`write_unit_result`)."""

    unit: Unit
    slide_rows: list = field(default_factory=list)
    fold_rows: list = field(default_factory=list)
    predictions: list = field(default_factory=list)  # of SlidePrediction
    #: with --save-models: the fitted state, taken before any fine-tuning on a test slide
    state: Optional[FittedState] = None
    #: the warnings the unit showed, as (message, category, filename, lineno): the driver shows them
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    host: str = ""


@dataclass
class UnitFailure:
    """A unit that raised: its exception, as text (it may come from another machine)."""

    unit: Unit
    error: str  # "RuntimeError: boom": the exception's type and first line
    traceback: str
    host: str = ""

    @classmethod
    def of(cls, unit: Unit, exc: BaseException) -> "UnitFailure":
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return cls(unit, f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
                   "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), socket.gethostname())

    def report(self) -> str:
        return f"{self.unit.name} failed on {self.host}: {self.error}\n\n{self.traceback}"


class UnitsFailed(Exception):
    """Units that raised (``failures``, :class:`UnitFailure`) while the others of the run were written."""

    def __init__(self, failures: list, n_units: int, run_dir: Path):
        self.failures, self.n_units, self.run_dir = failures, n_units, Path(run_dir)
        lines = [f"{len(failures)} of {n_units} units failed (the others are written; run the same command again "
                 "to run only the failed ones):"]
        for f in sorted(failures, key=lambda f: (f.unit.method, f.unit.fold)):
            lines.append(f"  {f.unit.name}: {f.error} (traceback: {error_path(RunDir(run_dir), f.unit)})")
        super().__init__("\n".join(lines))


def error_path(run: RunDir, unit: Unit) -> Path:
    """Where a failed unit's traceback is kept (removed once the unit succeeds)."""
    return run.root / "errors" / f"{unit.name}.txt"


@dataclass
class UnitSession:
    """What units need from the driver: the plan, its data, each test slide's prompts (slide -> ratio ->
    indices) and the torch device (None: each unit picks where it runs, :func:`pick_device`)."""

    plan: Plan
    store: SlideStore
    prompts: dict
    device: Optional[str]


def folds_by_index(plan: Plan) -> dict:
    return {f.index: f for f in plan.folds}


def run_unit(session: UnitSession, unit: Unit):
    """:func:`compute_unit`, with an exception returned as a :class:`UnitFailure` so the others go on.
    (An interrupt, which is not an ``Exception``, still stops the run.)"""
    try:
        return compute_unit(session, unit)
    except Exception as exc:
        return UnitFailure.of(unit, exc)


def compute_unit(session: UnitSession, unit: Unit) -> UnitResult:
    """Fit ``unit.method`` on its fold, then predict and score every test slide at every prompt ratio;
    return the rows, the predictions and (with --save-models) the fitted state. Writes nothing into the
    run directory (a method may keep checkpoints under RUN_DIR/work). The same in every executor."""
    plan, store, config = session.plan, session.store, session.plan.config
    spec = plan.plugins.methods.get(unit.method)
    fold = whole_dataset_fold(plan) if unit.fold == FIT_ALL else folds_by_index(plan)[unit.fold]
    result = UnitResult(unit, host=socket.gethostname())
    begin = time.perf_counter()
    with _collect_warnings(result.warnings):
        genes = store.panel(fold)
        train = [store.slide(s, genes) for s in fold.train]
        tests = [store.slide(s, genes) for s in fold.test]
        val = [store.slide(s, genes) for s in fold.val]
        # selection=test_fold: the sources' protocol (leaky, labelled in every table): every training patient
        # trains, and the test slides, unmasked, select the checkpoint / penalty / epoch (val_is_test: never
        # fitted on); the default selects on training patients
        val_is_test = config.selection == "test_fold" and bool(tests)  # a --fit-all unit has no test slides
        if val_is_test:
            train, val = train + val, tests
        method: Method = plan.plugins.methods.load(unit.method)(copy.deepcopy(plan.methods[unit.method]))
        # after building: the factory may be what imports torch
        with torch_threads(spec.resources.cpus):
            _seed_everything(config.seed)
            scope = models.ALL if unit.fold == FIT_ALL else models.fold_scope(fold.index)
            context = FitContext(seed=config.seed, genes=np.asarray(genes), fold=fold.index,
                                 workdir=plan.out_dir / "work" / unit.method / scope,
                                 device=session.device or pick_device(config.device),
                                 prompt_ratio=config.prompt.ratio, prompt_strategy=config.prompt.strategy,
                                 prompt_selector=plan.plugins.prompts.get(config.prompt.strategy),
                                 val_is_test=val_is_test)
            method.fit(train, val, context)
            if plan.save_models:  # the fold's model, before any fine-tuning on a test slide
                result.state = _on_cpu(method.get_state())
            if unit.fold != FIT_ALL:
                _test_fold(plan, spec, method, fold, genes, train, tests, session.prompts, result)
    result.seconds = time.perf_counter() - begin
    return result


def _test_fold(plan: Plan, spec, method: Method, fold: Fold, genes: list[str], train: list, tests: list, prompts,
               result: UnitResult) -> None:
    """Predict and score every test slide of ``fold`` at every prompt ratio, into ``result``."""
    config = plan.config
    metric_specs = [plan.plugins.metrics.get(m) for m in config.metrics]
    method_name = result.unit.method
    finetune = config.finetune.enabled and spec.finetune and type(method).supports_finetune()
    settings = FinetuneSettings(epochs=config.finetune.epochs, lr=config.finetune.lr, seed=config.seed)

    sweep = bool(config.prompt.ratios)
    ratios = test_ratios(config)
    pooled = {r: ([], [], [], []) for r in ratios}  # ratio -> scored preds, truths; all-spot preds, truths
    slide_metrics = [m for m in metric_specs if m.level == "slide"]
    for slide in tests:
        # every ratio of a sweep is scored on the same spots: those prompted at none of them
        never_prompted = np.ones(slide.n_spots, dtype=bool)
        for idx in prompts[slide.name].values():
            never_prompted[idx] = False
        for ratio, idx in prompts[slide.name].items():
            masked = slide.masked(idx)
            model = method
            if finetune:
                model = copy.deepcopy(method)  # the fold's model stays untouched for the next slide / ratio
                _seed_everything(config.seed)
                model.finetune(masked, settings)
            pred = checked_prediction(model.predict(masked), method_name, masked)
            is_prompt = masked.prompt_mask()
            scored = never_prompted
            row = {"method": method_name, "fold": fold.index, "slide": slide.name, "patient": slide.patient,
                   **({"prompt_ratio": ratio} if sweep else {}),
                   "n_spots": slide.n_spots, "n_prompt": int(is_prompt.sum()), "n_scored": int(scored.sum()),
                   "finetuned": bool(finetune)}
            row.update(score_slide(plan.plugins, spec, slide_metrics, pred, slide.expr, is_prompt, scored))
            result.slide_rows.append(row)
            for store_list, value in zip(pooled[ratio], (pred[scored], slide.expr[scored], pred, slide.expr)):
                store_list.append(value)
            result.predictions.append(SlidePrediction(slide.name, ratio if sweep else None,
                                                      pred.astype(np.float32, copy=False), is_prompt))

    train_mean = np.concatenate([s.expr for s in train]).mean(axis=0)
    fctx = FoldContext(train_gene_order=np.argsort(-train_mean, kind="stable"))
    for ratio, (preds_np, truths_np, preds_all, truths_all) in pooled.items():
        fold_row = {"method": method_name, "fold": fold.index, **({"prompt_ratio": ratio} if sweep else {}),
                    "test_slides": ",".join(fold.test),
                    "test_patients": ",".join(sorted({s.patient for s in tests})), "n_genes": len(genes),
                    "fit_summary": json.dumps(method.summary(), default=str), "stbench_git": git_revision()}
        for m in (m for m in metric_specs if m.level == "fold"):
            func = plan.plugins.metrics.load(m.name, "func")
            fold_row.update(_metric_columns(m.name, func(preds_np, truths_np, fctx), spec, m))
            fold_row.update(_metric_columns(f"{m.name}_all", func(preds_all, truths_all, fctx), spec, m))
        result.fold_rows.append(fold_row)


def write_unit_result(session: UnitSession, run: RunDir, result: UnitResult, unique_test: bool,
                      invocation: dict) -> None:
    """Write what a unit computed into the run directory: its model, its predictions, then its parts
    (written last: they mark the unit done)."""
    plan, store, unit = session.plan, session.store, result.unit
    fold = whole_dataset_fold(plan) if unit.fold == FIT_ALL else folds_by_index(plan)[unit.fold]
    genes = store.panel(fold)
    if result.state is not None:
        scope = models.ALL if unit.fold == FIT_ALL else models.fold_scope(fold.index)
        models.save(models.model_dir(plan.out_dir, unit.method, scope), _Fitted(result.state),
                    model_record(plan, store, unit.method, fold, genes, scope))
    if unit.fold == FIT_ALL:
        return
    for p in result.predictions:
        write_prediction(run.prediction(unit.method, p.slide, fold.index, unique_test, p.ratio),
                         store.slide(p.slide, genes), p.pred, p.is_prompt, fold.index, unit.method,
                         UNITS[plan.config.normalisation])
    run.write_unit(unit.method, fold.index, result.slide_rows, result.fold_rows, invocation)


class _Fitted:
    """A fitted state as :func:`stbench.models.save` takes it (it asks a method for its state): the
    driver holds only the state a unit returned."""

    def __init__(self, state: FittedState):
        self._state = state

    def get_state(self) -> FittedState:
        return self._state


def _on_cpu(state: FittedState) -> FittedState:
    """The state with its tensors on the CPU, so it reaches a driver without a GPU."""
    arrays = {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in state.arrays.items()}
    return FittedState(arrays, state.meta)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with exactly ``n`` torch threads (the unit's declared CPUs) in every executor: Ray gives a task
    one thread, a local process one per core, and the thread count can change floating-point sums.
    Only when a method has loaded torch: the core does not import it."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _collect_warnings(into: list):
    """Collect the warnings a unit shows (those the process's filters let through) instead of printing
    them, so the driver shows them whichever process or machine computed the unit."""
    original = warnings.showwarning

    def collect(message, category, filename, lineno, file=None, line=None):
        into.append((str(message), category, filename, lineno))

    warnings.showwarning = collect
    try:
        yield
    finally:
        warnings.showwarning = original


def test_ratios(config: cfg.RunConfig) -> list[float]:
    """The prompt ratios a run predicts at: the sweep's (sorted), else the one ratio."""
    return sorted({float(r) for r in config.prompt.ratios}) if config.prompt.ratios else [float(config.prompt.ratio)]


def checked_prediction(pred, method_name: str, slide: Slide) -> np.ndarray:
    """A method's prediction for ``slide`` as an array, refused unless (N, G) and finite."""
    pred = np.asarray(pred)
    if pred.shape != (slide.n_spots, slide.n_genes):
        raise RuntimeError(f"method {method_name} predicted shape {pred.shape} for slide {slide.name}, "
                           f"expected {(slide.n_spots, slide.n_genes)}")
    if not np.isfinite(pred).all():
        raise RuntimeError(f"method {method_name} predicted NaN or infinite values for slide {slide.name}")
    return pred


def score_slide(plugins: Plugins, spec, metric_specs, pred: np.ndarray, truth: np.ndarray, is_prompt: np.ndarray,
                scored: Optional[np.ndarray] = None) -> dict:
    """The slide metric columns of results.csv (shared by ``stbench run`` and ``stbench predict``): each
    slide-level metric on the non-prompt spots (or ``scored``: in a prompt-ratio sweep, the spots
    prompted at no ratio), then ``<metric>_all`` on every spot."""
    scored = ~np.asarray(is_prompt, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    slide_level = [m for m in metric_specs if m.level == "slide"]
    row: dict = {}
    pred_scored, truth_scored = pred[scored], truth[scored]  # one copy for every metric
    for m in slide_level:
        row.update(_metric_columns(m.name, plugins.metrics.load(m.name, "func")(pred_scored, truth_scored), spec, m))
    for m in slide_level:
        row.update(_metric_columns(f"{m.name}_all", plugins.metrics.load(m.name, "func")(pred, truth), spec, m))
    return row


# ------------------------------------------------------------------------------------------------
# saved models (--save-models, --fit-all)


def _unit_complete(run: RunDir, plan: Plan, method: str, fold: Fold) -> bool:
    """A method x fold is complete when its results are written and, with --save-models, its model is saved."""
    if not run.is_done(method, fold.index):
        return False
    return not plan.save_models or models.is_saved(models.model_dir(plan.out_dir, method, models.fold_scope(fold.index)))


def whole_dataset_fold(plan: Plan) -> Fold:
    """The --fit-all "fold": every section of the run fits the model and none is tested.

    Validation slides (used only to *select*: a penalty, an epoch, a checkpoint; closed-form methods
    then refit on all sections, the rule of stbench.method) follow the split's own inner-validation
    rule with the whole dataset as the training side: one patient held out (patient-level splits), one
    section (section-level), ``val_fraction`` of the slides (random splits), chosen with the run's seed;
    none when the split's ``inner_val`` is false or a single patient (section) is left.
    """
    sspec = plan.plugins.splits.get(plan.config.split)
    params = (cfg.build(plan.plugins.splits.load(plan.config.split, "params"), plan.config.split_params, "split_params")
              if sspec.params else None)
    names = sorted(s.name for s in plan.sections)
    rng = np.random.default_rng(plan.config.seed)
    val: list[str] = []
    if getattr(params, "inner_val", True):
        if sspec.unit == "section":
            if len(names) >= 2:
                val = [names[int(rng.integers(len(names)))]]
        elif sspec.unit == "patient":
            by_patient: dict[str, list[str]] = {}
            for s in sorted(plan.sections, key=lambda s: s.name):
                by_patient.setdefault(s.patient, []).append(s.name)
            patients = sorted(by_patient)
            if len(patients) >= 2:
                val = by_patient[patients[int(rng.integers(len(patients)))]]
        else:  # slide-level random splits
            n_val = max(round(float(getattr(params, "val_fraction", 0.1)) * len(names)), 1)
            if n_val < len(names):
                val = sorted(str(n) for n in rng.permutation(names)[:n_val])
    train = tuple(n for n in names if n not in val)
    return Fold(index=-1, train=train, val=tuple(val), test=(), name="all sections")


def model_record(plan: Plan, store: SlideStore, method_name: str, fold: Fold, genes: list[str], scope: str) -> dict:
    """What model.json says beside the weights: what the model expects as input and where it came from."""
    config = plan.config
    patient_of = {s.name: s.patient for s in plan.sections}
    fitted_on = [store.section(n) for n in fold.train + fold.val]
    lattices = sorted({s.lattice for s in fitted_on})
    pitches = sorted({float(s.spot_pitch_um) for s in fitted_on})
    mpps = [float(s.mpp) for s in fitted_on if s.mpp is not None]
    needs = plan.needs.get(method_name, frozenset())
    encoder = None
    if plan.encoder is not None and any(n in FEATURE_KINDS for n in needs):
        encoder = models.encoder_identity(plan.encoder, config.images.encoder)
    spec = plan.plugins.methods.get(method_name)
    if scope == models.ALL:
        description = (f"fitted on every section of {config.benchmark} (no test fold: the model to deploy, never "
                       f"scored); validation {', '.join(fold.val) or 'none'}, chosen by the inner-validation rule of "
                       f"split {config.split} with every section on the training side")
    else:
        description = (f"fold {fold.index} of {config.split} on {config.benchmark} (test {', '.join(fold.test)}), "
                       "saved before any fine-tuning on a test slide")
    return {
        "method": method_name,
        "scope": "all" if scope == models.ALL else "fold",
        "fold": None if scope == models.ALL else fold.index,
        "description": description,
        "config": cfg.to_dict(plan.methods[method_name]),
        "needs": sorted(needs),
        "patches": [r.name for r in spec.patches_for(plan.methods[method_name])],
        "genes": list(genes),
        "normalisation": config.normalisation,
        "units": UNITS[config.normalisation],
        "encoder": encoder,
        "images": cfg.to_dict(config.images),
        "dataset": {"name": config.dataset, "benchmark": config.benchmark, "version": config.version,
                    "options": dict(config.dataset_options)},
        "geometry": {"lattice": lattices[0] if len(lattices) == 1 else lattices,
                     "spot_pitch_um": pitches[0] if len(pitches) == 1 else pitches,
                     "spot_diameter_um": float(fitted_on[0].spot_diameter_um),
                     "mpp_range": [min(mpps), max(mpps)] if mpps else None},
        "sections": {side: list(getattr(fold, side)) for side in ("train", "val", "test")},
        "patients": {side: sorted({patient_of[s] for s in getattr(fold, side)}) for side in ("train", "val", "test")},
        "protocol": {"split": config.split, "protocol_level": config.protocol_level, "seed": config.seed,
                     "prompt": cfg.to_dict(config.prompt), "finetune": cfg.to_dict(config.finetune),
                     "metrics": list(config.metrics)},
        "provenance": {"stbench": stbench.__version__, "stbench_git": git_revision(),
                       "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "run_dir": str(plan.out_dir.resolve())},
    }
