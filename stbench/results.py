"""The run directory: what a run writes, written so that an interrupted run resumes cleanly.

Layout of ``RUN_DIR``::

    config.yaml               resolved run config (protocol + each method's resolved hyperparameters)
    split.json                every fold's train / validation / test sections and patients
    prompts.json              the prompt spot ids of every test slide (the same for every method)
    versions.json             package versions, platform, seed, stbench source revision of the latest
                              invocation, and under "invocations" every invocation and the units it ran
    results.csv               one row per method x fold x test slide (merged from parts/)
    fold_results.csv          one row per method x fold: fold-level metrics (pooled PCC, PCC@k)
    predictions/<method>/<slide>.h5ad
    models/<method>/fold<k>/, models/<method>/all/
                              with --save-models (--fit-all): the fitted models (stbench.models)
    parts/<method>/fold<k>.slides.csv, fold<k>.versions.json, fold<k>.fold.csv
                              per-unit results and the versions that computed them; the .fold.csv
                              marks the unit done
    .lock                     held by the running process (stbench.lock)

Every file is written atomically and durably (:mod:`stbench.atomic`). A unit of work (one method on one
fold) counts as complete only when its ``.fold.csv`` and ``.slides.csv`` both exist and parse, and
``results.csv`` is always rebuilt from the parts, so a run killed at any point (or an OS crash that
leaves a damaged part) and started again neither loses nor duplicates rows.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from stbench import atomic

ID_COLUMNS = ["method", "fold", "slide", "patient", "n_spots", "n_prompt", "n_scored"]


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    # paths -------------------------------------------------------------------------------------
    def part(self, method: str, fold: int, kind: str) -> Path:
        return self.root / "parts" / method / f"fold{fold}.{kind}.csv"

    def prediction(self, method: str, slide: str, fold: int, unique: bool, ratio: Optional[float] = None) -> Path:
        # a slide tested in several folds (random splits) gets one file per fold; a prompt-ratio sweep
        # one folder per ratio
        name = f"{slide}.h5ad" if unique else f"{slide}.fold{fold}.h5ad"
        folder = self.root / "predictions" / method
        return (folder / f"ratio{ratio:g}" / name) if ratio is not None else folder / name

    def is_done(self, method: str, fold: int) -> bool:
        """Complete: both part files exist and parse, with a fold row (one per prompt ratio) and at least
        one slide row. A part damaged by a crash counts as not done, so the unit runs again."""
        return (_csv_rows(self.part(method, fold, "fold")) >= 1
                and _csv_rows(self.part(method, fold, "slides")) >= 1)

    # writers -----------------------------------------------------------------------------------
    def write_json(self, name: str, data) -> None:
        atomic.write_text(self.root / name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, name: str) -> Optional[dict]:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_unit(self, method: str, fold: int, slide_rows: list[dict], fold_rows: list[dict],
                   versions: Optional[dict] = None) -> None:
        """Record one method x fold (one fold row per prompt ratio). The fold file is written last: its
        presence means "done"."""
        atomic.write_text(self.part(method, fold, "slides"), _to_csv(slide_rows))
        if versions is not None:
            path = self.root / "parts" / method / f"fold{fold}.versions.json"
            atomic.write_text(path, json.dumps(versions, indent=2, default=str) + "\n")
        atomic.write_text(self.part(method, fold, "fold"), _to_csv(list(fold_rows)))

    def append_versions(self, invocation: dict) -> None:
        """versions.json: the latest invocation's record at the top level (what tables print) and every
        invocation, with the units it ran, under ``invocations`` (a resume appends, never overwrites)."""
        old = self.read_json("versions.json") or {}
        history = list(old.get("invocations", []))
        self.write_json("versions.json", {**invocation, "invocations": history + [invocation]})

    def merge(self) -> tuple[list[dict], list[dict]]:
        """Rebuild results.csv and fold_results.csv from the completed parts; returns their rows.

        Plain CSV (no pandas: a resumed run whose units are all done stays fast). A column absent
        from some parts is empty there, except the ``*_skipped`` / ``*_pred_constant`` counts, which
        are 0."""
        slides, folds = [], []
        for fold_file in sorted((self.root / "parts").glob("*/fold*.fold.csv")):
            slide_file = fold_file.with_name(fold_file.name.replace(".fold.csv", ".slides.csv"))
            if not (_csv_rows(fold_file) >= 1 and _csv_rows(slide_file) >= 1):
                continue  # damaged by a crash: the unit is not done and runs again
            folds += _read_csv(fold_file)
            slides += _read_csv(slide_file)
        order = lambda r: (r["method"], int(r["fold"]), float(r.get("prompt_ratio") or 0), r.get("slide", ""))  # noqa: E731
        slides.sort(key=order)
        folds.sort(key=order)
        atomic.write_text(self.root / "results.csv", _to_csv(slides, ID_COLUMNS))
        atomic.write_text(self.root / "fold_results.csv", _to_csv(folds, ["method", "fold"]))
        return slides, folds


def csv_text(rows: list[dict], empty_columns: Optional[list[str]] = None) -> str:
    """Rows as CSV text, written the way results.csv is (columns in first-seen order, NaN empty,
    absent counts 0)."""
    return _to_csv(rows, empty_columns)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN: an empty cell, as pandas writes it
        return ""
    return str(value)


def _to_csv(rows: list[dict], empty_columns: Optional[list[str]] = None) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row)) or list(empty_columns or [])
    counts = [c for c in columns if c.endswith(("_skipped", "_pred_constant"))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [_cell(row.get(c)) for c in columns]
        for c in counts:  # a count absent from a part is zero, not missing
            k = columns.index(c)
            values[k] = values[k] or "0"
            if values[k].endswith(".0"):
                values[k] = values[k][:-2]
        writer.writerow(values)
    return out.getvalue()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _csv_rows(path: Path) -> int:
    """Data rows of a CSV file with a header; -1 when it is missing, empty or does not parse."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return -1
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows[1:]):
        return -1
    return len(rows) - 1


def write_prediction(path: Path, slide, pred, is_prompt, fold: int, method: str, units: str) -> None:
    """Save one slide's predictions as AnnData: X = prediction, layer ``truth``, obs per spot."""
    import numpy as np

    from stbench.h5ad import write_h5ad

    spot_ids = np.asarray(slide.spot_ids, dtype=str)
    obs = {
        "spot_id": spot_ids,
        "grid_x": np.asarray(slide.grid[:, 0]),
        "grid_y": np.asarray(slide.grid[:, 1]),
        "pixel_x": np.asarray(slide.pixel[:, 0]),
        "pixel_y": np.asarray(slide.pixel[:, 1]),
        "is_prompt": np.asarray(is_prompt, dtype=bool),
        "fold": np.full(len(spot_ids), int(fold), dtype=np.int64),
    }
    uns = {"stbench": {
        "method": method, "slide": slide.name, "patient": slide.patient, "fold": int(fold),
        "units": units, "mpp": float(slide.mpp) if slide.mpp is not None else -1.0,
    }}
    with atomic.atomic_path(path) as tmp:
        write_h5ad(tmp, np.asarray(pred, dtype=np.float32), spot_ids, obs, np.asarray(slide.genes, dtype=str),
                   layers={"truth": np.asarray(slide.expr, dtype=np.float32)},
                   obsm={"spatial": np.asarray(slide.pixel, dtype=np.float64)}, uns=uns,
                   obs_index_name="spot", var_index_name="gene")
