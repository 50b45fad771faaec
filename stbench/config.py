"""Run configuration: one dataclass of defaults, layered overrides, strict validation.

Precedence, stated once (later wins):

    RunConfig defaults < benchmark definition (benchmarks/<name>/benchmark.yaml)
    < --config FILE < --set key=value (and the CLI shorthands --prompt-ratio, --seed, ...)

Every layer is checked for unknown keys before it is merged, so an error names the layer it came from
and suggests the closest key. Method hyperparameters live in each method's own config dataclass and are
overridden under ``methods.<name>.<field>``; dataset options under ``dataset_options.<field>``; split
parameters under ``split_params.<field>``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from stbench.errors import ConfigError

#: where model selection looks (RunConfig.selection); "test_fold" is the sources' leaky protocol
SELECTIONS = ("inner_val", "test_fold")

DEFAULT_METRICS = [
    "pcc", "ccc", "mae", "mse", "rvd", "rvd_triplex",
    "pcc_pooled", "pcc@10_posthoc", "pcc@50_posthoc", "pcc@200_posthoc",
    "pcc@10_train", "pcc@50_train", "pcc@200_train",
]


@dataclass
class PromptConfig:
    #: share of each test slide's spots whose expression is given to the methods, in (0, 1)
    ratio: float = 0.1
    #: a registered prompt strategy (stbench list prompts)
    strategy: str = "random"
    #: a prompt-ratio sweep (e.g. [0.02, 0.05, 0.1, 0.2, 0.4]): every fold is fitted once and predicted at
    #: each ratio (fine-tuned per ratio with --finetune); every ratio is scored on the same spots, those
    #: prompted at none of them. Empty: one ratio, ``ratio``. Methods that simulate prompts in training
    #: are still told ``ratio``.
    ratios: list = field(default_factory=list)


@dataclass
class PanelConfig:
    #: a panel file (one symbol per line, or .npy), relative to the benchmark definition's folder
    file: Optional[str] = None
    #: instead: compute this many highly variable genes on each fold's training sections
    hvg: Optional[int] = None
    #: instead: HyperST's high-mean high-variance genes (METHODS.md §1.4), on each fold's training sections
    hmhvg: Optional[int] = None
    #: instead: the genes with the highest total count on each fold's training sections (the PH2ST
    #: code's "highly expressed" panel, gene_type: mean: the first 785 of its top 1,000 are its top 785)
    top_expressed: Optional[int] = None


@dataclass
class FinetuneConfig:
    #: fine-tune a copy of each fold's model on each test slide's prompt spots (METHODS.md §9.1)
    enabled: bool = False
    epochs: int = 5
    #: None: each method's training learning rate
    lr: Optional[float] = None


@dataclass
class ImageConfig:
    #: a registered encoder (stbench list encoders); the offline default needs no weights
    encoder: str = "hefeat"
    #: a local checkpoint, "random" (random initialisation; results are labelled), or None (the
    #: encoder's default source, e.g. $STBENCH_UNI_WEIGHTS)
    encoder_weights: Optional[str] = None
    #: side of a spot patch (and of each neighbour sub-patch) in µm: 224 px at 0.5 µm/px (HEST, PHG2ST)
    spot_um: float = 112.0
    #: the neighbour region is neighbour_grid x neighbour_grid sub-patches (PHG2ST, TRIPLEX: 5)
    neighbour_grid: int = 5
    #: a (sub-)patch with less than this share of its area inside the image is masked
    min_inside: float = 0.5


@dataclass
class RunConfig:
    #: name and version of the benchmark definition this config came from
    benchmark: str = "synthetic"
    version: int = 1
    description: str = ""
    #: what a reader of a table must know that the numbers cannot say (e.g. a gene panel chosen with
    #: the test sections); printed in every leaderboard header
    caveats: list = field(default_factory=list)
    #: a named set of reduced settings (e.g. the CPU preset, benchmarks/<name>/cpu.yaml); printed in
    #: every leaderboard's footer, so a table of CPU-sized models says so
    preset: Optional[str] = None
    dataset: str = "synthetic"
    dataset_options: dict = field(default_factory=dict)
    #: the dataset's folder; None: $STBENCH_DATA/<folder> or the user cache
    data_dir: Optional[str] = None
    split: str = "leave_one_patient_out"
    split_params: dict = field(default_factory=dict)
    #: the level at which train and test must be independent: patient | section | spot
    protocol_level: str = "patient"
    panel: PanelConfig = field(default_factory=PanelConfig)
    normalisation: str = "cpm_log1p"
    #: target smoothing after normalisation: "none", or "grid3x3" (each spot's expression replaced by
    #: the mean over the spots within ±1 grid row and column, itself included: TRIPLEX / PH2ST code).
    #: LEAKY: the truth of a test slide is smoothed before prompts are drawn, so prompt values carry
    #: their non-prompt neighbours' expression; labelled in every table that uses it
    smoothing: str = "none"
    #: where model selection (early stopping, checkpoint, penalty) looks: "inner_val" (training
    #: patients, the default) or "test_fold" (the test slides themselves, as the TRIPLEX / PH2ST code
    #: does; LEAKY, labelled, for the protocol study only)
    selection: str = "inner_val"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    metrics: list = field(default_factory=lambda: list(DEFAULT_METRICS))
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    #: torch device for methods ("cpu", "cuda", "cuda:1", "mps"); None: CUDA when present, else CPU.
    #: Not part of the protocol: a run may resume on another device.
    device: Optional[str] = None
    #: per-method hyperparameter overrides: {method: {field: value}}
    methods: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# reading layers


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from ``path``; a one-line ConfigError for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}; fix the file's syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def flatten(d: Any, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested settings as dotted keys (to name what differs)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are read as YAML scalars."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set for {part!r}")
        node[parts[-1]] = value
    return out


def merge(base: dict, override: dict) -> dict:
    """Deep-merge mappings (override wins); lists and scalars are replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------------------
# validation against dataclasses


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(choices))}"


def check_keys(data: dict, cls: type, source: str, prefix: str = "") -> None:
    """Raise ConfigError for keys of ``data`` that are not fields of dataclass ``cls`` (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown config key {prefix + str(key)!r}{_did_you_mean(str(key), fields)}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            check_keys(value, sub, source, f"{prefix}{key}.")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return build(hint, value or {}, where)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string; a user writing --set lr=1e-3 means a number
            return float(value)
        except ValueError:
            pass
    if expected in (int, float, str, bool, list, dict):
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def build(cls: type, data: dict, source: str = "config") -> Any:
    """Instantiate dataclass ``cls`` from a mapping: unknown keys and wrong types are ConfigErrors."""
    check_keys(data, cls, source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{source}: key {k!r}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False)
