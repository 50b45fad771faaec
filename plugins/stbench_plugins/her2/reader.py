"""Reader for her2st: HER2-positive breast cancer, legacy Spatial Transcriptomics.

Source: Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates
tumor-associated cell type interactions", Nat Commun 12, 6012 (2021), doi:10.1038/s41467-021-26271-2.
Files: github.com/almaan/her2st, folder ``data/``.

Layout of the data directory (``--data-dir DIR`` or ``$STBENCH_DATA/her2st``)::

    ST-cnts/<section>.tsv.gz              raw UMI counts; rows = spots named "<x>x<y>", columns = genes
    ST-spotfiles/<section>_selection.tsv  columns x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient>/<section>/*.jpg     full-resolution H&E (optional; only C2-C6 in the shared copy)

Sections A1-A6, B1-B6, C1-C6, D1-D6, E1-E3, F1-F3, G1-G3, H1-H3; the patient is the first letter.

A data directory without ``ST-cnts/`` holds sections nothing was measured on (spot files and images
only, e.g. new slides for ``stbench predict``): its sections are listed from ``ST-spotfiles/`` with
``has_counts=False`` and load without counts (their selected spot-file rows are their spots); a run
refuses such a directory. With ``ST-cnts/`` present, a missing count file is an error as before.

Join: the count row "<x>x<y>" matches the spot-file row whose integer array coordinates give the same
id, ``f"{int(x)}x{int(y)}"``. Every counted spot must have a spot-file row (else DataError). Spot-file
rows without counts are dropped and counted in ``Her2Dataset.qc[section]["n_spotfile_rows_without_counts"]``;
counted spots whose row has ``selected == 0`` are dropped too (none in the public files).

Scale: the files give no microns per pixel, so it is estimated per section from the spot pitch. Spots sit
on a 200 µm grid and ``pixel ≈ s · new + offset`` on both axes (``new_x``/``new_y`` are the array positions
refined by the ST spot detector), so one least-squares fit of a common slope s over both axes (over all
selected spot-file rows) gives pixels per 200 µm, and ``mpp = 200 / s``.

Known facts, checked by tests/test_her2.py: 36 sections of 8 patients, 13,620 counted spots, 13,653
spot-file rows of which 33 have no counts (array positions 17x14, 18x20, 11x17, 13x9, 9x9). Patients B-H
are at s ≈ 290 px per step (mpp 0.686-0.689); patient A was imaged at another scale, s ≈ 217-218 px
(mpp 0.917-0.921), so crop sizes must be set in µm, never in pixels.

Parsing the 36 gzipped TSVs takes 15-40 s, so each parsed section is cached as one file of .npy records under
``<cache_dir>/her2/``, keyed by the source files' paths, sizes and mtimes (an edited file is re-parsed);
a cached section loads in a few tens of milliseconds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import warnings
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.atomic import atomic_path
from stbench.data.csr import CSRCounts, csr_problem
from stbench.data.model import Dataset, Section, SectionInfo
from stbench.errors import DataError
from stbench.paths import cache_dir, default_data_dir

FOLDER = "her2st"
SOURCE = "github.com/almaan/her2st data/"
#: spot-file columns the reader needs; ``selected`` is optional
SPOT_COLUMNS = ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y")
SPOT_PITCH_UM = 200.0
SPOT_DIAMETER_UM = 100.0
#: bump when the cached arrays change meaning, so old cache files are ignored
CACHE_VERSION = 3  # 2: stored uncompressed (decompressing cost more than reading); 3: .npy records, no zip

_SPOT_ID = re.compile(r"^(\d+)x(\d+)$")
# What a truncated, corrupt or mis-encoded file raises while it is read (BadGzipFile is an OSError).
def _read_errors() -> tuple:
    import pandas as pd  # only a parse (a cache miss) needs pandas

    return (EOFError, zlib.error, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError)


def _fail(path: Path, problem: str, fix: str) -> DataError:
    """A DataError on one line: the file, the problem, the fix (exception texts may hold newlines)."""
    return DataError(" ".join(f"her2: {path}: {problem}; {fix}".split()))


def _kind(e: BaseException) -> str:
    return "zlib.error" if isinstance(e, zlib.error) else type(e).__name__


def _examples(items, k: int = 3) -> str:
    return ", ".join(repr(str(i)) for i in list(items)[:k])


def open_her2(data_dir: Optional[Path] = None, options=None) -> "Her2Dataset":
    """Open the her2st data directory (``data_dir``, else ``$STBENCH_DATA/her2st`` or the user cache)."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not _has_layout(root) and _has_layout(root / FOLDER):
            root = root / FOLDER  # accept the parent folder that holds one folder per dataset
        tried = [str(root)]
    else:
        root, tried = default_data_dir(FOLDER)
    if not _has_layout(root):
        state = "not found" if not root.is_dir() else "incomplete"
        raise DataError(
            f"her2 data directory {state}: {', '.join(tried)} (expected ST-spotfiles/ and, for measured sections, "
            f"ST-cnts/ from {SOURCE}); pass --data-dir DIR or set $STBENCH_DATA so that $STBENCH_DATA/{FOLDER} exists"
        )
    return Her2Dataset(root)


def _has_layout(root: Path) -> bool:
    # ST-cnts/ may be missing: sections with spot files and images but no counts (stbench predict)
    return (root / "ST-spotfiles").is_dir()


def _natural(name: str):
    """Sort key putting A2 before A10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Her2Dataset(Dataset):
    """The her2st sections of one data directory; see the module docstring for the layout."""

    name = "her2"
    description = "HER2-positive breast cancer, legacy ST (Andersson et al. 2021), 36 sections, 8 patients"

    def __init__(self, root: Path):
        self.root = Path(root)
        #: per loaded section: spot counts before/after the join (``n_spotfile_rows_without_counts``, ...)
        self.qc: dict[str, dict] = {}

    def counts_path(self, name: str) -> Path:
        return self.root / "ST-cnts" / f"{name}.tsv.gz"

    def spots_path(self, name: str) -> Path:
        return self.root / "ST-spotfiles" / f"{name}_selection.tsv"

    def image_path(self, name: str) -> Optional[Path]:
        jpgs = sorted((self.root / "ST-imgs" / name[:1] / name).glob("*.jpg"))
        return jpgs[0] if jpgs else None

    @property
    def measured(self) -> bool:
        """False for a directory of spot files and images only (no ST-cnts/)."""
        return (self.root / "ST-cnts").is_dir()

    def sections(self) -> list[SectionInfo]:
        # Listing only: file names, no parsing.
        if self.measured:
            names = sorted((p.name[: -len(".tsv.gz")] for p in (self.root / "ST-cnts").glob("*.tsv.gz")), key=_natural)
        else:
            names = sorted((p.name[: -len("_selection.tsv")] for p in (self.root / "ST-spotfiles").glob("*_selection.tsv")),
                           key=_natural)
        return [SectionInfo(name=n, patient=n[:1], has_image=self.image_path(n) is not None, has_counts=self.measured)
                for n in names]

    def load_section(self, name: str) -> Section:
        counts_path, spots_path = self.counts_path(name), self.spots_path(name)
        if not self.measured and spots_path.is_file():
            return self._load_without_counts(name)
        if not counts_path.is_file():
            known = " ".join(s.name for s in self.sections()) or "none"
            raise _fail(counts_path, f"count file of section {name!r} missing (sections found: {known})",
                        f"use one of those names or restore the file from {SOURCE}ST-cnts/")
        if not spots_path.is_file():
            raise _fail(spots_path, f"spot file of section {name!r} missing (it holds the spot pixel coordinates)",
                        f"restore it from {SOURCE}ST-spotfiles/")

        cache_file = _cache_file(name, counts_path, spots_path)
        arrays = _read_cache(cache_file)
        if arrays is None:
            arrays = _parse(counts_path, spots_path)
            _write_cache(cache_file, arrays)

        image = self.image_path(name)
        # the CSR arrays as they are: an everyday run then never imports scipy (stbench.data.csr);
        # consistent already (scipy made them, or _read_cache checked them)
        counts = CSRCounts(arrays["data"], arrays["indices"], arrays["indptr"], tuple(arrays["shape"]), validate=False)
        mpp = float(arrays["mpp"])
        qc_keys = ("n_spotfile_rows", "n_spotfile_rows_without_counts", "n_unselected")
        self.qc[name] = {k: int(arrays[k]) for k in qc_keys} | {"px_per_step": float(arrays["px_per_step"])}
        return Section(
            name=name,
            patient=name[:1],
            spot_ids=arrays["spot_ids"],
            genes=arrays["genes"],
            counts=counts,
            grid=arrays["grid"],
            pixel=arrays["pixel"],
            mpp=None if np.isnan(mpp) else mpp,
            lattice="square",
            spot_diameter_um=SPOT_DIAMETER_UM,
            spot_pitch_um=SPOT_PITCH_UM,
            image_path=image,  # looked up afresh: an image may be added after caching
            source_files=tuple(p for p in (counts_path, spots_path, image) if p is not None),
        )


    def _load_without_counts(self, name: str) -> Section:
        """A section with a spot file but no count file: its selected spot-file rows, no counts."""
        spots_path = self.spots_path(name)
        ids, new, pixel, selected = _read_spots(spots_path)
        s = _px_per_step(new[selected], pixel[selected])
        grid = np.array([[int(g) for g in _SPOT_ID.match(i).groups()] for i in ids[selected]], dtype=np.int64)
        image = self.image_path(name)
        return Section(
            name=name, patient=name[:1], spot_ids=ids[selected], genes=np.array([], dtype=str), counts=None,
            grid=grid.reshape(-1, 2), pixel=pixel[selected], mpp=None if s is None else SPOT_PITCH_UM / s,
            lattice="square", spot_diameter_um=SPOT_DIAMETER_UM, spot_pitch_um=SPOT_PITCH_UM, image_path=image,
            source_files=tuple(p for p in (spots_path, image) if p is not None),
        )


# --- parsing -------------------------------------------------------------------------------------------


def _parse(counts_path: Path, spots_path: Path) -> dict:
    """Read, validate and join one section's two files into the arrays that are cached."""
    import pandas as pd
    import scipy.sparse as sp

    spot_ids, genes, values = _read_counts(counts_path)
    row_ids, new, pixel, selected = _read_spots(spots_path)

    pos = pd.Index(row_ids).get_indexer(spot_ids)
    if (pos < 0).any():
        lost = spot_ids[pos < 0]
        raise _fail(spots_path, f"spot ids do not join: {len(lost)} counted spot(s) of {counts_path.name} have no "
                    f"row with those x/y here, e.g. {_examples(lost)}",
                    "the spot file's integer x y must be the array coordinates of the count file's '<x>x<y>' "
                    "row names; use the _selection.tsv that belongs to this section")
    keep = selected[pos]  # counted spots whose spot-file row is deselected are dropped
    pos = pos[keep]

    grid = np.array([[int(g) for g in _SPOT_ID.match(s).groups()] for s in spot_ids[keep]], dtype=np.int64)
    counts = sp.csr_matrix(values[keep])
    s = _px_per_step(new[selected], pixel[selected])
    return {
        "spot_ids": spot_ids[keep],
        "genes": genes,
        "data": counts.data,
        "indices": counts.indices,
        "indptr": counts.indptr,
        "shape": np.array(counts.shape, dtype=np.int64),
        "grid": grid.reshape(-1, 2),
        "pixel": pixel[pos],
        "px_per_step": np.float64(np.nan if s is None else s),
        "mpp": np.float64(np.nan if s is None else SPOT_PITCH_UM / s),
        "n_spotfile_rows": np.int64(len(row_ids)),
        "n_spotfile_rows_without_counts": np.int64(len(row_ids) - len(spot_ids)),
        "n_unselected": np.int64((~keep).sum()),
    }


def _read_counts(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot ids, gene names and the (spots, genes) integer count matrix of one ST-cnts file."""
    import pandas as pd

    fix = f"re-download the file from {SOURCE}ST-cnts/ (a gzipped, tab-separated spots x genes table)"
    try:
        # The header is read by hand because pandas renames duplicated columns (GENE -> GENE.1).
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
        if len(header) < 2:
            sep = " (it looks comma-separated)" if "," in header[0] else ""
            raise _fail(path, f"the header has a single column, so no genes{sep}",
                        f"the file must be tab-separated; {fix}")
        df = pd.read_csv(path, sep="\t", index_col=0, low_memory=False)
    except _read_errors() as e:
        raise _fail(path, f"cannot read the gzipped TSV ({_kind(e)}: {e})", fix) from None

    # Python writes an empty first header field above the ids, R's write.table writes none.
    extra = len(header) - df.shape[1]
    if extra not in (0, 1) or df.shape[1] == 0:
        raise _fail(path, f"the header has {len(header)} fields but the rows {df.shape[1] + 1}", fix)
    genes = np.array(header[extra:], dtype=str)
    spot_ids = np.array(df.index.astype(str), dtype=str)

    dup = pd.Index(genes).duplicated()
    if dup.any():
        raise _fail(path, f"duplicated gene column(s) {_examples(genes[dup])}", f"each gene must appear once; {fix}")
    dup = pd.Index(spot_ids).duplicated()
    if dup.any():
        raise _fail(path, f"duplicated spot id(s) {_examples(spot_ids[dup])}", f"each spot must appear once; {fix}")
    bad = [s for s in spot_ids if not _SPOT_ID.match(s)]
    if bad:
        raise _fail(path, f"malformed spot id(s) {_examples(bad)}",
                    f"row names must be '<x>x<y>' array coordinates; {fix}")

    not_numeric = [j for j, dt in enumerate(df.dtypes) if dt.kind not in "iuf"]
    if not_numeric:
        col = df.iloc[:, not_numeric[0]]
        wrong = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
        where = f"{wrong.iloc[0]!r} at spot {str(wrong.index[0])!r}, " if len(wrong) else ""
        raise _fail(path, f"non-numeric count {where}gene {str(genes[not_numeric[0]])!r} "
                    f"({len(not_numeric)} gene column(s) affected)", f"counts must be integers; {fix}")
    values = df.to_numpy()
    for problem, mask in (
        ("missing (empty or NaN) count", np.isnan(values) if values.dtype.kind == "f" else None),
        ("negative count {}", values < 0),
        ("non-integer count {}", values != np.round(values) if values.dtype.kind == "f" else None),
    ):
        if mask is not None and mask.any():
            i, j = np.argwhere(mask)[0]
            where = f"at spot {str(spot_ids[i])!r}, gene {str(genes[j])!r} ({int(mask.sum())} value(s))"
            raise _fail(path, f"{problem.format(values[i, j].item())} {where}",
                        f"counts must be non-negative integers; {fix}")
    dtype = np.int32 if values.size == 0 or values.max() <= np.iinfo(np.int32).max else np.int64
    return spot_ids, genes, values.astype(dtype)


def _read_spots(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spot ids, (new_x, new_y), (pixel_x, pixel_y) and the selected flag of one ST-spotfiles file."""
    import pandas as pd

    fix = f"expected tab-separated columns {' '.join(SPOT_COLUMNS)} [selected], as in {SOURCE}ST-spotfiles/"
    try:
        df = pd.read_csv(path, sep="\t")
    except _read_errors() as e:
        raise _fail(path, f"cannot read the TSV ({_kind(e)}: {e})", fix) from None
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        sep = " (it looks comma-separated)" if df.shape[1] == 1 and "," in str(df.columns[0]) else ""
        found = " ".join(map(str, df.columns[:10]))
        raise _fail(path, f"missing column(s) {' '.join(missing)}{sep}; found {found}", fix)

    columns = list(SPOT_COLUMNS) + (["selected"] if "selected" in df.columns else [])
    num = df[columns].apply(pd.to_numeric, errors="coerce")
    for c in columns:
        bad = num[c].isna() | (num[c] != num[c].round() if c in ("x", "y", "selected") else False)
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # 1-based, after the header line
            raise _fail(path, f"column {c} has a missing or invalid value {df[c].iloc[line - 2]!r} on line {line}"
                        f"{' (x, y and selected must be integers)' if c in ('x', 'y', 'selected') else ''}", fix)

    ids = np.array([f"{int(x)}x{int(y)}" for x, y in zip(num["x"], num["y"])], dtype=str)
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise _fail(path, f"duplicated spot position(s) x y = {_examples(ids[dup])}",
                    f"each spot must appear once; {fix}")
    selected = (num["selected"] != 0).to_numpy() if "selected" in num else np.ones(len(num), dtype=bool)
    new = num[["new_x", "new_y"]].to_numpy(dtype=np.float64)
    pixel = num[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    return ids, new, pixel, selected


def _px_per_step(new: np.ndarray, pixel: np.ndarray) -> Optional[float]:
    """Pixels per array step: least-squares slope s shared by pixel_x ≈ s·new_x + b and pixel_y ≈ s·new_y + c.

    One slope for both axes because pixels are square; separate offsets because the array origin sits
    anywhere in the image. None when the spots span too little to fit (a single row and column).
    """
    n = len(new)
    design = np.zeros((2 * n, 3))
    design[:n, 0], design[n:, 0] = new[:, 0], new[:, 1]
    design[:n, 1], design[n:, 2] = 1.0, 1.0
    coef, _, rank, _ = np.linalg.lstsq(design, np.concatenate([pixel[:, 0], pixel[:, 1]]), rcond=None)
    return float(coef[0]) if rank == 3 and coef[0] > 0 else None


# --- parse cache ---------------------------------------------------------------------------------------

_CACHE_KEYS = ("spot_ids", "genes", "data", "indices", "indptr", "shape", "grid", "pixel", "px_per_step", "mpp",
               "n_spotfile_rows", "n_spotfile_rows_without_counts", "n_unselected")


def _cache_file(name: str, counts_path: Path, spots_path: Path) -> Path:
    """``<cache_dir>/her2/<section>-<root hash>-<source hash>.npy``: a changed source file gets a new key."""
    root = hashlib.sha1(str(counts_path.resolve().parent.parent).encode()).hexdigest()[:8]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (counts_path, spots_path)]
    source = hashlib.sha1(json.dumps([CACHE_VERSION, stats]).encode()).hexdigest()[:16]
    return cache_dir() / "her2" / f"{name}-{root}-{source}.npy"


def _read_cache(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        # the arrays one after another, each in numpy's .npy format: read without a zip archive's
        # checksum pass (an npz took twice as long, 8 ms a section, on every warm run)
        with open(path, "rb") as fh:
            arrays = {k: np.load(fh, allow_pickle=False) for k in _CACHE_KEYS}
            if fh.read(1):
                return None
        if csr_problem(arrays["indices"], arrays["indptr"], len(arrays["data"]), tuple(arrays["shape"])):
            return None
    except Exception:  # noqa: BLE001 - any unreadable or foreign file: the cache is only a speed-up, re-parse
        return None
    return arrays


def _write_cache(path: Path, arrays: dict) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                for key in _CACHE_KEYS:
                    np.save(fh, np.asarray(arrays[key]), allow_pickle=False)
        # Drop this section's entries for older versions of the same files (and older formats).
        stem = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{stem}-*"):
            if old != path and old.suffix in (".npz", ".npy"):
                old.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"her2: cannot write the parse cache {path} ({e}); the section will be parsed again next time")
