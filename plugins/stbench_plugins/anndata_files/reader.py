"""Reader for spatial samples stored as AnnData ``.h5ad`` files, listed in a manifest.

Layout of the data directory (``--data-dir DIR`` or ``$STBENCH_DATA/anndata``)::

    manifest.csv    sample,patient,h5ad,image,mpp[,lattice]
                    h5ad, image: absolute or relative to the manifest; image may be empty;
                    mpp: µm per full-resolution image pixel (required: an h5ad does not say it);
                    lattice: hex (Visium, the default: 55 µm spots, 100 µm apart) or square
                    (legacy ST: 100 µm spots, 200 µm apart)

What each ``.h5ad`` must hold (read with the ``anndata`` library):

* raw integer UMI counts: ``layers["counts"]`` when that layer exists, else ``X`` (normalised or log
  values are refused, naming the one read); ``var_names`` are gene symbols (duplicated symbols are
  summed into one gene, as the visium reader does); ``obs_names`` are the spot ids;
* ``obsm["spatial"]``: each spot's centre (x, y) in full-resolution pixels of the image (the first two
  columns: scanpy's and HEST's order, x = image column);
* optionally ``obs["array_row"]`` and ``obs["array_col"]`` (integers; Visium numbering on the hex
  lattice). Without them the grid is derived from the pixel centres, the lattice's pitch and ``mpp``,
  assuming the lattice's rows run along the image's x axis; a slide that is rotated against its
  image is refused with a message asking for the array columns;
* optionally ``obs["in_tissue"]``: only spots with 1 are read (HEST's files hold in-tissue spots only).

A file without counts (no ``X`` and no ``layers["counts"]``, or no genes) is a section of spots and an
image only (``has_counts`` False): ``stbench run`` leaves it out, ``stbench predict`` predicts it.

When array coordinates are present, the pixel size measured from the spot pitch is compared with the
manifest's ``mpp``; a warning names a sample where they differ by more than 10 % (a wrong ``mpp``, or
coordinates of a downscaled image).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.data.layouts import (LATTICE_GEOMETRY, check_inside, examples, fail, find_manifest, grid_from_pixels,
                                  integer_counts, merge_duplicate_genes, mpp_from_lattice, read_manifest, require_file)
from stbench.data.model import Dataset, Section, SectionInfo
from stbench.errors import DataError

NAME = "anndata"
FOLDER = "anndata"
REQUIRED = ("sample", "patient", "h5ad", "image", "mpp")
OPTIONAL = ("lattice",)
EXAMPLE = "'S1,P1,st/S1.h5ad,wsis/S1.tif,0.2738,hex'"
DEFAULT_LATTICE = "hex"
COUNTS_LAYER = "counts"
#: the manifest's mpp and the one measured from the spot pitch may differ by this fraction before a warning
MPP_TOLERANCE = 0.1


def open_anndata(data_dir: Optional[Path] = None, options=None) -> "AnnDataDataset":
    """Open the manifest of .h5ad samples (``data_dir``, else ``$STBENCH_DATA/anndata`` or the user cache)."""
    return AnnDataDataset(find_manifest(NAME, data_dir, FOLDER))


class AnnDataDataset(Dataset):
    """The .h5ad samples listed in one manifest; see the module docstring for what they must hold."""

    name = NAME
    description = "spatial samples stored as AnnData .h5ad files, listed in a manifest"

    def __init__(self, manifest: Path):
        self.manifest = Path(manifest)
        self.rows = {r["sample"]: r for r in read_manifest(NAME, self.manifest, REQUIRED, OPTIONAL, EXAMPLE)}
        #: per loaded sample: where the counts came from, merged symbols, the scale cross-check
        self.qc: dict[str, dict] = {}
        for row in self.rows.values():  # checked before any file is read, so a run fails early
            self._lattice(row)
            self._mpp(row)
            if row.path("h5ad") is None:
                raise fail(NAME, self.manifest, f"empty h5ad for sample {row['sample']!r} (line {row.line})",
                           "give the .h5ad file of every sample")
            require_file(NAME, row.path("h5ad"), f"h5ad of sample {row['sample']!r}",
                         f"fix column h5ad on line {row.line} of {self.manifest}")
            if row.path("image") is not None:
                require_file(NAME, row.path("image"), f"image of sample {row['sample']!r}",
                             f"fix column image on line {row.line} of {self.manifest} (the full-resolution H&E)")

    def sections(self) -> list[SectionInfo]:
        return [SectionInfo(name=n, patient=r["patient"], has_image=r.path("image") is not None,
                            has_counts=_holds_counts(r.path("h5ad"))) for n, r in self.rows.items()]

    def _lattice(self, row) -> str:
        lattice = row["lattice"] or DEFAULT_LATTICE
        if lattice not in LATTICE_GEOMETRY:
            raise fail(NAME, self.manifest, f"unknown lattice {lattice!r} for sample {row['sample']!r} (line {row.line})",
                       "write hex (Visium) or square (legacy ST)")
        return lattice

    def _mpp(self, row) -> float:
        mpp = row.number(NAME, "mpp")
        if mpp is None:
            raise fail(NAME, self.manifest, f"unknown pixel size: empty mpp for sample {row['sample']!r} (line {row.line})",
                       "give the µm per full-resolution pixel of its image (e.g. from the scanner, or HEST's "
                       "pixel_size_um_estimated)")
        return mpp

    def load_section(self, name: str) -> Section:
        if name not in self.rows:
            raise DataError(f"{NAME}: sample {name!r} is not in {self.manifest} (samples: {', '.join(self.rows)})")
        row = self.rows[name]
        path, image, lattice, mpp = row.path("h5ad"), row.path("image"), self._lattice(row), self._mpp(row)
        adata = _read_h5ad(path)
        fix = "see the anndata dataset's layout: raw counts in X or layers['counts'], obsm['spatial'] in pixels"

        if "spatial" not in adata.obsm:
            raise fail(NAME, path, f"missing field obsm['spatial'] (found obsm keys: {', '.join(adata.obsm) or 'none'})",
                       "store each spot's centre (x, y) in full-resolution pixels in obsm['spatial']")
        pixel = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if pixel.ndim != 2 or pixel.shape[1] < 2:
            raise fail(NAME, path, f"obsm['spatial'] has shape {pixel.shape}, expected (spots, 2)", fix)
        pixel = pixel[:, :2]
        if not np.isfinite(pixel).all():
            i = int(np.flatnonzero(~np.isfinite(pixel).all(axis=1))[0])
            raise fail(NAME, path, f"obsm['spatial'] has a missing value at spot {str(adata.obs_names[i])!r}", fix)

        spot_ids = np.asarray(adata.obs_names, dtype=str)
        dup = adata.obs_names.duplicated()
        if dup.any():
            raise fail(NAME, path, f"duplicated spot id(s) {examples(spot_ids[dup])} in obs_names", fix)
        where = f"layers['{COUNTS_LAYER}']" if COUNTS_LAYER in adata.layers else "X"
        matrix = adata.layers[COUNTS_LAYER] if COUNTS_LAYER in adata.layers else adata.X
        counts, genes, n_merged = None, np.array([], dtype=str), 0
        if matrix is not None and adata.n_vars:  # else spots and an image only: predicted, never trained on
            counts = integer_counts(NAME, path, matrix, where)
            counts, genes, n_merged = merge_duplicate_genes(counts, np.asarray(adata.var_names, dtype=str))
        else:
            where = None

        obs = adata.obs
        keep = np.ones(len(spot_ids), dtype=bool)
        if "in_tissue" in obs:
            keep = _integers(path, obs, "in_tissue") == 1
        grid = None
        present = [c for c in ("array_row", "array_col") if c in obs]
        if len(present) == 1:
            missing = "array_col" if present == ["array_row"] else "array_row"
            raise fail(NAME, path, f"missing column obs['{missing}'] beside obs['{present[0]}']",
                       "give both array coordinates, or neither (the grid is then derived from the pixel centres)")
        if present:
            grid = np.column_stack([_integers(path, obs, "array_col"), _integers(path, obs, "array_row")])[keep]
        spot_ids, pixel = spot_ids[keep], pixel[keep]
        counts = counts[np.flatnonzero(keep)] if counts is not None else None
        measured = None
        if grid is None:
            grid = grid_from_pixels(NAME, path, pixel, mpp, lattice)
        else:
            measured = mpp_from_lattice(grid, pixel, lattice)
            if measured is not None and abs(measured / mpp - 1) > MPP_TOLERANCE:
                warnings.warn(f"{NAME}: {self.manifest}: mpp {mpp:g} of sample {name!r} differs from the {measured:.4f} "
                              f"µm/px measured from its {LATTICE_GEOMETRY[lattice][1]:g} µm spot pitch; check the mpp "
                              "column, and that obsm['spatial'] is in full-resolution pixels", stacklevel=2)
        if image is not None:
            check_inside(NAME, name, image, pixel, spot_ids, path,
                         "obsm['spatial'] must be in pixels of the full-resolution image the manifest names (not of a "
                         "downscaled copy); fix the image column or the coordinates")
        self.qc[name] = {"counts_from": where, "n_merged_symbols": n_merged, "n_out_of_tissue": int((~keep).sum()),
                         "mpp_measured": measured, "grid_derived": not present}
        diameter, pitch = LATTICE_GEOMETRY[lattice]
        return Section(
            name=name,
            patient=row["patient"],
            spot_ids=spot_ids,
            genes=genes,
            counts=counts,
            grid=grid.astype(np.int64),
            pixel=pixel,
            mpp=mpp,
            lattice=lattice,
            spot_diameter_um=diameter,
            spot_pitch_um=pitch,
            image_path=image,
            source_files=tuple(p for p in (self.manifest, path, image) if p is not None),
        )


def _read_h5ad(path: Path):
    import anndata

    try:
        with warnings.catch_warnings():
            # duplicated gene symbols are merged by the reader, so anndata's advice to rename them is moot
            warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
            return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise fail(NAME, path, f"cannot read the .h5ad file ({type(e).__name__}: {reason})",
                   "write it with anndata (AnnData.write_h5ad)") from None


def _holds_counts(path: Path) -> bool:
    """Whether an .h5ad holds counts (X or layers['counts'], over at least one gene), from its HDF5
    structure alone, so listing stays cheap; an unreadable file is said to hold them (reading it then
    says what is wrong)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            var = f["var"]
            n_vars = len(var[var.attrs["_index"]])
            return ("X" in f or f"layers/{COUNTS_LAYER}" in f) and n_vars > 0
    except (OSError, KeyError, TypeError, ValueError):
        return True


def _integers(path: Path, obs, column: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(obs[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise fail(NAME, path, f"obs['{column}'] has a missing or non-integer value {obs[column].iloc[i]!r} "
                   f"at spot {str(obs.index[i])!r}", f"{column} must hold integers")
    return values.astype(np.int64)
