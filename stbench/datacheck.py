"""``stbench data check NAME``: a QC summary of a dataset, section by section."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stbench import benchmark
from stbench import config as cfg
from stbench.data.csr import as_scipy, row_sums
from stbench.data.checks import load_checked
from stbench.datasets import open_dataset
from stbench.data.expression import read_panel_file


def _panel(conf, base, dataset) -> tuple[Optional[list[str]], str]:
    """The gene panel a run of this benchmark would use (its panel file, else the dataset's panel),
    for the constant-gene counts; resolved exactly as ``stbench run --dataset NAME`` resolves it."""
    if conf.panel.file:
        path = benchmark.panel_path(conf.panel.file, base)
        return read_panel_file(path), f"panel {path.name}"
    genes = dataset.default_panel()
    return (list(genes), "dataset panel") if genes is not None else (None, "no panel")


def check_dataset(name: str, data_dir: Optional[str] = None, out_dir: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = None, sets: Optional[list[str]] = None) -> str:
    """The QC table of every section, and an overview PNG per imaged section under ``out_dir``.

    ``name`` is a dataset or a benchmark definition (``cscc_hest``: its dataset with its
    ``dataset_options`` and panel); ``sets`` are ``--set KEY=VALUE`` overrides, as for a run (e.g.
    ``dataset_options.where.organ=Skin``). ``progress(message)`` is called before each section (the
    first read of a dataset parses every file and takes a while)."""
    from tabulate import tabulate

    from stbench.plugins import get_plugins

    conf, base = benchmark.resolve_config(name, sets=sets)
    dataset = open_dataset(get_plugins(), conf.dataset, conf.dataset_options, data_dir,
                           "stbench data check NAME (a dataset or a benchmark definition)")
    panel, panel_name = _panel(conf, base, dataset)
    rows = []
    pictures = []
    images = cfg.ImageConfig()
    out = Path(out_dir) if out_dir else Path("runs") / f"qc-{name}"
    totals = {"spots": 0, "zero": 0, "without_counts": 0}
    infos = dataset.sections()
    for i, info in enumerate(infos, 1):
        if progress:
            progress(f"section {info.name} ({i}/{len(infos)})" + (", drawing its overview" if info.has_image else ""))
        s = load_checked(dataset, info.name)
        has_counts = s.counts is not None  # an image to predict, without measured expression
        library = row_sums(s.counts) if has_counts else np.ones(s.n_spots)
        qc = getattr(dataset, "qc", {}).get(info.name, {})
        without = qc.get("n_spotfile_rows_without_counts", 0)
        constant = "-"
        missing = "-"
        if panel is not None and has_counts:
            index = {g: i for i, g in enumerate(s.genes)}
            present = [index[g] for g in panel if g in index]
            missing = str(len(panel) - len(present))
            sub = as_scipy(s.counts)[:, present].tocsc()
            mins = sub.min(axis=0).toarray().ravel()
            maxs = sub.max(axis=0).toarray().ravel()
            constant = str(int((mins == maxs).sum()))
        if s.has_image and s.mpp:
            from stbench.images.overview import draw_overview

            pictures.append(draw_overview(s, out / f"{info.name}.png", images.spot_um, images.neighbour_grid))
        totals["spots"] += s.n_spots
        totals["zero"] += int((library == 0).sum())
        totals["without_counts"] += without
        rows.append([
            info.name, info.patient, s.n_spots, len(s.genes), "yes" if s.has_image else "no",
            f"{s.mpp:.3f}" if s.mpp else "-", without, int((library == 0).sum()) if has_counts else "no counts",
            constant, missing,
        ])
    headers = ["section", "patient", "spots", "genes", "image", "µm/px", "spot rows w/o counts",
               "zero-count spots", f"constant genes ({panel_name})", "panel genes missing"]
    n_patients = len({r[1] for r in rows})
    summary = (f"dataset {name}: {len(rows)} sections, {n_patients} patients, {totals['spots']} spots, "
               f"{sum(r[4] == 'yes' for r in rows)} with images, {totals['zero']} zero-count spots, "
               f"{totals['without_counts']} spot-file rows without counts")
    if pictures:
        summary += f"\noverview pictures (spot centres, {images.spot_um:g} µm patches, neighbour grid): " + ", ".join(map(str, pictures))
    return tabulate(rows, headers=headers, tablefmt="simple") + "\n\n" + summary
