"""Reader for 10x Visium samples as Space Ranger writes them, listed in a manifest.

Layout of the data directory (``--data-dir DIR`` or ``$STBENCH_DATA/visium``)::

    manifest.csv    sample,patient,folder,image[,mpp]
                    folder: a Space Ranger output folder (``outs/``, or the run folder holding it);
                    image: the full-resolution H&E given to Space Ranger (it keeps only downscaled
                    copies); both absolute or relative to the manifest; image may be empty;
                    mpp: optional µm per full-resolution pixel, overriding the measured value

    <folder>/filtered_feature_bc_matrix.h5          10x HDF5 feature-barcode matrix
    <folder>/spatial/tissue_positions.csv           Space Ranger >= 2.0 (with a header), or
    <folder>/spatial/tissue_positions_list.csv      Space Ranger < 2.0 (no header)
    <folder>/spatial/scalefactors_json.json         spot_diameter_fullres (a cross-check, see below)

The HDF5 matrix (10x "feature-barcode matrix" format): group ``matrix`` with ``data``, ``indices``,
``indptr`` (compressed sparse columns: one column per barcode) and ``shape`` = (features, barcodes),
``barcodes``, and ``features/name`` (symbol), ``features/id`` (Ensembl id), ``features/feature_type``.
Only ``Gene Expression`` features are kept (antibody captures and other types are dropped). Symbols
that name several Ensembl ids (a handful per 10x reference) are merged by summing their counts, so
each symbol is one gene column that holds every UMI of that symbol; the number merged is in ``qc``.

Positions: columns barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres.
Spots are the matrix's barcodes whose position row says ``in_tissue == 1``; a matrix barcode without a
position row is an error (the files do not belong together). Grid = (array_col, array_row): Visium
numbers columns 0, 2, 4 … on even rows and 1, 3, 5 … on odd rows, the ``hex`` lattice convention of
stbench; pixel = (pxl_col_in_fullres, pxl_row_in_fullres). Spots are 55 µm across, 100 µm apart.

Scale: µm per pixel is measured from the spots: the 100 µm pitch of the array, fitted over every
in-tissue spot (:func:`stbench.data.layouts.mpp_from_lattice`, as HEST measures it from the spot
distances). It is not taken from ``spot_diameter_fullres``, because that field's meaning changed:
Space Ranger 1.3 and later document it as the pixel diameter of a *65 µm* spot, earlier versions of a
55 µm one, so dividing 55 µm by it is 18 % off on current outputs. The diameter is kept in ``qc``
with the spot size it implies at the measured scale (≈ 55 or 65 µm when the files agree), and a
warning names a sample where it implies neither.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.data.layouts import (LATTICE_GEOMETRY, ManifestRow, check_inside, examples, fail, find_manifest,
                                  integer_counts, merge_duplicate_genes, mpp_from_lattice, read_manifest, require_file)
from stbench.data.model import Dataset, Section, SectionInfo
from stbench.errors import DataError

NAME = "visium"
FOLDER = "visium"
MATRIX = "filtered_feature_bc_matrix.h5"
POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")  # newest first
SCALEFACTORS = "spatial/scalefactors_json.json"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
REQUIRED = ("sample", "patient", "folder", "image")
OPTIONAL = ("mpp",)
EXAMPLE = "'S1,P1,runs/S1/outs,images/S1.tif'"
GENE_EXPRESSION = "Gene Expression"
#: spot diameters (µm) that ``spot_diameter_fullres`` may stand for: Space Ranger < 1.3 and >= 1.3
DOCUMENTED_DIAMETERS = (55.0, 65.0)
SPOT_DIAMETER_UM, SPOT_PITCH_UM = LATTICE_GEOMETRY["hex"]


def open_visium(data_dir: Optional[Path] = None, options=None) -> "VisiumDataset":
    """Open the manifest of Visium samples (``data_dir``, else ``$STBENCH_DATA/visium`` or the user cache)."""
    return VisiumDataset(find_manifest(NAME, data_dir, FOLDER))


class VisiumDataset(Dataset):
    """The Visium samples listed in one manifest; see the module docstring for the layout."""

    name = NAME
    description = "10x Visium samples (Space Ranger outputs) listed in a manifest"

    def __init__(self, manifest: Path):
        self.manifest = Path(manifest)
        self.rows = {r["sample"]: r for r in read_manifest(NAME, self.manifest, REQUIRED, OPTIONAL, EXAMPLE)}
        #: per loaded sample: spot counts around the join, merged symbols, the scale cross-check
        self.qc: dict[str, dict] = {}
        for row in self.rows.values():  # every file is found before any is read, so a run fails early
            self._files(row)

    def sections(self) -> list[SectionInfo]:
        return [SectionInfo(name=n, patient=r["patient"], has_image=r.path("image") is not None)
                for n, r in self.rows.items()]

    def _files(self, row: ManifestRow) -> dict:
        """The files of one sample, each checked to exist."""
        folder = row.path("folder")
        if folder is None:
            raise fail(NAME, self.manifest, f"empty folder for sample {row['sample']!r} (line {row.line})",
                       "give the Space Ranger output folder (outs/) of every sample")
        if not (folder / MATRIX).is_file() and (folder / "outs").is_dir():
            folder = folder / "outs"  # the run folder that holds outs/
        if not folder.is_dir():
            raise fail(NAME, folder, f"output folder of sample {row['sample']!r} not found",
                       f"fix column folder on line {row.line} of the manifest")
        matrix = require_file(NAME, folder / MATRIX, f"count matrix of sample {row['sample']!r}",
                              "copy Space Ranger's outs/ folder whole (the filtered matrix in HDF5 format)")
        positions = next((folder / p for p in POSITIONS if (folder / p).is_file()), None)
        if positions is None:
            if (folder / "spatial" / "tissue_positions.parquet").is_file():
                raise fail(NAME, folder / "spatial" / "tissue_positions.parquet",
                           "Visium HD binned output (tissue_positions.parquet), which this reader does not support",
                           "the visium dataset reads standard Visium (55 µm spots); convert Visium HD bins to an "
                           ".h5ad and use the anndata dataset")
            raise fail(NAME, folder / POSITIONS[0], f"spot positions of sample {row['sample']!r} not found "
                       f"(nor {POSITIONS[1]})", "copy the spatial/ folder of the same Space Ranger run")
        image = row.path("image")
        if image is not None:
            require_file(NAME, image, f"image of sample {row['sample']!r}",
                         f"fix column image on line {row.line} of {self.manifest} (the full-resolution H&E)")
        scalefactors = folder / SCALEFACTORS
        return {"matrix": matrix, "positions": positions, "image": image,
                "scalefactors": scalefactors if scalefactors.is_file() else None}

    def load_section(self, name: str) -> Section:
        if name not in self.rows:
            raise DataError(f"{NAME}: sample {name!r} is not in {self.manifest} (samples: {', '.join(self.rows)})")
        row = self.rows[name]
        files = self._files(row)
        barcodes, genes, counts, n_merged = read_matrix(files["matrix"])
        positions = read_positions(files["positions"])

        index = {b: i for i, b in enumerate(positions["barcode"])}
        pos = np.array([index.get(b, -1) for b in barcodes], dtype=np.int64)
        if (pos < 0).any():
            lost = barcodes[pos < 0]
            raise fail(NAME, files["positions"], f"barcodes do not join: {len(lost)} of {len(barcodes)} barcode(s) of "
                       f"{files['matrix'].name} have no position row here, e.g. {examples(lost)}",
                       "the matrix and spatial/ must come from the same Space Ranger run")
        keep = positions["in_tissue"][pos] == 1
        pos = pos[keep]
        grid = np.column_stack([positions["array_col"][pos], positions["array_row"][pos]]).astype(np.int64)
        pixel = np.column_stack([positions["pxl_col_in_fullres"][pos], positions["pxl_row_in_fullres"][pos]])
        spot_ids = barcodes[keep]
        counts = counts[np.flatnonzero(keep)]

        mpp = row.number(NAME, "mpp")
        measured = mpp_from_lattice(grid, pixel, "hex")
        if mpp is None:
            if measured is None:
                raise fail(NAME, files["positions"], f"unknown pixel size: sample {name!r} has {len(grid)} in-tissue "
                           "spot(s), too few off one line to measure the 100 µm spot pitch",
                           f"add an mpp column (µm per full-resolution pixel) to {self.manifest}")
            mpp = measured
        image = files["image"]
        if image is not None:
            check_inside(NAME, name, image, pixel, spot_ids, files["positions"],
                         "the image must be the full-resolution H&E given to Space Ranger, not tissue_hires_image.png "
                         "or another downscaled copy; fix column image of the manifest")
        in_tissue = positions["in_tissue"] == 1
        self.qc[name] = {
            "n_matrix_barcodes": int(len(barcodes)),
            "n_out_of_tissue": int((~keep).sum()),
            # in-tissue position rows the matrix has no counts for (the data check's "spot rows w/o counts")
            "n_spotfile_rows_without_counts": int(in_tissue.sum() - keep.sum()),
            "n_merged_symbols": n_merged,
            "mpp_measured": measured,
            **self._diameter_check(name, files["scalefactors"], mpp),
        }
        return Section(
            name=name,
            patient=row["patient"],
            spot_ids=spot_ids,
            genes=genes,
            counts=counts,
            grid=grid,
            pixel=pixel,
            mpp=float(mpp),
            lattice="hex",
            spot_diameter_um=SPOT_DIAMETER_UM,
            spot_pitch_um=SPOT_PITCH_UM,
            image_path=image,
            source_files=tuple(p for p in (self.manifest, files["matrix"], files["positions"], files["scalefactors"],
                                           image) if p is not None),
        )

    def _diameter_check(self, name: str, path: Optional[Path], mpp: float) -> dict:
        """The spot size that ``spot_diameter_fullres`` implies at the scale used: ≈ 55 or 65 µm when the
        scale factors belong to the same image as the positions; a warning otherwise."""
        if path is None:
            return {}
        try:
            diameter = float(json.loads(path.read_text(encoding="utf-8"))["spot_diameter_fullres"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise fail(NAME, path, f"cannot read spot_diameter_fullres ({type(e).__name__}: {e})",
                       "copy scalefactors_json.json of the same Space Ranger run, or remove it") from None
        implied = diameter * mpp
        if not any(abs(implied - d) <= 0.1 * d for d in DOCUMENTED_DIAMETERS):
            warnings.warn(f"{NAME}: {path}: spot_diameter_fullres {diameter:g} px is a {implied:.0f} µm spot at the "
                          f"{mpp:.4f} µm/px measured from the 100 µm spot pitch of sample {name!r} (expected 55 or 65 µm); "
                          "the scale factors may belong to another image", stacklevel=3)
        return {"spot_diameter_fullres": diameter, "spot_diameter_implied_um": implied}


# --- files ---------------------------------------------------------------------------------------------


def read_matrix(path: Path) -> tuple[np.ndarray, np.ndarray, object, int]:
    """Barcodes, gene symbols, the (barcodes, genes) integer CSR counts (Gene Expression features only,
    duplicated symbols summed) and the number of merged symbols, from a 10x HDF5 matrix."""
    import h5py
    import scipy.sparse as sp

    fix = "use Space Ranger's filtered_feature_bc_matrix.h5 (10x HDF5 feature-barcode matrix format)"
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise fail(NAME, path, f"no group 'matrix' (found {', '.join(f.keys()) or 'nothing'})", fix)
            m = f["matrix"]
            missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes", "features/name") if k not in m]
            if missing:
                raise fail(NAME, path, f"missing field(s) {', '.join('matrix/' + k for k in missing)}", fix)
            data, indices, indptr = m["data"][()], m["indices"][()], m["indptr"][()]
            n_features, n_barcodes = (int(v) for v in m["shape"][()])
            barcodes = _strings(m["barcodes"][()])
            names = _strings(m["features/name"][()])
            types = _strings(m["features/feature_type"][()]) if "features/feature_type" in m else None
    except OSError as e:
        raise fail(NAME, path, f"cannot read the HDF5 file ({e})", fix) from None
    if len(barcodes) != n_barcodes or len(names) != n_features or len(indptr) != n_barcodes + 1:
        raise fail(NAME, path, f"matrix/shape ({n_features}, {n_barcodes}) disagrees with {len(names)} features, "
                   f"{len(barcodes)} barcodes and {len(indptr)} indptr entries", fix)
    # compressed sparse columns of (features, barcodes) are compressed sparse rows of (barcodes, features)
    try:
        counts = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    except ValueError as e:
        raise fail(NAME, path, f"inconsistent sparse matrix ({e})", fix) from None
    counts = integer_counts(NAME, path, counts, "matrix/data")
    dup = np.unique(barcodes, return_counts=True)
    if (dup[1] > 1).any():
        raise fail(NAME, path, f"duplicated barcode(s) {examples(dup[0][dup[1] > 1])}", fix)
    keep = np.flatnonzero(types == GENE_EXPRESSION) if types is not None else np.arange(n_features)
    if not len(keep):
        raise fail(NAME, path, f"no '{GENE_EXPRESSION}' feature (types: {', '.join(sorted(set(types.tolist())))})", fix)
    counts, genes, merged = merge_duplicate_genes(counts[:, keep].tocsr(), names[keep])
    return barcodes, genes, counts, merged


def _strings(values) -> np.ndarray:
    values = np.atleast_1d(values)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=str)


def read_positions(path: Path) -> dict:
    """The columns of a tissue positions file, with or without its header line (Space Ranger >= 2.0
    writes one; 1.x writes none)."""
    import pandas as pd

    fix = f"expected comma-separated columns {','.join(POSITION_COLUMNS)}, as Space Ranger writes them"
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().split(",")[0].strip()
        header = first == POSITION_COLUMNS[0]
        df = pd.read_csv(path, header=0 if header else None, dtype={0: str} if not header else {"barcode": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise fail(NAME, path, f"cannot read the CSV ({type(e).__name__}: {e})", fix) from None
    if header:
        missing = [c for c in POSITION_COLUMNS if c not in df.columns]
        if missing:
            raise fail(NAME, path, f"missing column(s) {', '.join(missing)} (found {', '.join(map(str, df.columns))})", fix)
    else:
        if df.shape[1] != len(POSITION_COLUMNS):
            raise fail(NAME, path, f"{df.shape[1]} columns without a header line, expected {len(POSITION_COLUMNS)}", fix)
        df.columns = list(POSITION_COLUMNS)
    out = {"barcode": df["barcode"].astype(str).to_numpy()}
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if column in ("in_tissue", "array_row", "array_col"):
            bad |= values != np.round(values)
        if bad.any():
            line = int(np.flatnonzero(bad)[0]) + 1 + header
            raise fail(NAME, path, f"column {column} has a missing or invalid value {df[column].iloc[line - 1 - header]!r} "
                       f"on line {line}", fix)
        out[column] = values.astype(np.int64) if column in ("in_tissue", "array_row", "array_col") else values
    dup = pd.Index(out["barcode"]).duplicated()
    if dup.any():
        raise fail(NAME, path, f"duplicated barcode(s) {examples(out['barcode'][dup])}", fix)
    return out
