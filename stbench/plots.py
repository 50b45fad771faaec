"""Pictures of a run: measured and predicted expression as spot maps over the H&E, and per method the
distribution of per-gene PCC (``stbench plot RUN_DIR``).

matplotlib is imported only when a picture is drawn, and only its object-oriented API is used
(``Figure`` rendered by the Agg canvas, never ``pyplot``), so no global backend state is touched and
``import stbench`` stays light.

What a run directory gives (:mod:`stbench.results`): ``predictions/<method>/<slide>.h5ad`` with the
prediction (``X``), the truth the run scored against (layer ``truth``, already restricted to the fold's
panel and normalised by the run), the prompt flags and the spot coordinates; ``config.yaml``, the
resolved config, from which the dataset is opened again for the H&E images. A prediction file without a
``truth`` layer gets its truth re-read from the dataset with the run's panel and normalisation
(:func:`stbench.data.expression.make_slide`, as the run itself does).

Every PNG carries its panel layout in a text chunk (``stbench-panels``: one ``"gene|label"`` per map
panel; maps also ``stbench-background``: ``H&E`` or ``white``), so tests and scripts can check what a
picture holds without parsing pixels.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from stbench import atomic
from stbench.errors import ConfigError, DataError, StbenchError

#: width of one map panel in inches (rendered at DPI)
PANEL_IN = 3.0
DPI = 110
#: pixels of the H&E region under the spots: twice what a panel shows, so it stays sharp
IMAGE_PX = 2 * int(PANEL_IN * DPI)
#: the H&E's weight against white under the spots (1: unfaded)
IMAGE_FADE = 0.75
#: the colour range of a gene is these percentiles of all its panels' values, so a few outliers do not
#: wash out the map
COLOUR_PERCENTILES = (2.0, 98.0)
#: the map's colours; prompt spots get an outline in PROMPT_COLOUR, which stands out on all of them
CMAP = "viridis"
PROMPT_COLOUR = "#e8112d"
#: text chunk of every PNG written here that lists its map panels
PANELS_KEY = "stbench-panels"
#: text chunk of a map: what the spots are drawn on, "H&E" or "white"
BACKGROUND_KEY = "stbench-background"
#: the label of the measured expression in the maps
MEASURED = "measured"


# ------------------------------------------------------------------------------------------------
# the pictures


def spot_maps(section, values: Mapping[str, np.ndarray], genes: Sequence[str], out_path, *, title: str,
              panel_genes: Optional[Sequence[str]] = None, prompt_mask: Optional[np.ndarray] = None,
              pcc: Optional[Mapping[str, Mapping[str, float]]] = None, units: str = "") -> Path:
    """Write a PNG of spot maps: one row per gene, one column per label, over the section's H&E.

    Args:
        section: a :class:`stbench.data.model.Section` or :class:`~stbench.data.model.Slide` (its
            ``section`` gives the image): spot centres ``pixel`` with ``mpp``, or ``grid`` when there is
            no pixel frame; its H&E (``image_path`` / ``image_loader``) is drawn under the spots when it
            has one, else the spots are drawn on white.
        values: label (``"measured"``, a method name) -> (N, G) array over the section's spots.
        genes: the genes to draw, a subset of ``panel_genes``.
        panel_genes: the G column names of ``values`` (default ``genes``: the arrays hold only those).
        prompt_mask: (N,) bool, prompt spots, drawn with an outline.
        pcc: label -> gene -> PCC, shown in the panel titles (NaN: "undefined").
        title: the figure's title (slide, method, protocol).
        units: the expression's units, for the colour bars.

    One colour scale per gene (row), shared by its panels, so measured and predicted values compare
    directly. Returns ``out_path``.
    """
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    genes = [str(g) for g in genes]
    panel_genes = [str(g) for g in (panel_genes if panel_genes is not None else genes)]
    column = {g: i for i, g in enumerate(panel_genes)}
    missing = [g for g in genes if g not in column]
    if missing:
        raise ValueError(f"genes {missing} are not among the panel genes of the values")
    labels = list(values)
    if not labels or not genes:
        raise ValueError("spot_maps needs at least one label and one gene")
    frame = _spot_frame(section)
    n = len(frame.xy)
    for label, array in values.items():
        if np.shape(array) != (n, len(panel_genes)):
            raise ValueError(f"values[{label!r}] has shape {np.shape(array)}, expected ({n}, {len(panel_genes)})")
    prompts = np.zeros(n, bool) if prompt_mask is None else np.asarray(prompt_mask, dtype=bool)

    x0, y0, x1, y1 = frame.bounds
    aspect = (y1 - y0) / max(x1 - x0, 1e-9)
    panel_h = float(np.clip(PANEL_IN * aspect, 0.45 * PANEL_IN, 1.6 * PANEL_IN))
    n_rows, n_cols = len(genes), len(labels)
    width = PANEL_IN * n_cols + 1.0  # + the colour bars
    title = _wrap(title, width)
    height = (panel_h + 0.35) * n_rows + 0.2 * (title.count("\n") + 1) + 0.35  # panels and their titles, the title, the legend
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.03, h_pad=0.03, wspace=0.01, hspace=0.02)
    grid = fig.add_gridspec(n_rows, n_cols)
    fig.suptitle(title, fontsize=10)
    for r, gene in enumerate(genes):
        c = column[gene]
        stacked = np.concatenate([np.asarray(values[label])[:, c] for label in labels])
        lo, hi = np.percentile(stacked, COLOUR_PERCENTILES)
        if not hi > lo:  # a constant gene: any small range shows it as one colour
            lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(lo, hi)
        row = []
        for k, label in enumerate(labels):
            ax = fig.add_subplot(grid[r, k])
            row.append(ax)
            ax.set_label(f"map:{gene}|{label}")
            if frame.image is not None:
                ax.imshow(frame.image, extent=frame.image_extent, interpolation="antialiased")
            spots = EllipseCollection(frame.diameter, frame.diameter, 0, units="xy", offsets=frame.xy,
                                      offset_transform=ax.transData, cmap=CMAP, norm=norm,
                                      edgecolors=np.where(prompts[:, None], _rgba(PROMPT_COLOUR), (0, 0, 0, 0)),
                                      linewidths=np.where(prompts, 1.2, 0.0))
            spots.set_array(np.asarray(values[label], dtype=np.float64)[:, c])
            ax.add_collection(spots)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)  # image rows grow downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_panel_title(gene, label, (pcc or {}).get(label, {}).get(gene), first=k == 0), fontsize=9)
        bar = fig.colorbar(spots, ax=row, extend="both", fraction=0.04, pad=0.01, aspect=15)
        bar.ax.set_label(f"colourbar:{gene}")
        bar.ax.tick_params(labelsize=7)
        bar.set_label(f"{gene}" + (f", {units}" if units else ""), fontsize=7)
    legend = "colour: expression, one scale per gene (row)"
    if prompts.any():
        legend += f"; red outline: the {int(prompts.sum())} prompt spots (expression given to the methods, not scored)"
    fig.supxlabel(legend, fontsize=7, x=0.01, ha="left")
    # the panels as drawn: the figure's own map axes, not the list we meant to draw
    panels = [ax.get_label().removeprefix("map:") for ax in fig.axes if ax.get_label().startswith("map:")]
    return _save(fig, out_path, panels, {BACKGROUND_KEY: "H&E" if frame.image is not None else "white"})


def pcc_distribution(per_gene: Mapping[str, object], out_path, *, title: str,
                     undefined: Sequence[str] = ()) -> Path:
    """Write a PNG: per method (``per_gene``: method -> per-gene PCC values, an array or a mapping gene ->
    value), a violin of its per-gene PCC values with every gene as a dot, the mean
    and median marked and written out. ``undefined``: methods whose correlation has no meaning (they
    predict one vector everywhere by design); they get a labelled empty slot. Returns ``out_path``."""
    from matplotlib.figure import Figure

    methods = list(per_gene)
    if not methods:
        raise ValueError("pcc_distribution needs at least one method")
    fig = Figure(figsize=(max(6.5, 1.6 * len(methods) + 1.5), 4.8), dpi=DPI)
    ax = fig.add_subplot()
    ax.set_label("pcc-distribution")
    rng = np.random.default_rng(0)  # the dots' horizontal jitter, the same on every run
    lowest = 0.0
    for k, method in enumerate(methods):
        values = per_gene[method]
        r = np.asarray(list(values.values()) if isinstance(values, Mapping) else values, dtype=np.float64)
        r = r[np.isfinite(r)]
        if method in undefined or len(r) == 0:
            why = "constant by design" if method in undefined else "no gene with a defined PCC"
            ax.text(k, 0.0, f"undefined\n({why})", ha="center", va="center", fontsize=8, color="0.4")
            continue
        if len(r) > 1 and np.ptp(r) > 0:
            parts = ax.violinplot(r, positions=[k], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor("#8fb3d9")
                body.set_alpha(0.6)
        ax.scatter(k + rng.uniform(-0.18, 0.18, len(r)), r, s=4, color="#1f3b73", alpha=0.5, linewidths=0)
        mean, median = float(r.mean()), float(np.median(r))
        ax.hlines(median, k - 0.3, k + 0.3, color="black", linewidth=1.5)
        ax.scatter([k], [mean], marker="D", s=28, color="#e8112d", zorder=3)
        ax.text(k, 1.01, f"mean {mean:.3f}\nmedian {median:.3f}\n{len(r)} genes", ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())  # x in data, y in axes fractions: just above the axes
        lowest = min(lowest, float(r.min()))
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylim(max(-1.0, min(-0.1, np.floor(lowest * 10) / 10 - 0.05)), 1.0)  # the data's range, 0 and 1 always shown
    ax.set_ylabel("per-gene PCC (mean over test slides)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(_wrap(title, fig.get_figwidth()), fontsize=9)
    fig.text(0.01, 0.01, "dots: genes; black bar: median; red diamond: mean", fontsize=7)
    fig.subplots_adjust(top=0.70, bottom=0.10, left=0.13, right=0.98)
    return _save(fig, out_path, [f"pcc|{m}" for m in methods])


def ratio_sweep(table: Mapping[str, Mapping[float, Mapping[str, float]]], out_path, *, title: str,
                metric_label: str = "PCC") -> Path:
    """Write a PNG of a prompt-ratio sweep: per method (``table``: method -> ratio -> {"mean", "std"}), the
    metric against the prompt ratio, mean over folds with ± std as a band. Methods whose metric is
    undefined at every ratio are listed in the legend as such. Returns ``out_path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8), dpi=DPI)
    ax = fig.add_subplot()
    ax.set_label("ratio-sweep")
    panels = []
    for method, by_ratio in table.items():
        ratios = sorted(by_ratio)
        mean = np.array([by_ratio[r]["mean"] for r in ratios], dtype=np.float64)
        std = np.nan_to_num(np.array([by_ratio[r]["std"] for r in ratios], dtype=np.float64))
        if not np.isfinite(mean).any():
            ax.plot([], [], color="0.6", linestyle=":", label=f"{method} (undefined)")
            continue
        line, = ax.plot(ratios, mean, marker="o", label=method)
        ax.fill_between(ratios, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        panels.append(f"sweep|{method}")
    ax.set_xscale("log")
    all_ratios = sorted({r for by in table.values() for r in by})
    ax.set_xticks(all_ratios, [f"{r:g}" for r in all_ratios])
    ax.minorticks_off()
    ax.set_xlabel("prompt ratio (share of each test slide's spots measured)")
    ax.set_ylabel(f"{metric_label} (mean ± std over folds)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(_wrap(title, fig.get_figwidth()), fontsize=9)
    fig.subplots_adjust(top=0.82, bottom=0.12, left=0.12, right=0.98)
    return _save(fig, out_path, panels)


def _wrap(title: str, width_in: float) -> str:
    """Each line of ``title`` wrapped to the figure's width (about 13 characters per inch at 9 pt)."""
    import textwrap

    return "\n".join(textwrap.fill(line, max(30, int(width_in * 13))) for line in title.splitlines())


def _panel_title(gene: str, label: str, r: Optional[float], first: bool) -> str:
    head = f"{gene}: {label}" if first else label
    if r is None:
        return head
    return f"{head}  (PCC {r:.2f})" if np.isfinite(r) else f"{head}  (PCC undefined)"


def _rgba(colour: str):
    from matplotlib.colors import to_rgba

    return to_rgba(colour)


def _save(fig, out_path, panels: list[str], extra: Optional[dict] = None) -> Path:
    out_path = Path(out_path)
    with atomic.atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={PANELS_KEY: json.dumps(panels), **(extra or {})})
    return out_path


def png_text(png) -> dict:
    """The text chunks of a PNG (:data:`PANELS_KEY`, :data:`BACKGROUND_KEY`, matplotlib's ``Software``)."""
    from PIL import Image

    with Image.open(png) as im:
        return dict(im.text)


def read_panels(png) -> list[str]:
    """The ``"gene|label"`` map panels a PNG written here holds (from its ``stbench-panels`` chunk)."""
    return json.loads(png_text(png).get(PANELS_KEY, "[]"))


# ------------------------------------------------------------------------------------------------
# where spots lie, and what they lie on


@dataclass
class _Frame:
    xy: np.ndarray  # (N, 2) spot centres in the drawing frame (full-resolution pixels, or µm)
    diameter: float  # spot diameter in the drawing frame
    bounds: tuple  # (x0, y0, x1, y1) drawn region
    image: Optional[np.ndarray] = None  # the H&E region under the spots, faded
    image_extent: Optional[tuple] = None  # (left, right, bottom, top) of that region in the drawing frame


def _spot_frame(obj) -> _Frame:
    """Spot centres, size and the H&E crop behind them. Drawn in full-resolution pixels when the
    section has a pixel frame (``mpp``), else in µm from the grid (:func:`stbench.data.model.positions_um`)."""
    from stbench.data.model import positions_um

    section = getattr(obj, "section", None) or obj  # a Slide keeps its Section for image access
    if obj.mpp is not None and obj.pixel is not None:
        xy = np.asarray(obj.pixel, dtype=np.float64)
        diameter = obj.spot_diameter_um / obj.mpp
        pitch = obj.spot_pitch_um / obj.mpp
    else:
        xy, diameter, pitch = positions_um(obj), obj.spot_diameter_um, obj.spot_pitch_um
    margin = pitch  # one lattice step around the outermost spots
    x0, y0 = xy.min(axis=0) - margin
    x1, y1 = xy.max(axis=0) + margin
    frame = _Frame(xy, float(diameter), (x0, y0, x1, y1))
    if obj.mpp is not None and getattr(section, "has_image", False):
        from stbench.images.region import open_reader

        # one square region around the spots, read at the resolution the panels show (a pyramid level
        # or a reduced JPEG decode: a whole-slide image is never decoded whole); the axes crop it
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        with open_reader(section, target_mpp=side * obj.mpp / IMAGE_PX) as reader:
            image = reader.patch(box, IMAGE_PX).astype(np.float32)
        # faded towards white, so the spots' colours stand out from the stain
        frame.image = (IMAGE_FADE * image + (1 - IMAGE_FADE) * 255).astype(np.uint8)
        frame.image_extent = (box[0], box[2], box[3], box[1])
    return frame


# ------------------------------------------------------------------------------------------------
# reading a run directory


@dataclass
class Prediction:
    """One ``predictions/<method>/<stem>.h5ad`` file."""

    method: str
    stem: str  # the file name without .h5ad: the slide, or "<slide>.fold<k>" when a slide is tested in several folds
    slide: str
    patient: str
    fold: int
    spot_ids: np.ndarray
    genes: np.ndarray
    pred: np.ndarray
    truth: Optional[np.ndarray]
    is_prompt: np.ndarray
    grid: np.ndarray
    pixel: np.ndarray
    mpp: Optional[float]


def read_prediction(path: Path) -> Prediction:
    """Read a prediction file written by :func:`stbench.results.write_prediction` (h5py only)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            index = obs.attrs["_index"]

            def strings(node):
                return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in node[()]])

            meta = {k: v[()] for k, v in f["uns/stbench"].items()} if "uns/stbench" in f else {}
            meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta.items()}
            mpp = float(meta.get("mpp", -1.0))
            return Prediction(
                method=str(meta.get("method", path.parent.name)), stem=path.stem,
                slide=str(meta.get("slide", path.stem.split(".fold")[0])), patient=str(meta.get("patient", "")),
                fold=int(meta.get("fold", -1)), spot_ids=strings(obs[index]), genes=strings(f["var"][f["var"].attrs["_index"]]),
                pred=np.asarray(f["X"][()], dtype=np.float64),
                truth=np.asarray(f["layers/truth"][()], dtype=np.float64) if "layers/truth" in f else None,
                is_prompt=np.asarray(obs["is_prompt"][()], dtype=bool) if "is_prompt" in obs else np.zeros(len(obs[index]), bool),
                grid=np.stack([obs["grid_x"][()], obs["grid_y"][()]], axis=1),
                pixel=np.stack([obs["pixel_x"][()], obs["pixel_y"][()]], axis=1).astype(np.float64),
                mpp=mpp if mpp > 0 else None,
            )
    except (OSError, KeyError) as exc:
        raise DataError(f"prediction file {path} cannot be read ({type(exc).__name__}: {exc}); "
                        "it is damaged or not written by stbench: rerun the method into this run directory") from None


@dataclass
class RunPictures:
    """What :func:`plot_run` wrote."""

    maps: list[Path]
    distribution: Path
    genes: list[str]


def plot_run(run_dir, out_dir=None, genes: Optional[Sequence[str]] = None, slides: Optional[Sequence[str]] = None,
             methods: Optional[Sequence[str]] = None, data_dir=None,
             progress=None) -> RunPictures:
    """Spot maps of every chosen test slide and the per-gene PCC distribution of a run directory.

    ``genes``: default the best and the worst gene by per-gene PCC (mean over the chosen methods that
    are not constant by design and over the test slides). ``data_dir``: where the dataset lives now,
    when it moved since the run (default: the run's ``data_dir``).
    """
    from stbench import config as cfg
    from stbench.data.expression import UNITS
    from stbench.metrics import per_gene_pcc

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); give a folder written by stbench run")
    config = cfg.build(cfg.RunConfig, cfg.read_yaml(run_dir / "config.yaml", "run config"), f"{run_dir / 'config.yaml'}")
    record = _read_json(run_dir / "run.json")
    constant = set(record.get("constant_predictors", []))
    files = sorted((run_dir / "predictions").glob("*/*.h5ad"))
    if config.prompt.ratios:  # a prompt-ratio sweep: the maps at the leaderboard's headline ratio
        ratios = sorted(float(r) for r in config.prompt.ratios)
        headline = float(config.prompt.ratio) if float(config.prompt.ratio) in ratios else ratios[-1]
        files = sorted((run_dir / "predictions").glob(f"*/ratio{headline:g}/*.h5ad"))
    if methods:
        known = sorted({p.parent.name for p in files})
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ConfigError(f"--methods: {', '.join(unknown)} has no predictions in {run_dir / 'predictions'}; "
                              f"choose from {', '.join(known) or '(none)'}")
        files = [p for p in files if p.parent.name in methods]
    if not files:
        raise DataError(f"{run_dir / 'predictions'} holds no prediction files (*/*.h5ad); "
                        "the run has not finished a fold yet: run it (again) first")
    by_stem: dict[str, dict[str, Prediction]] = {}
    for path in files:
        p = read_prediction(path)
        by_stem.setdefault(p.stem, {})[p.method] = p
    # --slides picks the maps; the default genes and the PCC distribution are the whole run's
    mapped = sorted(by_stem)
    if slides:
        mapped = [s for s in mapped if s in slides or s.split(".fold")[0] in slides]
        unknown = [s for s in slides if not any(k == s or k.split(".fold")[0] == s for k in by_stem)]
        if unknown:
            raise ConfigError(f"--slides: {', '.join(unknown)} not among the test slides of {run_dir}; "
                              f"choose from {', '.join(sorted(by_stem))}")

    dataset = _open_dataset(config, data_dir)
    sections: dict[str, object] = {}
    for stem, preds in by_stem.items():
        first = next(iter(preds.values()))
        for p in preds.values():
            if not (np.array_equal(p.spot_ids, first.spot_ids) and np.array_equal(p.genes, first.genes)):
                raise DataError(f"predictions of slide {stem} by {first.method} and {p.method} cover other spots or "
                                f"genes; they come from different runs: use one run directory per run")
        if stem in mapped or first.truth is None:
            sections[stem] = _section_for(first, dataset, config, run_dir)
        if first.truth is None:  # an older or external file: the truth as the run computed it
            truth = _truth_from_dataset(sections[stem], first, config, dataset)
            for p in preds.values():
                p.truth = truth

    # per-gene PCC on the scored (non-prompt) spots, as the run's headline metric
    scores: dict[str, dict[str, dict[str, float]]] = {}  # stem -> method -> gene -> r
    for stem, preds in by_stem.items():
        for method, p in preds.items():
            scored = ~p.is_prompt
            r = per_gene_pcc(p.pred[scored], p.truth[scored])
            if method in constant:
                r = np.full_like(r, np.nan)  # correlations have no meaning for it (the run says "undefined")
            scores.setdefault(stem, {})[method] = dict(zip(p.genes.tolist(), r.tolist()))
    method_names = sorted({m for preds in by_stem.values() for m in preds})
    per_gene = _mean_per_gene(scores, method_names)
    if genes:
        panel = set().union(*(set(p.genes.tolist()) for preds in by_stem.values() for p in preds.values()))
        unknown = [g for g in genes if g not in panel]
        if unknown:
            raise ConfigError(f"--genes: {', '.join(unknown)} not in the run's gene panel; "
                              f"choose from the panel (e.g. {', '.join(sorted(panel)[:5])}) or omit --genes for the best and worst genes")
        chosen_genes, chosen_note = list(dict.fromkeys(genes)), ""
    else:
        chosen_genes = default_genes({m: v for m, v in per_gene.items() if m not in constant} or per_gene)
        chosen_note = f"\ngenes: {chosen_genes[0]}, the best, and {chosen_genes[-1]}, the worst by mean per-gene PCC over the run"

    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    protocol = _protocol_line(config, record)
    units = UNITS.get(config.normalisation, config.normalisation)
    written = []
    for stem in mapped:
        preds = by_stem[stem]
        first = next(iter(preds.values()))
        present = [g for g in chosen_genes if g in set(first.genes.tolist())]
        if not present:
            warnings.warn(f"slide {stem}: none of the genes {', '.join(chosen_genes)} is in its fold's panel; no map", stacklevel=2)
            continue
        values = {MEASURED: first.truth}
        values.update({m: preds[m].pred for m in sorted(preds)})
        pcc = {m: scores[stem][m] for m in preds}
        slide_means = ", ".join(f"{m} {np.nanmean(list(scores[stem][m].values())):.3f}" if m not in constant else f"{m} undefined"
                                for m in sorted(preds))
        title = (f"{first.slide} (patient {first.patient}, test fold {first.fold}) · mean PCC over genes: {slide_means}\n"
                 f"{protocol}{chosen_note}")
        path = spot_maps(sections[stem], values, present, out_dir / "maps" / f"{stem}.png", title=title,
                         panel_genes=first.genes.tolist(), prompt_mask=first.is_prompt, pcc=pcc, units=units)
        written.append(path)
        if progress:
            progress(f"wrote {path}")
    dist_title = (f"per-gene PCC on non-prompt spots, each gene's mean over {len(by_stem)} test slide(s)\n{protocol}")
    distribution = pcc_distribution(per_gene, out_dir / "pcc_distribution.png", title=dist_title,
                                    undefined=sorted(constant & set(per_gene)))
    return RunPictures(written, distribution, chosen_genes)


def default_genes(per_gene: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The best and the worst gene by per-gene PCC, averaged over methods (genes without a defined
    PCC are left out); one gene when only one has a value."""
    genes = list(dict.fromkeys(g for scores in per_gene.values() for g in scores))
    table = np.array([[per_gene[m].get(g, np.nan) for g in genes] for m in per_gene], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: genes without a defined PCC
        mean = np.nanmean(table, axis=0) if len(table) else np.array([])
    order = [i for i in np.argsort(-mean, kind="stable") if np.isfinite(mean[i])]
    if not order:
        raise DataError("no gene has a defined PCC in this run (every gene is constant on the test slides); give --genes")
    return list(dict.fromkeys([genes[order[0]], genes[order[-1]]]))


def _mean_per_gene(scores, methods) -> dict[str, dict[str, float]]:
    """method -> gene -> mean PCC over the test slides (NaN slides left out)."""
    out = {}
    for method in methods:
        rows = [s[method] for s in scores.values() if method in s]
        genes = list(dict.fromkeys(g for row in rows for g in row))
        values = np.array([[row.get(g, np.nan) for g in genes] for row in rows], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a gene constant on every slide stays NaN
            out[method] = dict(zip(genes, np.nanmean(values, axis=0).tolist()))
    return out


def _protocol_line(config, record: dict) -> str:
    from stbench.data.expression import UNITS

    parts = [f"{config.benchmark}: {config.split} ({config.protocol_level} level)",
             f"prompts {config.prompt.ratio:.0%} {config.prompt.strategy}, seed {config.seed}",
             UNITS.get(config.normalisation, config.normalisation)]
    if config.finetune.enabled:
        parts.append("fine-tuned on the prompts")
    encoder = record.get("encoder")
    if encoder:
        parts.append(f"encoder {encoder.get('name')}")
    return " · ".join(parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _open_dataset(config, data_dir=None):
    """The run's dataset, opened from its resolved config (as :func:`stbench.run.resolve_plan` does), or
    None with a warning when it is not there any more (the maps are then drawn without the H&E)."""
    from stbench.datasets import open_dataset
    from stbench.plugins import get_plugins

    plugins = get_plugins()
    where = data_dir or config.data_dir
    try:
        return open_dataset(plugins, config.dataset, config.dataset_options, where, "the run's config key dataset")
    except StbenchError as exc:
        if data_dir:  # the user named the folder: that it does not work is an error
            raise
        warnings.warn(f"the maps are drawn without the H&E: dataset {config.dataset} cannot be opened ({exc}); "
                      "pass --data-dir DIR where it lives now", stacklevel=3)
        return None


def _section_for(p: Prediction, dataset, config, run_dir: Path):
    """The section of a prediction file, with its image, from the dataset; a stand-in built from the
    file's own coordinates (no image) when the dataset is not available or its spots differ."""
    from stbench.data.model import Section

    if dataset is not None:
        try:
            section = dataset.load_section(p.slide)
        except StbenchError as exc:
            warnings.warn(f"slide {p.slide}: drawn without the H&E ({exc})", stacklevel=3)
        else:
            if np.array_equal(np.asarray(section.spot_ids, dtype=str), p.spot_ids):
                return section
            warnings.warn(f"slide {p.slide}: the dataset's spots differ from those of the run in {run_dir} "
                          "(the data changed since); drawn without the H&E", stacklevel=3)
    return Section(name=p.slide, patient=p.patient, spot_ids=p.spot_ids, genes=p.genes, counts=None,
                   grid=p.grid, pixel=p.pixel, mpp=p.mpp, **_spot_size(p))


def _spot_size(p: Prediction) -> dict:
    """Spot pitch and diameter of a stand-in section, from its own coordinates: the median distance to
    the nearest spot, and half of it (legacy ST: 100 µm spots 200 µm apart; Visium 55 µm, 100 µm)."""
    from scipy.spatial import cKDTree

    if p.mpp is None or len(p.pixel) < 2:
        return {}
    distance, _ = cKDTree(p.pixel).query(p.pixel, k=2)
    pitch_um = float(np.median(distance[:, 1])) * p.mpp
    return {"spot_pitch_um": pitch_um, "spot_diameter_um": 0.5 * pitch_um} if pitch_um > 0 else {}


def _truth_from_dataset(section, p: Prediction, config, dataset) -> np.ndarray:
    """The truth of a prediction file that does not carry it: the dataset's counts restricted to the
    file's genes and normalised as the run did (:func:`stbench.data.expression.make_slide`)."""
    from stbench.data.expression import make_slide

    if dataset is None or getattr(section, "counts", None) is None:
        raise DataError(f"prediction file of slide {p.stem} holds no truth layer and dataset {config.dataset} cannot be "
                        "opened to read it; pass --data-dir DIR")
    return np.asarray(make_slide(section, p.genes.tolist(), config.normalisation).expr, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# the command


def add_plot_arguments(parser) -> None:
    """The options of ``stbench plot``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by stbench run")
    parser.add_argument("--genes", help="comma-separated genes to map (default: the best and the worst gene by per-gene PCC)")
    parser.add_argument("--slides", help="comma-separated test slides to map (default: every test slide)")
    parser.add_argument("--methods", help="comma-separated methods to show (default: every method of the run)")
    parser.add_argument("--data-dir", help="where the dataset lives now, if it moved since the run (for the H&E)")
    parser.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")


def _names(text: Optional[str]) -> Optional[list[str]]:
    if not text:
        return None
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip())) or None


def cmd_plot(args) -> int:
    """``stbench plot RUN_DIR``: write the pictures, print where they are."""
    pictures = plot_run(args.run_dir, args.out, genes=_names(args.genes), slides=_names(args.slides),
                        methods=_names(getattr(args, "methods", None)), data_dir=getattr(args, "data_dir", None))
    folder = pictures.distribution.parent
    print(f"stbench: genes {', '.join(pictures.genes)}; {len(pictures.maps)} slide map(s) in {folder / 'maps'}, "
          f"per-gene PCC in {pictures.distribution}")
    return 0
