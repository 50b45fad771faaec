"""Helpers for dataset plugins that read files laid out by other tools (Space Ranger, AnnData, ...).

A reader of such a layout needs the same few steps: find its data directory and manifest, read a small
CSV manifest with required columns, check raw counts, merge duplicated gene symbols, place spots on their
lattice, measure the pixel size from the lattice, and check that the spots lie on the image. Each step
raises a one-line :class:`~stbench.errors.DataError` that names the file, the field and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stbench.errors import DataError
from stbench.paths import default_data_dir

#: spot geometry per lattice: (spot diameter µm, centre-to-centre pitch µm) of legacy ST and Visium
LATTICE_GEOMETRY = {"square": (100.0, 200.0), "hex": (55.0, 100.0)}


def fail(dataset: str, path, problem: str, fix: str) -> DataError:
    """A DataError on one line: dataset, file, problem, fix (exception texts may hold newlines)."""
    return DataError(" ".join(f"{dataset}: {path}: {problem}; {fix}".split()))


def examples(items, k: int = 3) -> str:
    return ", ".join(repr(str(i)) for i in list(items)[:k])


def natural_key(name: str):
    """Sort key putting S2 before S10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(name))]


# --- data directory and manifest -----------------------------------------------------------------------


def find_manifest(dataset: str, data_dir: Optional[Path], folder: str, manifest: str = "manifest.csv") -> Path:
    """The manifest CSV of a dataset: ``data_dir`` (a folder holding ``manifest``, a parent folder holding
    ``folder/manifest``, or the CSV file itself), else ``$STBENCH_DATA/<folder>``, else the user cache."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if root.is_file():
            return root
        candidates = [root / manifest, root / folder / manifest]
        tried = [str(root)]
    else:
        root, tried = default_data_dir(folder)
        candidates = [root / manifest]
    for path in candidates:
        if path.is_file():
            return path
    state = "not found" if not root.exists() else f"has no {manifest}"
    raise DataError(f"{dataset} data directory {state}: {', '.join(tried)}; pass --data-dir DIR (the folder holding "
                    f"{manifest}, or the CSV itself) or set $STBENCH_DATA so that $STBENCH_DATA/{folder}/{manifest} exists")


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a manifest: its values by column (strings, '' when empty) and the line number."""

    values: dict
    line: int
    manifest: Path

    def __getitem__(self, column: str) -> str:
        return self.values.get(column, "")

    def path(self, column: str) -> Optional[Path]:
        """The file a column names, absolute or relative to the manifest's folder; None when empty."""
        value = self[column]
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.manifest.parent / path

    def number(self, dataset: str, column: str) -> Optional[float]:
        """A positive number from a column, None when the column is absent or the cell empty."""
        value = self[column]
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not math.isfinite(number) or number <= 0:
            raise fail(dataset, self.manifest, f"column {column} of sample {self['sample']!r} (line {self.line}) "
                       f"is {value!r}, not a positive number", f"give {column} in µm per pixel, e.g. 0.2738")
        return number


def read_manifest(dataset: str, path: Path, required: Sequence[str], optional: Sequence[str] = (),
                  example: str = "") -> list[ManifestRow]:
    """The rows of a manifest CSV, checked: the required columns exist, ``sample`` and ``patient`` are
    filled, sample names are unique. Cells are stripped strings."""
    import pandas as pd

    fix = f"the manifest is a CSV with columns {', '.join(required)}" + (f" [{', '.join(optional)}]" if optional else "")
    fix += f", e.g. {example}" if example else ""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise fail(dataset, path, f"cannot read the manifest ({type(e).__name__}: {e})", fix) from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = ", ".join(df.columns[:10]) or "none"
        raise fail(dataset, path, f"missing column(s) {', '.join(missing)} (found {found})", fix)
    if df.empty:
        raise fail(dataset, path, "the manifest lists no sample", fix)
    rows = []
    seen: dict[str, int] = {}
    for i, record in enumerate(df.to_dict("records")):
        line = i + 2  # 1-based, after the header line
        values = {k: str(v).strip() for k, v in record.items()}
        for column in ("sample", "patient"):
            if column in required and not values[column]:
                raise fail(dataset, path, f"empty {column} on line {line}", f"every sample needs a {column}")
        name = values["sample"]
        if name in seen:
            raise fail(dataset, path, f"sample {name!r} is listed twice (lines {seen[name]} and {line})",
                       "each sample must appear once")
        seen[name] = line
        rows.append(ManifestRow(values, line, Path(path)))
    return rows


def require_file(dataset: str, path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise fail(dataset, path, f"{what} not found", fix)
    return path


# --- counts and genes ----------------------------------------------------------------------------------


def integer_counts(dataset: str, path, matrix, where: str):
    """``matrix`` (dense or sparse, spots × genes) as a CSR matrix of non-negative integers, or a
    DataError naming ``where`` (e.g. "X") when it holds negative or non-integer values (normalised data)."""
    import scipy.sparse as sp

    csr = sp.csr_matrix(matrix)
    data = csr.data
    fix = "stbench needs raw UMI counts (non-negative integers), not normalised or log values"
    if data.dtype.kind not in "biuf":
        raise fail(dataset, path, f"{where} holds {data.dtype} values, not counts", fix)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            raise fail(dataset, path, f"{where} holds non-integer count {data[bad][0]!r} ({int(bad.sum())} value(s))", fix)
    if data.size and data.min() < 0:
        raise fail(dataset, path, f"{where} holds negative count {data.min()!r}", fix)
    dtype = np.int32 if data.size == 0 or data.max() <= np.iinfo(np.int32).max else np.int64
    out = sp.csr_matrix((data.astype(dtype), csr.indices, csr.indptr), shape=csr.shape)
    out.sum_duplicates()
    return out


def merge_duplicate_genes(counts, genes: np.ndarray):
    """Sum the count columns of genes that share a symbol, keeping the first occurrence's position.

    A symbol can name several loci (10x references map a few symbols to two Ensembl ids): summing keeps
    every UMI and gives the panel one column per symbol. Returns (counts, genes, number of merged symbols).
    """
    import scipy.sparse as sp

    genes = np.asarray(genes, dtype=str)
    unique, first, inverse = np.unique(genes, return_index=True, return_inverse=True)
    if len(unique) == len(genes):
        return counts, genes, 0
    order = np.argsort(first)  # unique symbols in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    merge = sp.csr_matrix((np.ones(len(genes), dtype=counts.dtype), (np.arange(len(genes)), rank[inverse])),
                          shape=(len(genes), len(unique)))
    merged = sp.csr_matrix(counts @ merge)
    return merged, unique[order], int(len(genes) - len(unique))


# --- lattice and scale ---------------------------------------------------------------------------------


def grid_um(grid: np.ndarray, lattice: str) -> np.ndarray:
    """Physical positions (µm) of integer array coordinates (x = column, y = row) on a lattice.

    ``hex`` uses Visium's numbering: columns step by 2 along a row, so neighbours in a row are 2 columns
    (one pitch) apart and rows are pitch·√3/2 apart."""
    pitch = LATTICE_GEOMETRY[lattice][1]
    grid = np.asarray(grid, dtype=np.float64)
    if lattice == "hex":
        return np.column_stack([grid[:, 0] * pitch / 2, grid[:, 1] * pitch * math.sqrt(3) / 2])
    return grid * pitch


def mpp_from_lattice(grid: np.ndarray, pixel: np.ndarray, lattice: str) -> Optional[float]:
    """Microns per pixel measured from the spots themselves: a least-squares affine map from the spots'
    physical lattice positions to their pixel centres (any rotation or flip of the image), whose area
    scale is px² per µm². None when the spots do not span two dimensions (fewer than 3 off one line)."""
    um = grid_um(grid, lattice)
    if len(um) < 3:
        return None
    design = np.column_stack([um, np.ones(len(um))])
    coef, _, rank, _ = np.linalg.lstsq(design, np.asarray(pixel, dtype=np.float64), rcond=None)
    if rank < 3:
        return None
    det = abs(np.linalg.det(coef[:2].T))
    return 1.0 / math.sqrt(det) if det > 0 else None


def grid_from_pixels(dataset: str, path, pixel: np.ndarray, mpp: float, lattice: str) -> np.ndarray:
    """Integer array coordinates derived from pixel centres, for layouts that do not store them.

    Assumes the lattice's rows run along the image's x axis (the orientation Space Ranger and HEST
    images have); refuses spots that are not within a quarter step of such a lattice."""
    pitch_px = LATTICE_GEOMETRY[lattice][1] / mpp
    step = (pitch_px / 2, pitch_px * math.sqrt(3) / 2) if lattice == "hex" else (pitch_px, pitch_px)
    pixel = np.asarray(pixel, dtype=np.float64)
    scaled = (pixel - pixel.min(axis=0)) / np.array(step)
    grid = np.round(scaled).astype(np.int64)
    fix = ("add the array coordinates as obs columns array_row and array_col, or check the lattice and mpp "
           "columns of the manifest")
    off = np.abs(scaled - grid).max(axis=1) if len(grid) else np.zeros(0)
    if (off > 0.25).any():
        i = int(np.argmax(off))
        raise fail(dataset, path, f"no array coordinates, and spot centre {pixel[i].tolist()} is off the axis-aligned "
                   f"{lattice} lattice of pitch {LATTICE_GEOMETRY[lattice][1]:g} µm at {mpp:g} µm/px", fix)
    if lattice == "hex" and len(grid):
        parity = (grid[:, 0] + grid[:, 1]) % 2
        if len(set(parity.tolist())) > 1:
            raise fail(dataset, path, "no array coordinates, and the spot centres do not form a hex lattice "
                       "(rows are not offset by half a pitch)", fix)
        grid[:, 0] += parity[0]  # Visium numbering: column + row is even
    return grid


# --- images --------------------------------------------------------------------------------------------


def image_size(dataset: str, path: Path, sample: str) -> tuple[int, int]:
    """(width, height) of a sample's image from its header, through the region readers that later cut
    its patches (OpenSlide for pyramidal whole-slide images, PIL for the rest): a file they cannot open
    is refused here, before a run starts."""
    from types import SimpleNamespace

    from stbench.images.region import image_size as region_image_size

    try:
        return region_image_size(SimpleNamespace(image_path=Path(path), name=sample))
    except DataError as e:
        raise DataError(f"{dataset}: {e}") from None


def check_inside(dataset: str, sample: str, image: Path, pixel: np.ndarray, spot_ids: np.ndarray, source,
                 fix: str) -> tuple[int, int]:
    """Refuse spot centres outside the image (a wrong image, or coordinates of a downscaled image)."""
    width, height = image_size(dataset, image, sample)
    pixel = np.asarray(pixel, dtype=np.float64)
    outside = ~((pixel[:, 0] >= 0) & (pixel[:, 0] < width) & (pixel[:, 1] >= 0) & (pixel[:, 1] < height))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise fail(dataset, source, f"{int(outside.sum())} spot centre(s) lie outside the {width} x {height} px image "
                   f"{image}, e.g. spot {str(spot_ids[i])!r} at x={pixel[i, 0]:g}, y={pixel[i, 1]:g}", fix)
    return width, height
