"""The run directory: what a run writes, written so that an interrupted run resumes cleanly.

Layout of ``RUN_DIR``::

    config.yaml               resolved run config (protocol + each method's resolved hyperparameters)
    split.json                every fold's train / validation / test sections and patients
    prompts.json              the prompt spot ids of every test slide (the same for every method)
    versions.json             package versions, platform, seed, stbench source revision
    results.csv               one row per method x fold x test slide (merged from parts/)
    fold_results.csv          one row per method x fold: fold-level metrics (pooled PCC, PCC@k)
    predictions/<method>/<slide>.h5ad
    parts/<method>/fold<k>.slides.csv, fold<k>.fold.csv   per-unit results; the .fold.csv marks it done

Every file is written atomically. A unit of work (one method on one fold) counts as complete only when
its ``.fold.csv`` exists, and ``results.csv`` is always rebuilt from the parts, so a run killed at any
point and started again neither loses nor duplicates rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

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
        return self.part(method, fold, "fold").exists()

    # writers -----------------------------------------------------------------------------------
    def write_json(self, name: str, data) -> None:
        atomic.write_text(self.root / name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, name: str) -> Optional[dict]:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_unit(self, method: str, fold: int, slide_rows: list[dict], fold_row: dict) -> None:
        """Record one method x fold. The fold file is written last: its presence means "done"."""
        atomic.write_text(self.part(method, fold, "slides"), pd.DataFrame(slide_rows).to_csv(index=False))
        atomic.write_text(self.part(method, fold, "fold"), pd.DataFrame([fold_row]).to_csv(index=False))

    def merge(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rebuild results.csv and fold_results.csv from the completed parts."""
        slides, folds = [], []
        for fold_file in sorted((self.root / "parts").glob("*/fold*.fold.csv")):
            slide_file = fold_file.with_name(fold_file.name.replace(".fold.csv", ".slides.csv"))
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


def write_prediction(path: Path, slide, pred: np.ndarray, is_prompt: np.ndarray, fold: int, method: str,
                     units: str) -> None:
    """Save one slide's predictions as AnnData: X = prediction, layer ``truth``, obs per spot."""
    import anndata

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
