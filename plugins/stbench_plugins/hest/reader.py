"""Reader for samples in the HEST-1k layout (Jaume et al., HEST-1k, NeurIPS 2024; mahmoodlab/HEST).

Layout of the data directory (``--data-dir DIR`` or ``$STBENCH_DATA/hest``), as HEST-1k is downloaded
from huggingface.co/datasets/MahmoodLab/hest::

    st/<id>.h5ad          AnnData: raw counts in X (spots x genes), obs columns pxl_col_in_fullres,
                          pxl_row_in_fullres (spot centre in full-resolution pixels; obsm["spatial"] =
                          (x, y) when the two are absent), array_row, array_col (the grid; without both,
                          it is derived from the centres, the lattice's pitch and the pixel size), and
                          optionally in_tissue (only spots with 1 are read)
    wsis/<id>.tif         the full-resolution H&E, a pyramidal TIFF (read region by region through
                          OpenSlide); optional: a sample without it has no image
    metadata/<id>.json    pixel_size_um_estimated / pixel_size_um_embedded (µm per full-resolution
                          pixel), st_technology, patient, organ, dataset_title, ...

Every sample with an ``st/<id>.h5ad`` is a section unless ``dataset_options`` select some (by ``ids``
or by metadata values, ``where``). Technology: ``Spatial Transcriptomics`` (legacy ST: square lattice,
100 µm spots 200 µm apart) and ``Visium`` (hex lattice, 55 µm spots 100 µm apart) are read; Visium HD,
Xenium and any other technology are refused by name, before anything runs. Grid = (array_col,
array_row) (Visium's doubled column numbering is stbench's hex convention); pixel = (pxl_col_in_fullres,
pxl_row_in_fullres).

On the square lattice the grid is oriented to the image: HEST built its her2st samples with
``array_row`` from the spot name's x and ``array_col`` from its y (mahmoodlab/HEST custom_readers
``align_her2``), the transpose of Visium's convention, so when the array axes run across the image's
(fitted from the spots), the two columns are swapped back and ``qc[sample]["grid_transposed"]`` says so.
Spot ids are the ``obs_names``.

Patients come from the metadata's ``patient``; a sample without one is its own patient (a warning
says so). HEST numbers patients per study ("Patient 1" exists in many), so when the selected samples
come from several studies (``dataset_title``) each patient is named "<dataset_title> / <patient>":
two studies' "Patient 1" are never merged into one patient, nor split across train and test as one.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.data.layouts import (LATTICE_GEOMETRY, examples, fail, grid_from_pixels, integer_counts,
                                  merge_duplicate_genes, mpp_from_lattice, natural_key)
from stbench.data.model import Dataset, Section, SectionInfo
from stbench.errors import DataError
from stbench.paths import DATA_ENV, default_data_dir

NAME = "hest"
FOLDER = "hest"
SOURCE = "huggingface.co/datasets/MahmoodLab/hest"
#: st_technology (lower case) -> lattice; everything else is refused by name
LATTICES = {"spatial transcriptomics": "square", "visium": "hex"}
READ_TECHNOLOGIES = "'Spatial Transcriptomics' (legacy ST) and 'Visium'"
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")  # HEST's own order of preference
TECHNOLOGY_KEY, PATIENT_KEY, STUDY_KEY = "st_technology", "patient", "dataset_title"
ARRAY_COLUMNS = ("array_row", "array_col")
PIXEL_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")  # x, y
#: image files tried for wsis/<id>, in order (HEST ships .tif)
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".jpg", ".jpeg", ".png")
#: pixel sizes further apart than this are reported: embedded vs estimated, and the one used vs the one
#: measured from the spot pitch (HEST issues #106, #123: the pixel size depends on where it is read)
PIXEL_SIZE_DISAGREEMENT = 0.10


def open_hest(data_dir: Optional[Path] = None, options=None) -> "HestDataset":
    """Open a HEST-1k data directory (``data_dir``, else ``$STBENCH_DATA/hest`` or the user cache)."""
    from stbench_plugins.hest import HestOptions

    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not _has_layout(root) and _has_layout(root / FOLDER):
            root = root / FOLDER  # the parent folder that holds one folder per dataset
        tried = [str(root)]
    else:
        root, tried = default_data_dir(FOLDER)
    if not _has_layout(root):
        state = "not found" if not root.is_dir() else "incomplete"
        raise DataError(f"hest data directory {state}: {', '.join(tried)} (expected st/<id>.h5ad and metadata/<id>.json, "
                        f"as downloaded from {SOURCE}); pass --data-dir DIR or set ${DATA_ENV} so that "
                        f"${DATA_ENV}/{FOLDER} exists")
    return HestDataset(root, options if options is not None else HestOptions())


def _has_layout(root: Path) -> bool:
    return (root / "st").is_dir() and (root / "metadata").is_dir()


def _text(value) -> str:
    """A metadata value as stripped text; '' for missing values (None, NaN, blanks)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in ("nan", "none", "null") else text


class HestDataset(Dataset):
    """The selected HEST samples of one data directory; see the module docstring for the layout."""

    name = NAME
    description = "HEST-1k samples (legacy ST and Visium)"

    def __init__(self, root: Path, options):
        self.root = Path(root)
        self.options = options
        #: per loaded sample: spots dropped outside the tissue, merged symbols, both pixel sizes
        self.qc: dict[str, dict] = {}
        self.metadata = self._select()
        self.patients = self._patients()
        self.lattices = {sample: self._lattice(sample, meta) for sample, meta in self.metadata.items()}

    # -- files ----------------------------------------------------------------------------------------
    def st_path(self, sample: str) -> Path:
        return self.root / "st" / f"{sample}.h5ad"

    def metadata_path(self, sample: str) -> Path:
        return self.root / "metadata" / f"{sample}.json"

    def image_path(self, sample: str) -> Optional[Path]:
        return next((p for p in (self.root / "wsis" / f"{sample}{s}" for s in IMAGE_SUFFIXES) if p.is_file()), None)

    def _read_metadata(self, sample: str) -> dict:
        path = self.metadata_path(sample)
        if not path.is_file():
            raise fail(NAME, path, f"metadata of sample {sample!r} not found (it holds the pixel size and technology)",
                       f"download metadata/{sample}.json with the sample from {SOURCE}")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise fail(NAME, path, f"cannot read the JSON ({type(e).__name__}: {e})",
                       f"download metadata/{sample}.json again from {SOURCE}") from None
        if not isinstance(meta, dict):
            raise fail(NAME, path, f"the JSON holds a {type(meta).__name__}, not an object of metadata fields",
                       f"download metadata/{sample}.json again from {SOURCE}")
        return meta

    # -- selection ------------------------------------------------------------------------------------
    def _select(self) -> dict[str, dict]:
        """The metadata of the selected samples, by id, in the order asked (ids) or natural order."""
        available = sorted((p.stem for p in (self.root / "st").glob("*.h5ad")), key=natural_key)
        wanted = self.options.ids or available
        missing = [s for s in wanted if not self.st_path(s).is_file()]
        if missing:
            shown = ", ".join(available[:6]) + (" ..." if len(available) > 6 else "") if available else "none"
            raise fail(NAME, self.st_path(missing[0]), f"expression of sample(s) {', '.join(missing)} not found "
                       f"(samples in st/: {shown})", f"download st/<id>.h5ad from {SOURCE}, or fix dataset_options.ids")
        metadata = {s: self._read_metadata(s) for s in wanted}
        where = self.options.where
        if where:
            for key in where:
                if not any(key in meta for meta in metadata.values()):
                    keys = sorted({k for meta in metadata.values() for k in meta})
                    raise DataError(f"{NAME}: dataset_options.where.{key}: no sample's metadata has a field {key!r} "
                                    f"(fields: {', '.join(keys[:25])}); use one of those names")
            metadata = {s: m for s, m in metadata.items() if all(_matches(m.get(k), v) for k, v in where.items())}
            if not metadata:
                asked = ", ".join(f"{k}={v!r}" for k, v in where.items())
                raise DataError(f"{NAME}: no sample of {self.root} has metadata {asked} among the {len(wanted)} "
                                "sample(s) considered; check the values in metadata/<id>.json")
        if not metadata:
            raise fail(NAME, self.root / "st", "no sample (no .h5ad file)", f"download samples from {SOURCE}")
        return metadata

    def _lattice(self, sample: str, meta: dict) -> str:
        technology = _text(meta.get(TECHNOLOGY_KEY))
        path = self.metadata_path(sample)
        if not technology:
            raise fail(NAME, path, f"no {TECHNOLOGY_KEY} for sample {sample!r}, so its spot lattice is unknown",
                       f'add "{TECHNOLOGY_KEY}": "Visium" or "Spatial Transcriptomics" to the JSON')
        if technology.lower() not in LATTICES:
            raise fail(NAME, path, f"sample {sample!r} is {technology} data, which stbench does not read "
                       f"(it reads {READ_TECHNOLOGIES} spots)",
                       "leave it out with dataset_options.ids, or keep the readable ones with "
                       "dataset_options.where.st_technology=[Visium,'Spatial Transcriptomics']")
        return LATTICES[technology.lower()]

    def _patients(self) -> dict[str, str]:
        """Patient of each sample; study-qualified when the samples come from several studies."""
        studies = {_text(m.get(STUDY_KEY)) for m in self.metadata.values()}
        without = [s for s, m in self.metadata.items() if not _text(m.get(PATIENT_KEY))]
        if without:
            warnings.warn(f"{NAME}: no {PATIENT_KEY} in the metadata of {len(without)} sample(s) ({examples(without)}); "
                          "each is taken as its own patient, so no split can keep its sections together with "
                          f"another's; add \"{PATIENT_KEY}\" to metadata/<id>.json where samples share a patient",
                          stacklevel=3)
        patients = {}
        for sample, meta in self.metadata.items():
            patient = _text(meta.get(PATIENT_KEY)) or sample
            if len(studies) > 1 and patient != sample:
                patient = f"{_text(meta.get(STUDY_KEY)) or 'unnamed study'} / {patient}"
            patients[sample] = patient
        return patients

    def sections(self) -> list[SectionInfo]:
        return [SectionInfo(name=s, patient=self.patients[s], has_image=self.image_path(s) is not None)
                for s in self.metadata]

    # -- one sample -----------------------------------------------------------------------------------
    def pixel_size(self, sample: str) -> float:
        """µm per full-resolution pixel from the metadata (``pixel_size_key``, else estimated, else embedded)."""
        meta, path = self.metadata[sample], self.metadata_path(sample)
        keys = (self.options.pixel_size_key,) if self.options.pixel_size_key else PIXEL_SIZE_KEYS
        values = {}
        for key in PIXEL_SIZE_KEYS + tuple(k for k in keys if k not in PIXEL_SIZE_KEYS):
            try:
                value = float(meta.get(key))
            except (TypeError, ValueError):
                continue
            if math.isfinite(value) and value > 0:
                values[key] = value
        chosen = next((values[k] for k in keys if k in values), None)
        if chosen is None:
            raise fail(NAME, path, f"unknown pixel size: sample {sample!r} has no positive {' or '.join(keys)}",
                       f'add "{keys[0]}": <µm per full-resolution pixel> to the JSON')
        if len({PIXEL_SIZE_KEYS[0], PIXEL_SIZE_KEYS[1]} & set(values)) == 2:
            a, b = values[PIXEL_SIZE_KEYS[0]], values[PIXEL_SIZE_KEYS[1]]
            if abs(a - b) > PIXEL_SIZE_DISAGREEMENT * min(a, b):
                warnings.warn(f"{NAME}: {path}: pixel_size_um_estimated {a:.4g} and pixel_size_um_embedded {b:.4g} µm/px "
                              f"disagree by {abs(a - b) / min(a, b):.0%}; using {chosen:.4g} (choose with "
                              "dataset_options.pixel_size_key) and check the overview picture of stbench data check",
                              stacklevel=3)
        return chosen

    def load_section(self, name: str) -> Section:
        if name not in self.metadata:
            raise DataError(f"{NAME}: sample {name!r} is not among the selected samples of {self.root} "
                            f"({', '.join(list(self.metadata)[:10])}{' ...' if len(self.metadata) > 10 else ''})")
        path, lattice = self.st_path(name), self.lattices[name]
        mpp = self.pixel_size(name)
        spots = read_st(path)
        derived = spots["grid"] is None
        if derived:  # no array columns: the lattice positions from the centres, the pitch and the scale
            spots["grid"] = grid_from_pixels(NAME, path, spots["pixel"], mpp, lattice)
        transposed = lattice == "square" and _axes_crossed(spots["grid"], spots["pixel"])
        if transposed:
            spots["grid"] = spots["grid"][:, ::-1].copy()
        image = self.image_path(name)
        diameter, pitch = LATTICE_GEOMETRY[lattice]
        section = Section(
            name=name,
            patient=self.patients[name],
            spot_ids=spots["spot_ids"],
            genes=spots["genes"],
            counts=spots["counts"],
            grid=spots["grid"],
            pixel=spots["pixel"],
            mpp=mpp,
            lattice=lattice,
            spot_diameter_um=diameter,
            spot_pitch_um=pitch,
            image_path=image,
            source_files=tuple(p for p in (path, self.metadata_path(name), image) if p is not None),
        )
        if image is not None:
            _check_inside(section, path)
        measured = mpp_from_lattice(section.grid, section.pixel, lattice)  # circular when the grid is derived
        if not derived and measured is not None and abs(measured / mpp - 1) > PIXEL_SIZE_DISAGREEMENT:
            warnings.warn(f"{NAME}: sample {name!r}: the pixel size {mpp:.4g} µm/px of {self.metadata_path(name).name} "
                          f"differs from the {measured:.4g} µm/px measured from its {pitch:g} µm spot pitch; check "
                          "the metadata (dataset_options.pixel_size_key) and the overview picture of stbench data check",
                          stacklevel=2)
        self.qc[name] = {"n_out_of_tissue": spots["n_out_of_tissue"], "n_merged_symbols": spots["n_merged"],
                         "mpp_measured": None if derived else measured, "grid_derived": derived,
                         "grid_transposed": bool(transposed),
                         **{k: self.metadata[name][k] for k in PIXEL_SIZE_KEYS if k in self.metadata[name]}}
        return section


def _matches(value, wanted) -> bool:
    """A metadata value equals the wanted value, or one of a list of them, as case-insensitive text."""
    options = wanted if isinstance(wanted, list) else [wanted]
    return _text(value).lower() in {_text(w).lower() for w in options}


def _axes_crossed(grid: np.ndarray, pixel: np.ndarray) -> bool:
    """True when the array's first axis runs along the image's y and its second along x (an affine fit
    of pixel centres on array positions); False when they follow the image or the spots are too few."""
    if len(grid) < 3:
        return False
    design = np.column_stack([grid.astype(np.float64), np.ones(len(grid))])
    coef, _, rank, _ = np.linalg.lstsq(design, pixel, rcond=None)
    if rank < 3:
        return False
    along = abs(coef[0, 0]) + abs(coef[1, 1])  # d pixel_x / d grid_x and d pixel_y / d grid_y
    across = abs(coef[0, 1]) + abs(coef[1, 0])
    return bool(across > along)


def _check_inside(section: Section, st_path: Path) -> None:
    """Refuse spot centres outside the image: a wrong image, or coordinates of a downscaled copy."""
    from stbench.images.region import image_size

    width, height = image_size(section)
    x, y = section.pixel[:, 0], section.pixel[:, 1]
    outside = ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise fail(NAME, st_path, f"{int(outside.sum())} spot centre(s) lie outside the {width} x {height} px image "
                   f"{section.image_path}, e.g. spot {str(section.spot_ids[i])!r} at x={x[i]:g}, y={y[i]:g}",
                   "pxl_col_in_fullres/pxl_row_in_fullres must be pixels of wsis/<id> at full resolution "
                   "(not of a downscaled copy); use the WSI and .h5ad of the same HEST sample")


def read_st(path: Path) -> dict:
    """Spot ids, genes, integer CSR counts, grid (x = array_col, y = array_row; None without array
    columns) and pixel (x, y) of the in-tissue spots of one HEST ``.h5ad``, each checked; plus the counts
    of spots dropped and symbols merged."""
    import anndata

    fix = f"use the st/<id>.h5ad of the HEST sample ({SOURCE}): raw counts in X, spot positions in obs"
    try:
        with warnings.catch_warnings():
            # duplicated gene symbols are summed below, so anndata's advice to rename them is moot
            warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
            adata = anndata.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - h5py, anndata and pandas raise many types for a damaged file
        raise fail(NAME, path, f"cannot read the .h5ad ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                   fix) from None
    obs = adata.obs
    array = [c for c in ARRAY_COLUMNS if c in obs.columns]  # neither: derived from the pixels by the caller
    missing = [c for c in ARRAY_COLUMNS if c not in obs.columns] if array else []
    has_pixels = all(c in obs.columns for c in PIXEL_COLUMNS)
    if not has_pixels and "spatial" not in adata.obsm:
        missing += list(PIXEL_COLUMNS)
    if missing:
        found = ", ".join(map(str, obs.columns[:12])) or "none"
        raise fail(NAME, path, f"missing obs column(s) {', '.join(missing)} (found {found})",
                   "obs needs pxl_col_in_fullres, pxl_row_in_fullres (the spot's centre in full-resolution pixels) "
                   "and array_row, array_col (its array position; both, or neither), as HEST writes them")
    if has_pixels:
        columns = {c: obs[c] for c in array + list(PIXEL_COLUMNS)}
    else:  # HEST also keeps the centres as obsm["spatial"] = (x, y)
        spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if spatial.ndim != 2 or spatial.shape[1] < 2:
            raise fail(NAME, path, f"obsm['spatial'] has shape {spatial.shape}, expected (spots, 2)", fix)
        columns = {**{c: obs[c] for c in array}, PIXEL_COLUMNS[0]: spatial[:, 0], PIXEL_COLUMNS[1]: spatial[:, 1]}
    values = {}
    spot_ids = np.asarray(adata.obs_names, dtype=str)
    for column, raw in columns.items():
        numbers = np.asarray(_numeric(raw), dtype=np.float64)
        bad = ~np.isfinite(numbers)
        if column in ARRAY_COLUMNS:
            bad |= numbers != np.round(numbers)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise fail(NAME, path, f"obs column {column} has a missing or invalid value {np.asarray(raw)[i]!r} at spot "
                       f"{spot_ids[i]!r}{' (array positions are integers)' if column in ARRAY_COLUMNS else ''}", fix)
        values[column] = numbers
    keep = np.ones(len(spot_ids), dtype=bool)
    if "in_tissue" in obs.columns:
        keep = np.asarray(_numeric(obs["in_tissue"]), dtype=np.float64) == 1
    if adata.X is None:
        raise fail(NAME, path, "X is empty (no counts)", fix)
    dup = np.unique(spot_ids, return_counts=True)
    if (dup[1] > 1).any():
        raise fail(NAME, path, f"duplicated spot id(s) {examples(dup[0][dup[1] > 1])} in obs_names", fix)
    counts = integer_counts(NAME, path, adata.X, "X")
    counts, genes, merged = merge_duplicate_genes(counts, np.asarray(adata.var_names, dtype=str))
    rows = np.flatnonzero(keep)
    return {
        "spot_ids": spot_ids[rows],
        "genes": genes,
        "counts": counts[rows],
        "grid": np.column_stack([values["array_col"], values["array_row"]])[rows].astype(np.int64) if array else None,
        "pixel": np.column_stack([values[PIXEL_COLUMNS[0]], values[PIXEL_COLUMNS[1]]])[rows],
        "n_out_of_tissue": int((~keep).sum()),
        "n_merged": merged,
    }


def _numeric(values):
    """A column as numbers (NaN where not a number), whatever pandas dtype it was stored with."""
    import pandas as pd

    return pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
