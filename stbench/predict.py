"""``stbench predict``: a saved model (:mod:`stbench.models`) applied to slides it has never seen.

Where the spots come from:

* ``--dataset NAME --data-dir DIR [--slides A,B]``: sections of any dataset plugin. A section may have
  no counts (an H&E image and spot positions only); a section *with* counts is also scored, with the
  run's metrics code (:func:`stbench.run.score_slide`) and the run's prompt protocol;
* ``--image FILE --mpp M [--lattice hex|square]``: a plain H&E image; spots are laid on a lattice over
  the tissue (:mod:`stbench.lattice`) with the pitch and spot size of the model's dataset.

What is fed to the model is rebuilt from ``model.json``, never guessed: the gene panel and normalisation,
the encoder (its identity must match: the same name and weights hash), the patch sizes in µm and the
method's patches.

Prompts. A slide with measured counts gets the prompt spots the run would have chosen (the model's
strategy, ratio and seed), so the prediction and the scores are the run's own. Otherwise prompts come
from ``--prompts FILE`` (:func:`read_prompts`: raw counts, normalised here as the benchmark does). A
method that takes prompts as input (``MethodSpec.takes_prompts``) cannot predict a slide without them
and says so in one line.

Fine-tuning. A model saved by a run with ``--finetune`` is the fold's model *before* fine-tuning (the
run fine-tuned a copy per test slide). ``predict`` does what the run did: when the slide has prompt
spots, a copy of the model is fine-tuned on them with the run's settings before it predicts; a slide
without prompt spots is predicted by the model as saved. ``--no-finetune`` turns this off. Each file's
``uns['stbench']['finetuned']`` says which happened.

Outputs in ``--out``: ``<slide>.h5ad`` (X = predicted expression in the model's units, ``obs`` with spot
ids and grid/pixel coordinates and the prompt flags, ``var`` = the panel, layer ``truth`` when measured,
``uns['stbench']`` the provenance with the model file's SHA-256), ``metrics.csv`` for scored slides, and
``<slide>.png`` spot maps (:func:`stbench.plots.spot_maps`).
"""

from __future__ import annotations

import copy
import datetime as _dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from stbench import atomic
from stbench import config as cfg
from stbench import models
from stbench.errors import ConfigError, DataError

#: the --prompts file format, quoted in errors and help
PROMPTS_FORMAT = ("a CSV file with a 'spot' column of spot ids (and a 'slide' column when several slides are "
                  "predicted), then one column per gene of raw counts: every panel gene, and every measured gene "
                  "for library-size normalisations such as cpm_log1p")
#: genes drawn in the maps when --genes is not given
N_MAP_GENES = 2


@dataclass
class PredictRequest:
    """What ``stbench predict`` was asked to do (the command line, as data)."""

    model: Path
    out: Path
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    slides: Optional[Sequence[str]] = None
    image: Optional[Path] = None
    mpp: Optional[float] = None
    lattice: Optional[str] = None
    prompts: Optional[Path] = None
    device: Optional[str] = None
    encoder_weights: Optional[str] = None
    finetune: bool = True
    genes: Optional[Sequence[str]] = None
    maps: bool = True


@dataclass
class PredictedSlide:
    name: str
    path: Path
    n_spots: int
    n_prompt: int
    finetuned: bool
    #: the metrics row (results.csv columns) when the slide had measured counts
    row: Optional[dict] = None
    map_path: Optional[Path] = None


def check_request(request: PredictRequest) -> None:
    """One-line errors for contradictory or missing options, before anything is read."""
    if (request.dataset is None) == (request.image is None):
        raise ConfigError("give either --dataset NAME (sections of a dataset) or --image FILE (a plain H&E image), "
                          "not both or neither")
    if request.image is not None:
        if request.mpp is None:
            raise ConfigError("--image needs --mpp M, the image's microns per pixel (from the scanner's metadata, "
                              "e.g. 0.25 at 40x, 0.5 at 20x)")
        if request.data_dir or request.slides:
            raise ConfigError("--data-dir and --slides go with --dataset, not with --image")
    elif request.mpp is not None or request.lattice is not None:
        raise ConfigError("--mpp and --lattice go with --image; a dataset's sections carry their own scale and lattice")
    from stbench.run import check_out_dir

    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; give a folder for the predictions")
    check_out_dir(out)


# ------------------------------------------------------------------------------------------------
# inputs


def _geometry(record: dict, request: PredictRequest) -> tuple[str, float, float]:
    """Lattice, pitch and spot diameter (µm) of the spots laid over a plain image: the model's dataset's."""
    geometry = record.get("geometry") or {}
    lattice = request.lattice or geometry.get("lattice")
    pitch = geometry.get("spot_pitch_um")
    if isinstance(lattice, list) or lattice is None:
        raise ConfigError(f"the model was trained on sections of several lattices ({lattice}); choose one with "
                          "--lattice hex|square")
    if isinstance(pitch, list):
        pitch = min(pitch)
        warnings.warn(f"the model's sections have several spot pitches; laying spots {pitch:g} µm apart", stacklevel=3)
    if pitch is None:
        raise DataError(f"{request.model}: model.json records no spot pitch; save the model again")
    diameter = float(geometry.get("spot_diameter_um") or pitch / 2)
    return str(lattice), float(pitch), diameter


def _open_sections(request: PredictRequest, record: dict, plugins, needs_images: bool) -> tuple[str, list]:
    """(cache namespace, sections to predict)."""
    if request.image is not None:
        from stbench.lattice import spots_on_tissue

        lattice, pitch, diameter = _geometry(record, request)
        return "image", [spots_on_tissue(Path(request.image), float(request.mpp), pitch, diameter, lattice)]
    from stbench.benchmark import resolve_config
    from stbench.data.checks import load_checked
    from stbench.datasets import open_dataset

    conf, _ = resolve_config(request.dataset, None, None, {"data_dir": request.data_dir} if request.data_dir else None)
    options = conf.dataset_options
    if not options and conf.dataset == (record.get("dataset") or {}).get("name"):
        options = record["dataset"].get("options") or {}  # the model's own dataset, as the run generated it
    dataset = open_dataset(plugins, conf.dataset, options, conf.data_dir)
    infos = {i.name: i for i in dataset.sections()}
    if request.slides:
        unknown = [s for s in request.slides if s not in infos]
        if unknown:
            raise ConfigError(f"--slides names {', '.join(unknown)}, not sections of dataset {conf.dataset} "
                              f"(it has {', '.join(list(infos)[:12])}{' ...' if len(infos) > 12 else ''})")
        chosen = [infos[s] for s in request.slides]
        no_image = [i.name for i in chosen if needs_images and not i.has_image]
        if no_image:
            raise DataError(f"method {record['method']} predicts from the H&E image, and section(s) {', '.join(no_image)} "
                            f"of dataset {conf.dataset} have none; add the image or leave them out of --slides")
    else:
        chosen = [i for i in infos.values() if i.has_image or not needs_images]
        if not chosen:
            raise DataError(f"method {record['method']} predicts from the H&E image, and no section of dataset "
                            f"{conf.dataset} has one")
    return conf.dataset, [load_checked(dataset, i.name) for i in chosen]


def read_prompts(path: Path, sections: dict, genes: Sequence[str], normalisation: str) -> dict:
    """``--prompts FILE`` (:data:`PROMPTS_FORMAT`) → ``{slide: (prompt indices, normalised panel expression)}``.

    The raw counts are normalised as the benchmark does (``normalisation`` over the file's genes), so the
    model receives prompts in the units it was trained on. Indices are sorted, as a run's prompts are.
    """
    import pandas as pd
    import scipy.sparse as sp

    from stbench.data.expression import normaliser

    path = Path(path)
    where = f"prompts file {path} (option --prompts)"
    if not path.is_file():
        raise DataError(f"{where} not found; give {PROMPTS_FORMAT}")
    try:
        df = pd.read_csv(path, dtype={"spot": str, "slide": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{where} cannot be read as CSV ({str(exc).splitlines()[0]}); give {PROMPTS_FORMAT}") from None
    if "spot" not in df.columns:
        raise DataError(f"{where} has no 'spot' column (found {', '.join(map(str, df.columns[:6]))}); give {PROMPTS_FORMAT}")
    gene_cols = [str(c) for c in df.columns if c not in ("spot", "slide")]
    missing = [g for g in genes if g not in set(gene_cols)]
    if missing:
        raise DataError(f"{where} lacks {len(missing)} of the model's {len(genes)} panel genes (e.g. "
                        f"{', '.join(missing[:5])}); give raw counts of every panel gene")
    values = df[gene_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(f"{where}: gene {gene_cols[j]} of spot {df['spot'].iloc[i]!r} (line {i + 2}) is "
                        f"{df[gene_cols[j]].iloc[i]!r}, not a raw count; counts must be non-negative integers")
    if "slide" in df.columns:
        slide_of = df["slide"].astype(str).to_numpy()
    elif len(sections) == 1:
        slide_of = np.full(len(df), next(iter(sections)))
    else:
        raise DataError(f"{where} has no 'slide' column but {len(sections)} slides are predicted; add a 'slide' "
                        "column or predict one slide (--slides NAME)")
    unknown = sorted(set(slide_of) - set(sections))
    if unknown:
        raise DataError(f"{where} names slide(s) {', '.join(unknown[:5])} that are not predicted here "
                        f"({', '.join(sections)})")
    column = {g: i for i, g in enumerate(gene_cols)}
    expr_all = normaliser(normalisation)(sp.csr_matrix(values), np.array([column[g] for g in genes]))
    out = {}
    for name in dict.fromkeys(slide_of):
        rows = np.flatnonzero(slide_of == name)
        index = {str(s): i for i, s in enumerate(sections[name].spot_ids)}
        ids = df["spot"].astype(str).to_numpy()[rows]
        lost = [s for s in ids if s not in index]
        if lost:
            raise DataError(f"{where}: {len(lost)} spot id(s) of slide {name} are not spots of that slide (e.g. "
                            f"{', '.join(lost[:3])}); use the slide's spot ids")
        idx = np.array([index[s] for s in ids], dtype=np.int64)
        if len(set(idx.tolist())) != len(idx):
            raise DataError(f"{where}: a spot of slide {name} is listed twice; give each prompt spot once")
        order = np.argsort(idx)
        out[name] = (idx[order], expr_all[rows][order].astype(np.float32))
    return out


# ------------------------------------------------------------------------------------------------
# the prediction


def predict(request: PredictRequest, plugins, progress: Optional[Callable[[str], None]] = None) -> list[PredictedSlide]:
    """Predict every requested slide with the saved model; write the outputs; return what was written."""
    from stbench.data.expression import make_slide
    from stbench.data.model import Slide
    from stbench.method import FinetuneSettings
    from stbench.paths import cache_dir
    from stbench.prompts import select_prompts
    from stbench.run import IMAGE_NEEDS, _seed_everything, checked_prediction, feature_specs, pick_device, score_slide, \
        slide_features
    from stbench.specs import resolve

    say = progress or (lambda message: None)
    check_request(request)
    record = models.read_record(Path(request.model))
    spec = plugins.methods.get(record["method"], f"the model in {request.model}")
    method_config = cfg.build(spec.config, record["config"], f"{request.model}: config")
    needs = spec.needs_for(method_config)
    images = cfg.build(cfg.ImageConfig, record.get("images") or {}, f"{request.model}: images")
    genes = [str(g) for g in record["genes"]]
    normalisation = record["normalisation"]
    if request.genes:
        map_genes(genes, np.zeros((1, len(genes))), None, np.ones(1, bool), request.genes)  # unknown genes: fail now

    # the encoder the model's features came from: rebuilt, then compared with the model's record
    encoder, identity = None, None
    specs = feature_specs(images, needs)
    if specs:
        saved = record.get("encoder") or {}
        name = saved.get("registry_name") or images.encoder
        plugins.encoders.get(name, f"the encoder of the model in {request.model}")
        encoder = plugins.encoders.load(name)(request.encoder_weights or images.encoder_weights)
        identity = models.encoder_identity(encoder, name)
    resolve(spec.factory)  # imports the method's module (and torch for torch methods) before the device is chosen
    device = pick_device(request.device)
    loaded = models.load(Path(request.model), plugins, device=device, genes=genes, normalisation=normalisation,
                         encoder=identity)
    method = loaded.method

    namespace, sections = _open_sections(request, record, plugins, bool(IMAGE_NEEDS & needs))
    by_name = {s.name: s for s in sections}
    file_prompts = read_prompts(request.prompts, by_name, genes, normalisation) if request.prompts else {}
    protocol = record.get("protocol") or {}
    prompt_conf = cfg.build(cfg.PromptConfig, protocol.get("prompt") or {}, f"{request.model}: protocol.prompt")
    tune_conf = cfg.build(cfg.FinetuneConfig, protocol.get("finetune") or {}, f"{request.model}: protocol.finetune")
    seed = int(protocol.get("seed", 0))
    may_finetune = (request.finetune and tune_conf.enabled and spec.finetune and type(method).supports_finetune())
    metric_specs = [plugins.metrics.get(m) for m in protocol.get("metrics") or []]
    strategy = plugins.prompts.load(prompt_conf.strategy, "func")

    feature_store = patch_store = None
    if specs:
        from stbench.images.features import FeatureStore

        feature_store = FeatureStore(encoder, identity["registry_name"], namespace, cache_dir(),
                                     min_inside=images.min_inside, progress=say)
    requests = spec.patches_for(method_config)
    if requests:
        from stbench.images.patches import PatchStore

        patch_store = PatchStore(cache_dir(), namespace, min_inside=images.min_inside, progress=say)

    out_dir = Path(request.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[PredictedSlide] = []
    rows = []
    for section in sections:
        measured = section.has_counts
        if measured:
            have = section.gene_index
            lacking = [g for g in genes if g not in have]
            if lacking:
                warnings.warn(f"section {section.name} lacks {len(lacking)} of the model's panel genes (e.g. "
                              f"{', '.join(lacking[:3])}): predicted, not scored", stacklevel=2)
                measured = False
        niche = "niche_expression" in needs
        full = make_slide(section, genes, normalisation, niche=niche) if measured else None
        if section.name in file_prompts:
            idx, prompt_expr = file_prompts[section.name]
            slide, prompts_from = Slide.unmeasured(section, genes, idx, prompt_expr, niche=niche), f"file {request.prompts}"
        elif measured:  # the run's own prompts: same strategy, ratio, seed and slide name
            idx = select_prompts(strategy, section.positions_um(), prompt_conf.ratio, section.name, seed)
            slide = full.masked(idx)
            prompts_from = (f"measured, chosen as the run chose them ({prompt_conf.strategy}, ratio {prompt_conf.ratio}, "
                            f"seed {seed})")
        else:
            if spec.takes_prompts:
                raise ConfigError(f"method {record['method']} predicts a slide from its prompt spots, and slide "
                                  f"{section.name} has none measured: pass --prompts FILE, {PROMPTS_FORMAT}")
            slide, prompts_from = Slide.unmeasured(section, genes, niche=niche), "none"
        if feature_store is not None:
            slide.features = slide_features(feature_store.get(section, specs))
        if patch_store is not None:
            slide.patches = patch_store.get(section, requests)

        model = method
        finetuned = bool(may_finetune and slide.prompt_idx is not None and len(slide.prompt_idx))
        if finetuned:
            say(f"{section.name}: fine-tuning a copy of the model on its {len(slide.prompt_idx)} prompt spots "
                f"({tune_conf.epochs} epochs), as the run did")
            model = copy.deepcopy(method)
            _seed_everything(seed)
            model.finetune(slide, FinetuneSettings(epochs=tune_conf.epochs, lr=tune_conf.lr, seed=seed))
        elif may_finetune:
            say(f"{section.name}: no prompt spots, so the model predicts it as saved (the run fine-tuned on prompts)")
        pred = checked_prediction(model.predict(slide), record["method"], slide).astype(np.float32)
        is_prompt = slide.prompt_mask()
        row = None
        if measured:
            row = {"method": record["method"], "model": str(request.model), "slide": section.name,
                   "patient": section.patient, "n_spots": slide.n_spots, "n_prompt": int(is_prompt.sum()),
                   "n_scored": int((~is_prompt).sum()), "finetuned": finetuned}
            row.update(score_slide(plugins, spec, metric_specs, pred, full.expr, is_prompt))
            rows.append(row)
        path = out_dir / f"{section.name}.h5ad"
        uns = _provenance(loaded, request, section, finetuned, prompts_from, namespace)
        write_predicted(path, slide, pred, is_prompt, full.expr if measured else None, uns)
        result = PredictedSlide(section.name, path, slide.n_spots, int(is_prompt.sum()), finetuned, row)
        if request.maps:
            result.map_path = _draw(slide, pred, full.expr if measured else None, is_prompt, loaded, request, out_dir)
        say(f"{section.name}: {slide.n_spots} spots predicted -> {path}")
        done.append(result)
    if rows:
        from stbench.results import ID_COLUMNS, csv_text

        atomic.write_text(out_dir / "metrics.csv", csv_text(rows, ID_COLUMNS))
    return done


def _provenance(loaded: models.LoadedModel, request: PredictRequest, section, finetuned: bool, prompts: str,
                namespace: str) -> dict:
    import stbench
    from stbench.run import git_revision

    record = loaded.record
    encoder = record.get("encoder") or {}
    spots = "the dataset's spots" if request.image is None else (
        f"a {section.lattice} lattice {section.spot_pitch_um:g} µm apart over the tissue (stbench.lattice)")
    return {"stbench": {
        "method": record["method"], "slide": section.name, "patient": section.patient,
        "units": record.get("units", ""), "normalisation": record["normalisation"],
        "mpp": float(section.mpp) if section.mpp is not None else -1.0,
        "source": str(request.image) if request.image is not None else f"dataset {namespace}",
        "spots": spots, "prompts": prompts, "finetuned": bool(finetuned),
        "model": str(Path(loaded.directory).resolve()), "model_sha256": loaded.sha256,
        "model_scope": record.get("scope", ""), "model_fold": -1 if record.get("fold") is None else int(record["fold"]),
        "model_description": record.get("description", ""),
        "trained_on": list((record.get("sections") or {}).get("train", [])),
        "validated_on": list((record.get("sections") or {}).get("val", [])),
        "model_dataset": (record.get("dataset") or {}).get("name", ""),
        "encoder": encoder.get("name", "none"), "encoder_weights_id": encoder.get("weights_id", "none"),
        "stbench_version": stbench.__version__, "stbench_git": git_revision() or "",
        "predicted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }}


def write_predicted(path: Path, slide, pred: np.ndarray, is_prompt: np.ndarray, truth: Optional[np.ndarray],
                    uns: dict) -> None:
    """One slide's prediction as AnnData (X = prediction; layer ``truth`` when measured), atomically."""
    from stbench.h5ad import write_h5ad

    spot_ids = np.asarray(slide.spot_ids, dtype=str)
    obs = {"spot_id": spot_ids, "grid_x": np.asarray(slide.grid[:, 0]), "grid_y": np.asarray(slide.grid[:, 1]),
           "pixel_x": np.asarray(slide.pixel[:, 0], dtype=np.float64),
           "pixel_y": np.asarray(slide.pixel[:, 1], dtype=np.float64), "is_prompt": np.asarray(is_prompt, dtype=bool)}
    layers = {"truth": np.asarray(truth, dtype=np.float32)} if truth is not None else {}
    with atomic.atomic_path(path) as tmp:
        write_h5ad(tmp, np.asarray(pred, dtype=np.float32), spot_ids, obs, np.asarray(slide.genes, dtype=str),
                   layers=layers, obsm={"spatial": np.asarray(slide.pixel, dtype=np.float64)}, uns=uns,
                   obs_index_name="spot", var_index_name="gene")


def per_gene_pcc(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """PCC of every gene over the given spots; NaN where either side is constant."""
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    denominator = np.sqrt((p ** 2).sum(0) * (t ** 2).sum(0))
    return np.divide((p * t).sum(0), denominator, out=np.full(pred.shape[1], np.nan), where=denominator > 0)


def map_genes(genes: Sequence[str], pred: np.ndarray, truth: Optional[np.ndarray], scored: np.ndarray,
              chosen: Optional[Sequence[str]] = None) -> list[str]:
    """The genes drawn: ``chosen``; else, on a measured slide, the best and the worst by PCC (as ``stbench
    plot``); else the :data:`N_MAP_GENES` genes whose prediction varies most across the slide."""
    genes = [str(g) for g in genes]
    if chosen:
        unknown = [g for g in chosen if g not in genes]
        if unknown:
            raise ConfigError(f"--genes names {', '.join(unknown)}, not in the model's {len(genes)}-gene panel")
        return list(chosen)
    if truth is not None and scored.sum() > 2:
        r = per_gene_pcc(pred[scored].astype(np.float64), truth[scored].astype(np.float64))
        order = [i for i in np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable") if np.isfinite(r[i])]
        if order:
            return list(dict.fromkeys([genes[order[0]], genes[order[-1]]]))
    spread = pred.std(0)
    return [genes[i] for i in np.argsort(-spread, kind="stable")[:N_MAP_GENES]]


def _draw(slide, pred, truth, is_prompt, loaded: models.LoadedModel, request: PredictRequest,
          out_dir: Path) -> Optional[Path]:
    """Spot maps of the prediction (and the measurement) over the H&E, with stbench.plots' function."""
    try:
        from stbench.plots import spot_maps
    except ImportError:  # the plotting module is optional for predictions
        return None
    genes = map_genes(slide.genes, pred, truth, ~is_prompt, request.genes)
    values = {"measured": truth} if truth is not None else {}
    values[loaded.name] = pred
    pcc = None
    if truth is not None:
        r = per_gene_pcc(pred[~is_prompt].astype(np.float64), truth[~is_prompt].astype(np.float64))
        pcc = {loaded.name: {g: float(v) for g, v in zip(map(str, slide.genes), r)}}
    scope = "all sections" if loaded.record.get("scope") == "all" else f"fold {loaded.record.get('fold')}"
    title = f"{slide.name}: {loaded.name} ({scope} model of {(loaded.record.get('dataset') or {}).get('benchmark', '')})"
    return spot_maps(slide, values, genes, out_dir / f"{slide.name}.png", title=title, panel_genes=list(slide.genes),
                     prompt_mask=is_prompt, pcc=pcc, units=loaded.record.get("units", ""))
