"""Split protocols: which sections train, validate and test in each fold.

Every protocol is seeded and returns :class:`Fold` objects naming sections. Validation sections always
come from the training side (inner validation): never from the test patients. :func:`check_folds`
refuses a split in which one patient is on both the training and the test side, unless the benchmark
declares a section- or spot-level protocol.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stbench.data.layouts import natural_key
from stbench.data.model import SectionInfo
from stbench.errors import ConfigError
from stbench.specs import SplitSpec, resolve


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    name: str = ""

    def to_dict(self, patient_of: dict[str, str]) -> dict:
        out = asdict(self)
        for side in ("train", "val", "test"):
            out[side] = list(getattr(self, side))
            out[f"{side}_patients"] = sorted({patient_of[s] for s in getattr(self, side)})
        return out


def _patients(sections: Sequence[SectionInfo]) -> dict[str, list[str]]:
    by_patient: dict[str, list[str]] = {}
    for s in sections:
        by_patient.setdefault(s.patient, []).append(s.name)
    return {p: sorted(v) for p, v in sorted(by_patient.items())}


def _pick_val_patient(train_patients: list[str], rng: np.random.Generator) -> list[str]:
    # One training patient validates (inner validation); none if only one training patient is left.
    if len(train_patients) < 2:
        return []
    return [train_patients[int(rng.integers(len(train_patients)))]]


@dataclass
class PatientParams:
    #: hold out one training patient as the validation set (False: validate on nothing)
    inner_val: bool = True


@dataclass
class KFoldParams(PatientParams):
    k: int = 5


@dataclass
class SectionParams:
    inner_val: bool = True


@dataclass
class RandomSlideParams:
    n_splits: int = 5
    test_fraction: float = 0.1
    val_fraction: float = 0.1


def _patient_folds(groups: list[list[str]], by_patient, seed, inner_val) -> list[Fold]:
    rng = np.random.default_rng(seed)
    folds = []
    for i, test_patients in enumerate(groups):
        train_patients = [p for p in by_patient if p not in test_patients]
        val_patients = _pick_val_patient(train_patients, rng) if inner_val else []
        sections_of = lambda ps: tuple(s for p in ps for s in by_patient[p])  # noqa: E731
        folds.append(
            Fold(
                index=i,
                name="test=" + ",".join(test_patients),
                train=sections_of([p for p in train_patients if p not in val_patients]),
                val=sections_of(val_patients),
                test=sections_of(test_patients),
            )
        )
    return folds


def leave_one_patient_out(sections, seed: int, inner_val: bool = True) -> list[Fold]:
    by_patient = _patients(sections)
    if len(by_patient) < 2:
        raise ConfigError(
            "split leave_one_patient_out needs at least 2 patients; this dataset has "
            f"{len(by_patient)} (use split leave_one_section_out and declare protocol_level: section)"
        )
    return _patient_folds([[p] for p in by_patient], by_patient, seed, inner_val)


def patient_kfold(sections, seed: int, k: int = 5, inner_val: bool = True) -> list[Fold]:
    by_patient = _patients(sections)
    if not 2 <= k <= len(by_patient):
        raise ConfigError(f"split patient_kfold: k must be between 2 and the number of patients ({len(by_patient)}), got {k} (key split_params.k)")
    order = list(by_patient)
    np.random.default_rng(seed).shuffle(order)
    groups = [sorted(order[i::k]) for i in range(k)]
    return _patient_folds(groups, by_patient, seed, inner_val)


def leave_one_section_out(sections, seed: int, inner_val: bool = True) -> list[Fold]:
    names = sorted(s.name for s in sections)
    patient_of = {s.name: s.patient for s in sections}
    rng = np.random.default_rng(seed)
    folds = []
    for i, test in enumerate(names):
        rest = [n for n in names if n != test]
        val: list[str] = []
        if inner_val and len(rest) >= 2:
            # prefer a validation section from another patient than the test section
            other = [n for n in rest if patient_of[n] != patient_of[test]] or rest
            val = [other[int(rng.integers(len(other)))]]
        folds.append(Fold(i, tuple(n for n in rest if n not in val), tuple(val), (test,), name=f"test={test}"))
    return folds


def random_slide(sections, seed: int, n_splits: int = 5, test_fraction: float = 0.1, val_fraction: float = 0.1) -> list[Fold]:
    """HyperST-like: ``n_splits`` independent shuffles of the slide list, 80/10/10 by slide.

    One RNG seeded once, then consecutive shuffles (METHODS.md §1.5), so test sets may overlap across
    splits: this is not a partition. It follows HyperST's recipe but cannot reproduce HyperST's own
    splits (they came from another RNG and slide list); ``split: file`` reads HyperST's published
    split files instead (:func:`file_split`).
    """
    names = sorted(s.name for s in sections)
    n = len(names)
    n_test = max(round(test_fraction * n), 1)
    n_val = max(round(val_fraction * n), 1)
    if n_test + n_val >= n:
        raise ConfigError(f"split random_slide needs more than {n_test + n_val} slides, the dataset has {n}")
    rng = np.random.default_rng(seed)
    folds = []
    for i in range(n_splits):
        order = list(rng.permutation(names))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        folds.append(Fold(i, tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), name=f"split {i}"))
    return folds


@dataclass
class FileSplitParams:
    #: a JSON split file, or a folder whose ``*.json`` files are read in natural name order; absolute,
    #: or relative to the benchmark definition's folder (else to the current directory)
    path: Optional[str] = None


#: the keys of one fold: the simple format, and HyperST's published files (``split/<dataset>/flod_5/
#: sample_split_flod_<k>.json``; its ``patient_flod_5`` files add ``*_patient`` lists, which are not read:
#: patients come from the dataset, and check_folds applies the benchmark's protocol level to them)
FOLD_KEYS = {
    "simple": {"train": "train", "val": "val", "test": "test"},
    "hyperst": {"train": "train_sample", "val": "val_sample", "test": "test_sample"},
}
_IGNORED = {"simple": {"name"}, "hyperst": {"train_patient", "val_patient", "test_patient"}}
FILE_FORMAT = ('{"folds": [{"name": "...", "train": [ids], "val": [ids], "test": [ids]}, ...]}, one fold '
               '{"train": [...], "val": [...], "test": [...]}, or HyperST\'s {"train_sample": [...], '
               '"val_sample": [...], "test_sample": [...]}')


def split_file_path(path: Optional[str], base_dir: Optional[Path] = None) -> Path:
    """Where ``split_params.path`` points: absolute, beside the benchmark definition, or in the
    current directory (the first that exists)."""
    if not path:
        raise ConfigError("split file needs split_params.path: a JSON split file or a folder of them "
                          "(--set split_params.path=FILE, or split_params: {path: FILE} in the benchmark definition)")
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [*([Path(base_dir) / given] if base_dir else []), Path.cwd() / given]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(f"split file {path} not found (looked at {', '.join(map(str, candidates))}); give split_params.path "
                      "absolute or relative to the benchmark definition")


def _read_fold_objects(path: Path) -> list[tuple[Path, str, dict]]:
    """(file, fold name, fold object) for every fold in a split file or a folder of them."""
    files = sorted(path.glob("*.json"), key=lambda p: natural_key(p.name)) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"split file folder {path} holds no *.json file; put one split file per fold there")
    out = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"split file {file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "fix its syntax") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"split file {file} cannot be read ({e})") from None
        if isinstance(data, dict) and "folds" in data:
            extra = sorted(set(data) - {"folds", "description"})
            if extra or not isinstance(data["folds"], list) or not data["folds"]:
                problem = f"unknown key(s) {', '.join(extra)}" if extra else "'folds' must be a non-empty list"
                raise ConfigError(f"split file {file}: {problem}; expected {FILE_FORMAT}")
            for i, fold in enumerate(data["folds"]):
                name = fold.get("name") if isinstance(fold, dict) else None
                out.append((file, str(name) if name else f"{file.stem} fold {i}", fold))
        else:
            out.append((file, file.stem, data))
    return out


def _fold_lists(file: Path, name: str, fold) -> dict[str, tuple[str, ...]]:
    """train, val and test section names of one fold object, checked."""
    if not isinstance(fold, dict):
        raise ConfigError(f"split file {file}: fold {name!r} is a {type(fold).__name__}, not an object; expected {FILE_FORMAT}")
    style = "hyperst" if any(str(k).endswith("_sample") for k in fold) else "simple"
    keys = FOLD_KEYS[style]
    unknown = sorted(set(fold) - set(keys.values()) - _IGNORED[style])
    if unknown:
        raise ConfigError(f"split file {file}: fold {name!r} has unknown key(s) {', '.join(map(str, unknown))}; "
                          f"expected {FILE_FORMAT}")
    lists = {}
    for role, key in keys.items():
        values = fold.get(key, [] if role == "val" else None)
        if values is None:
            raise ConfigError(f"split file {file}: fold {name!r} has no {key!r} list; expected {FILE_FORMAT}")
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"split file {file}: fold {name!r}: {key!r} must be a list of sample ids")
        ids = [str(v) for v in values]
        twice = sorted({v for v in ids if ids.count(v) > 1})
        if twice:
            raise ConfigError(f"split file {file}: fold {name!r} lists {', '.join(twice)} twice in {key!r}")
        lists[role] = tuple(ids)
    return lists


def file_split(sections, seed: int, path: Optional[str] = None, base_dir: Optional[Path] = None) -> list[Fold]:
    """Folds read from JSON split files (``split: file``), e.g. HyperST's published ones.

    ``path`` is a file (one fold, or ``{"folds": [...]}``) or a folder of files, one or more folds each
    (see :data:`FILE_FORMAT`). Every id must name a section of the run; the seed is not used. The run
    then applies :func:`check_folds`, as to computed splits: a patient on both sides is refused unless the
    benchmark declares ``protocol_level: section``.
    """
    source = split_file_path(path, base_dir)
    known = {s.name for s in sections}
    folds = []
    for index, (file, name, fold) in enumerate(_read_fold_objects(source)):
        lists = _fold_lists(file, name, fold)
        unknown = [s for role in ("train", "val", "test") for s in lists[role] if s not in known]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ConfigError(f"split file {file}: fold {name!r} names {len(unknown)} sample id(s) that are not sections "
                              f"of this run: {shown} (the run has {len(known)}: {', '.join(sorted(known)[:5])}"
                              f"{' ...' if len(known) > 5 else ''}; sections without an image are left out when a method "
                              "needs images); fix the ids or the dataset")
        folds.append(Fold(index, lists["train"], lists["val"], lists["test"], name=name))
    return folds


#: what a benchmark may declare as the level at which train and test must be independent
PROTOCOL_LEVELS = ("patient", "section", "spot")


def check_folds(folds: list[Fold], sections: Sequence[SectionInfo], protocol_level: str, split_name: str) -> None:
    """Refuse folds that leak: a patient on both sides, a section in two roles (train and test, train
    and validation, validation and test), unknown sections."""
    if protocol_level not in PROTOCOL_LEVELS:
        raise ConfigError(f"protocol_level must be one of {', '.join(PROTOCOL_LEVELS)}, got {protocol_level!r}")
    patient_of = {s.name: s.patient for s in sections}
    for fold in folds:
        for side in (fold.train, fold.val, fold.test):
            unknown = [s for s in side if s not in patient_of]
            if unknown:
                raise ConfigError(f"split {split_name} fold {fold.index} names unknown sections {unknown}")
        if set(fold.test) & (set(fold.train) | set(fold.val)):
            raise ConfigError(f"split {split_name} fold {fold.index} uses a section for both training and testing")
        if set(fold.train) & set(fold.val):
            both = sorted(set(fold.train) & set(fold.val))
            raise ConfigError(f"split {split_name} fold {fold.index} uses section(s) {', '.join(both)} for both training "
                              "and validation; a validation section must be held out of training")
        if not fold.test or not fold.train:
            raise ConfigError(f"split {split_name} fold {fold.index} has an empty training or test set")
        if protocol_level == "patient":
            shared = {patient_of[s] for s in fold.test} & {patient_of[s] for s in fold.train + fold.val}
            if shared:
                raise ConfigError(
                    f"split {split_name} fold {fold.index} puts patient(s) {', '.join(sorted(shared))} in both "
                    "train and test; use a patient-level split (leave_one_patient_out, patient_kfold), or "
                    "declare protocol_level: section in the benchmark if section-level results are intended"
                )


def builtin_split_specs() -> list[SplitSpec]:
    """The built-in split protocols (defined in :mod:`stbench.builtin`), functions imported."""
    from stbench.builtin import split_specs

    return [dataclasses.replace(spec, func=resolve(spec.func), params=resolve(spec.params) if spec.params else None)
            for spec in split_specs()]
