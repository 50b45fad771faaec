"""Gene panels and expression normalisation: from a raw :class:`Section` to a :class:`Slide`.

Normalisations (METHODS.md §1.3; the benchmark names one, never mixed):

* ``cpm_log1p`` (default): counts per million over **all** measured genes, then ln(1 + x).
* ``cp10k_panel_log1p``: counts per 10,000 over the panel genes only, then ln(1 + x) (TRIPLEX/PH2ST code).
* ``log2_raw``: log2(1 + raw count), no library-size normalisation (HyperST).

A spot with zero counts has no library size: its normalised expression is 0 (not NaN, not inf).

Panels: a fixed list (the benchmark's file, or the dataset's own panel), or highly variable genes
computed on the **training sections only** (Seurat-flavour dispersion).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from stbench.data.model import Section, Slide
from stbench.errors import ConfigError, DataError


def _library_scaled(counts: sp.csr_matrix, library: np.ndarray, target: float) -> np.ndarray:
    # Guard zero-count spots: their scale factor is 0, so they normalise to 0 instead of NaN.
    scale = np.divide(target, library, out=np.zeros_like(library, dtype=np.float64), where=library > 0)
    return np.asarray(counts.multiply(scale[:, None]).todense(), dtype=np.float64)


def cpm_log1p(counts_all: sp.csr_matrix, panel_cols: np.ndarray) -> np.ndarray:
    library = np.asarray(counts_all.sum(axis=1)).ravel().astype(np.float64)
    return np.log1p(_library_scaled(counts_all[:, panel_cols], library, 1e6))


def cp10k_panel_log1p(counts_all: sp.csr_matrix, panel_cols: np.ndarray) -> np.ndarray:
    panel = counts_all[:, panel_cols]
    library = np.asarray(panel.sum(axis=1)).ravel().astype(np.float64)
    return np.log1p(_library_scaled(panel, library, 1e4))


def log2_raw(counts_all: sp.csr_matrix, panel_cols: np.ndarray) -> np.ndarray:
    return np.log2(1.0 + np.asarray(counts_all[:, panel_cols].todense(), dtype=np.float64))


NORMALISATIONS: dict[str, Callable[[sp.csr_matrix, np.ndarray], np.ndarray]] = {
    "cpm_log1p": cpm_log1p,
    "cp10k_panel_log1p": cp10k_panel_log1p,
    "log2_raw": log2_raw,
}

#: what the numbers mean, saved with predictions
UNITS = {
    "cpm_log1p": "ln(1 + counts per million over all genes)",
    "cp10k_panel_log1p": "ln(1 + counts per 10,000 over panel genes)",
    "log2_raw": "log2(1 + raw counts)",
}


def normaliser(name: str) -> Callable[[sp.csr_matrix, np.ndarray], np.ndarray]:
    if name not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {name!r} (key normalisation); choose one of {', '.join(NORMALISATIONS)}")
    return NORMALISATIONS[name]


def make_slide(section: Section, genes: Sequence[str], normalisation: str) -> Slide:
    """Restrict a section to ``genes`` (in that order) and normalise it."""
    position = {g: i for i, g in enumerate(np.asarray(section.genes, dtype=str).tolist())}
    cols = np.array([position.get(str(g), -1) for g in genes], dtype=np.int64)
    missing = [g for g, c in zip(genes, cols) if c < 0]
    if missing:
        raise DataError(
            f"gene panel names {len(missing)} gene(s) absent from section {section.name} "
            f"(e.g. {', '.join(missing[:5])}); use a panel of genes measured in every section "
            "(key panel) or check the gene symbols"
        )
    cols = cols.astype(np.int64)
    counts = section.counts if sp.issparse(section.counts) else sp.csr_matrix(section.counts)
    expr = normaliser(normalisation)(sp.csr_matrix(counts), cols).astype(np.float32)
    return Slide(
        name=section.name,
        patient=section.patient,
        spot_ids=np.asarray(section.spot_ids),
        genes=np.asarray(list(genes)),
        expr=expr,
        grid=section.grid,
        pixel=section.pixel,
        mpp=section.mpp,
        lattice=section.lattice,
        spot_diameter_um=section.spot_diameter_um,
        spot_pitch_um=section.spot_pitch_um,
        section=section,
    )


def read_panel_file(path) -> list[str]:
    """A panel file: one gene symbol per line (``#`` comments allowed), or a numpy ``.npy`` array."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"gene panel file not found: {path} (key panel.file)")
    if path.suffix == ".npy":
        genes = [str(g) for g in np.load(path, allow_pickle=True)]
    else:
        genes = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        genes = [g for g in genes if g and not g.startswith("#")]
    if not genes:
        raise ConfigError(f"gene panel file {path} lists no genes")
    if len(set(genes)) != len(genes):
        raise ConfigError(f"gene panel file {path} lists a gene twice")
    return genes


def highly_variable_genes(sections: Sequence[Section], n_top: int, n_bins: int = 20,
                          candidates: "set[str] | None" = None) -> list[str]:
    """Seurat-flavour HVGs computed on the given (training) sections only.

    Genes measured in every section; each spot normalised to the median library size, log1p; per
    gene mean and dispersion (variance / mean) pooled over spots; dispersions z-scored within
    ``n_bins`` bins of mean expression; the ``n_top`` highest, ties broken by name. ``candidates``
    restricts the choice (the harness passes the genes measured in every section of the run).
    """
    common = set(sections[0].genes)
    for s in sections[1:]:
        common &= set(s.genes)
    if candidates is not None:  # e.g. genes measured in every section, so test slides have them too
        common &= set(candidates)
    genes = sorted(common)
    if n_top > len(genes):
        raise ConfigError(f"panel.hvg asks for {n_top} genes but only {len(genes)} are measured in every training section")
    blocks = []
    for s in sections:
        index = {g: i for i, g in enumerate(s.genes)}
        cols = np.array([index[g] for g in genes])
        counts = sp.csr_matrix(s.counts)
        library = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        target = float(np.median(library[library > 0])) if np.any(library > 0) else 1.0
        scale = np.divide(target, library, out=np.zeros_like(library), where=library > 0)
        # stays sparse (log1p(0) = 0): all-gene matrices of real sections would be GBs dense
        blocks.append(sp.csr_matrix(counts[:, cols].multiply(scale[:, None])).log1p())
    x = sp.vstack(blocks).tocsc()
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * n / (n - 1) if n > 1 else np.zeros_like(mean)
    dispersion = np.log(np.divide(var, mean, out=np.zeros_like(var), where=mean > 0) + 1e-12)
    edges = np.quantile(mean, np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.digitize(mean, edges)
    z = np.zeros_like(dispersion)
    for b in np.unique(bins):
        sel = bins == b
        sd = dispersion[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        z[sel] = (dispersion[sel] - dispersion[sel].mean()) / sd if sd > 0 else 0.0
    z[mean <= 0] = -np.inf
    order = sorted(range(len(genes)), key=lambda i: (-z[i], genes[i]))
    return [genes[i] for i in order[:n_top]]
