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

    def prediction(self, method: str, slide: str, fold: int, unique: bool) -> Path:
        # a slide tested in several folds (random splits) gets one file per fold
        name = f"{slide}.h5ad" if unique else f"{slide}.fold{fold}.h5ad"
        return self.root / "predictions" / method / name

    def is_done(self, method: str, fold: int) -> bool:
        """Complete: both part files exist and parse, with one fold row and at least one slide row. A
        part damaged by a crash counts as not done, so the unit runs again."""
        return (_csv_rows(self.part(method, fold, "fold")) == 1
                and _csv_rows(self.part(method, fold, "slides")) >= 1)

    # writers -----------------------------------------------------------------------------------
    def write_json(self, name: str, data) -> None:
        atomic.write_text(self.root / name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, name: str) -> Optional[dict]:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_unit(self, method: str, fold: int, slide_rows: list[dict], fold_row: dict,
                   versions: Optional[dict] = None) -> None:
        """Record one method x fold. The fold file is written last: its presence means "done"."""
        import pandas as pd

        atomic.write_text(self.part(method, fold, "slides"), pd.DataFrame(slide_rows).to_csv(index=False))
        if versions is not None:
            path = self.root / "parts" / method / f"fold{fold}.versions.json"
            atomic.write_text(path, json.dumps(versions, indent=2, default=str) + "\n")
        atomic.write_text(self.part(method, fold, "fold"), pd.DataFrame([fold_row]).to_csv(index=False))

    def append_versions(self, invocation: dict) -> None:
        """versions.json: the latest invocation's record at the top level (what tables print) and every
        invocation, with the units it ran, under ``invocations`` (a resume appends, never overwrites)."""
        old = self.read_json("versions.json") or {}
        history = list(old.get("invocations", []))
        self.write_json("versions.json", {**invocation, "invocations": history + [invocation]})

    def merge(self):
        """Rebuild results.csv and fold_results.csv from the completed parts."""
        import pandas as pd

        slides, folds = [], []
        for fold_file in sorted((self.root / "parts").glob("*/fold*.fold.csv")):
            slide_file = fold_file.with_name(fold_file.name.replace(".fold.csv", ".slides.csv"))
            if not (_csv_rows(fold_file) == 1 and _csv_rows(slide_file) >= 1):
                continue  # damaged by a crash: the unit is not done and runs again
            folds.append(pd.read_csv(fold_file))
            slides.append(pd.read_csv(slide_file))
        results = pd.concat(slides, ignore_index=True) if slides else pd.DataFrame(columns=ID_COLUMNS)
        fold_results = pd.concat(folds, ignore_index=True) if folds else pd.DataFrame(columns=["method", "fold"])
        for frame in (results, fold_results):  # counts absent from some parts are zero, not missing
            for col in [c for c in frame if c.endswith(("_skipped", "_pred_constant"))]:
                frame[col] = frame[col].fillna(0).astype(int)
        if len(results):
            results = results.sort_values(["method", "fold", "slide"], kind="stable").reset_index(drop=True)
            fold_results = fold_results.sort_values(["method", "fold"], kind="stable").reset_index(drop=True)
        atomic.write_text(self.root / "results.csv", results.to_csv(index=False))
        atomic.write_text(self.root / "fold_results.csv", fold_results.to_csv(index=False))
        return results, fold_results


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
    import anndata
    import numpy as np
    import pandas as pd

    obs = pd.DataFrame(
        {
            "spot_id": np.asarray(slide.spot_ids, dtype=str),
            "grid_x": slide.grid[:, 0],
            "grid_y": slide.grid[:, 1],
            "pixel_x": slide.pixel[:, 0],
            "pixel_y": slide.pixel[:, 1],
            "is_prompt": is_prompt,
            "fold": fold,
        },
        index=pd.Index(np.asarray(slide.spot_ids, dtype=str), name="spot"),
    )
    var = pd.DataFrame(index=pd.Index(np.asarray(slide.genes, dtype=str), name="gene"))
    adata = anndata.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=var)
    adata.layers["truth"] = np.asarray(slide.expr, dtype=np.float32)
    adata.obsm["spatial"] = np.asarray(slide.pixel, dtype=np.float64)
    adata.uns["stbench"] = {
        "method": method, "slide": slide.name, "patient": slide.patient, "fold": int(fold),
        "units": units, "mpp": float(slide.mpp) if slide.mpp is not None else -1.0,
    }
    with atomic.atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
