"""Gene panels and expression normalisation: from a raw :class:`Section` to a :class:`Slide`.

Normalisations (METHODS.md §1.3; the benchmark names one, never mixed):

* ``cpm_log1p`` (default): counts per million over **all** measured genes, then ln(1 + x).
* ``cp10k_panel_log1p``: counts per 10,000 over the panel genes only, then ln(1 + x) (TRIPLEX/PH2ST code).
* ``log2_raw``: log2(1 + raw count), no library-size normalisation (HyperST).

A spot with zero counts has no library size: its normalised expression is 0 (not NaN, not inf).

Panels: a fixed list (the benchmark's file, or the dataset's own panel), or genes computed on the
**training sections only**: highly variable genes (Seurat-flavour dispersion), or HyperST's high-mean
high-variance genes (METHODS.md §1.4).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from stbench.data.csr import as_scipy, dense_columns, row_sums
from stbench.data.model import Section, Slide
from stbench.errors import ConfigError, DataError


# Counts come in CSR form (stbench.data.csr): these read its arrays with numpy alone, so that the
# everyday run never imports scipy.


def _library_scaled(dense_counts: np.ndarray, library: np.ndarray, target: float) -> np.ndarray:
    # Guard zero-count spots: their scale factor is 0, so they normalise to 0 instead of NaN.
    scale = np.divide(target, library, out=np.zeros_like(library, dtype=np.float64), where=library > 0)
    return dense_counts * scale[:, None]


def cpm_log1p(counts_all, panel_cols: np.ndarray) -> np.ndarray:
    return np.log1p(_library_scaled(dense_columns(counts_all, panel_cols), row_sums(counts_all), 1e6))


def cp10k_panel_log1p(counts_all, panel_cols: np.ndarray) -> np.ndarray:
    panel = dense_columns(counts_all, panel_cols)
    return np.log1p(_library_scaled(panel, panel.sum(axis=1), 1e4))


def log2_raw(counts_all, panel_cols: np.ndarray) -> np.ndarray:
    return np.log2(1.0 + dense_columns(counts_all, panel_cols))


NORMALISATIONS: dict[str, Callable[[object, np.ndarray], np.ndarray]] = {
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


def normaliser(name: str) -> Callable[[object, np.ndarray], np.ndarray]:
    if name not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {name!r} (key normalisation); choose one of {', '.join(NORMALISATIONS)}")
    return NORMALISATIONS[name]


#: target smoothings (RunConfig.smoothing); every one but "none" is labelled leaky in tables
SMOOTHINGS = ("none", "grid3x3")


def check_smoothing(name: str) -> str:
    if name not in SMOOTHINGS:
        raise ConfigError(f"unknown smoothing {name!r} (key smoothing); choose one of {', '.join(SMOOTHINGS)}")
    return name


def smooth_grid3x3(expr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Each spot's expression replaced by the unweighted mean over the spots present within ±1 grid
    column and row, itself included (at most 9; TRIPLEX / PH2ST code, METHODS.md §1.3)."""
    grid = np.asarray(grid, dtype=np.int64)
    where = {(int(x), int(y)): i for i, (x, y) in enumerate(grid)}
    total = np.zeros_like(expr, dtype=np.float64)
    count = np.zeros(len(expr), dtype=np.float64)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            nb = np.array([where.get((int(x) + dx, int(y) + dy), -1) for x, y in grid], dtype=np.int64)
            present = nb >= 0
            total[present] += expr[nb[present]]
            count[present] += 1
    return (total / count[:, None]).astype(expr.dtype)


def make_slide(section: Section, genes: Sequence[str], normalisation: str, niche: bool = False,
               smoothing: str = "none") -> Slide:
    """Restrict a section to ``genes`` (in that order) and normalise it. ``niche``: also compute each
    spot's niche expression profile (:func:`niche_expression`). ``smoothing``: "grid3x3" smooths the
    normalised expression (:func:`smooth_grid3x3`; the niche profiles are left as they are)."""
    position = section.gene_index
    cols = np.array([position.get(str(g), -1) for g in genes], dtype=np.int64)
    missing = [g for g, c in zip(genes, cols) if c < 0]
    if missing:
        raise DataError(
            f"gene panel names {len(missing)} gene(s) absent from section {section.name} "
            f"(e.g. {', '.join(missing[:5])}); use a panel of genes measured in every section "
            "(key panel) or check the gene symbols"
        )
    cols = cols.astype(np.int64)
    expr = normaliser(normalisation)(section.counts, cols).astype(np.float32)
    if check_smoothing(smoothing) == "grid3x3":
        expr = smooth_grid3x3(expr, section.grid)
    niche_expr, niche_complete = niche_expression(section, cols, normalisation) if niche else (None, None)
    return Slide(
        niche_expr=niche_expr,
        niche_complete=niche_complete,
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


#: lattice neighbours of a complete niche: the 3×3 block on a square lattice, the hex rosette on Visium
NICHE_SIZE = {"square": 8, "hex": 6}


def niche_expression(section: Section, panel_cols: np.ndarray, normalisation: str) -> tuple[np.ndarray, np.ndarray]:
    """Each spot's niche profile: the benchmark's normalisation applied to the mean raw count vector of
    the spot and its lattice neighbours (HyperST, METHODS.md §7.1: log2(1 + mean raw counts) with
    ``log2_raw``), and whether the niche is complete (every lattice neighbour present).

    Returns ``(expr (N, G) float32, complete (N,) bool)``.
    """
    import scipy.sparse as sp

    from stbench.images.geometry import lattice_neighbours

    neighbours = lattice_neighbours(section.grid, section.lattice)
    rows = np.concatenate([np.full(len(nb) + 1, i) for i, nb in enumerate(neighbours)])
    cols = np.concatenate([np.r_[i, nb] for i, nb in enumerate(neighbours)])
    weights = np.concatenate([np.full(len(nb) + 1, 1.0 / (len(nb) + 1)) for nb in neighbours])
    n = section.n_spots
    average = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    mean_counts = sp.csr_matrix(average @ as_scipy(section.counts).astype(np.float64))
    expr = normaliser(normalisation)(mean_counts, np.asarray(panel_cols)).astype(np.float32)
    complete = np.array([len(nb) == NICHE_SIZE[section.lattice] for nb in neighbours], dtype=bool)
    return expr, complete


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
    import scipy.sparse as sp

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
        counts = as_scipy(s.counts)
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


def top_expressed_genes(sections: Sequence[Section], n_top: int, candidates: "set[str] | None" = None) -> list[str]:
    """The ``n_top`` genes with the highest total raw count over the given (training) sections, among
    the genes measured in all of them (and ``candidates``); ties by name; in that order.

    The PH2ST code's panel (``gene_type: mean``) is the first 785 of its top 1,000 by expression, i.e.
    its top 785 (METHODS.md §1.4, AMB-3); the code computed it on every section, here it is computed on
    each fold's training sections, as every computed panel is."""
    common = set(sections[0].genes)
    for s in sections[1:]:
        common &= set(s.genes)
    if candidates is not None:
        common &= set(candidates)
    genes = sorted(str(g) for g in common)
    if n_top > len(genes):
        raise ConfigError(f"panel.top_expressed asks for {n_top} genes but only {len(genes)} are measured in every training section")
    total = np.zeros(len(genes))
    for s in sections:
        index = {str(g): i for i, g in enumerate(s.genes)}
        total += dense_columns(s.counts, [index[g] for g in genes]).sum(axis=0)
    order = sorted(range(len(genes)), key=lambda i: (-total[i], genes[i]))
    return [genes[i] for i in order[:n_top]]


#: HyperST drops mitochondrial and ribosomal genes by these name prefixes (METHODS.md §1.4 step 3)
HMHVG_EXCLUDED_PREFIXES = ("MT", "mt", "RP", "rp")


def high_mean_high_variance_genes(sections: Sequence[Section], n_top: int = 200, per_section_hvg: int = 2000,
                                  candidates: "set[str] | None" = None) -> list[str]:
    """HyperST's top-``n_top`` HMHVG panel (METHODS.md §1.4), computed on the given (training) sections.

    1. genes measured in every section (and among ``candidates``);
    2. the union of each section's ``per_section_hvg`` highly variable genes (median-library
       normalisation, log1p, Seurat-flavour dispersion: :func:`highly_variable_genes` on that section);
    3. without genes whose name starts with MT, mt, RP or rp;
    4. each gene's mean and standard deviation of the raw counts pooled over all spots;
    5. the intersection of the top-n by mean and the top-n by std for the smallest n that gives at
       least ``n_top`` genes (the project's deterministic reading of HyperST's hand-tuned n, AMB-4);
       when that intersection is larger, the ``n_top`` with the smallest mean-rank + std-rank (ties by
       name). Returned in alphabetical order, as HyperST sorts its list.
    """
    common = set(sections[0].genes)
    for s in sections[1:]:
        common &= set(s.genes)
    if candidates is not None:
        common &= set(candidates)
    union: set = set()
    for s in sections:
        k = min(per_section_hvg, len(common))
        union |= set(highly_variable_genes([s], k, candidates=common))
    genes = sorted(str(g) for g in union if not str(g).startswith(HMHVG_EXCLUDED_PREFIXES))
    if n_top > len(genes):
        raise ConfigError(f"panel.hmhvg asks for {n_top} genes but only {len(genes)} highly variable, non-MT/RP "
                          "genes are measured in every training section")
    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    n = 0
    for s in sections:
        index = {g: i for i, g in enumerate(s.genes)}
        x = dense_columns(s.counts, [index[g] for g in genes])
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
        n += x.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0) * n / max(n - 1, 1))
    # 0-based ranks, highest first, ties by name (genes are sorted): stable sorts on -value
    rank_mean = np.empty(len(genes), dtype=np.int64)
    rank_mean[np.argsort(-mean, kind="stable")] = np.arange(len(genes))
    rank_std = np.empty(len(genes), dtype=np.int64)
    rank_std[np.argsort(-std, kind="stable")] = np.arange(len(genes))
    # a gene is in both top-n lists once n > max(its ranks); the smallest n giving n_top genes:
    enters = np.maximum(rank_mean, rank_std)
    n_needed = int(np.sort(enters)[n_top - 1]) + 1
    chosen = [i for i in range(len(genes)) if enters[i] < n_needed]
    chosen.sort(key=lambda i: (rank_mean[i] + rank_std[i], genes[i]))
    return sorted(genes[i] for i in chosen[:n_top])
