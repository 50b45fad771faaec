"""Generated spatial transcriptomics sections with H&E-like images.

The generative model, per section (everything is deterministic from ``options.seed``):

1. **Layout.** ``spots_per_section`` spots on a square (legacy ST) or hexagonal (Visium) lattice, cut to
   a wobbly elliptical tissue outline that holds exactly that many spots. Hex grids use Visium's array
   convention: ``x = 2 * i + row % 2``, so row neighbours differ by 2 in ``x`` and diagonal ones by 1.
2. **Latent programmes.** ``n_factors`` smooth random fields (Gaussian-filtered white noise, a length
   scale of 2-4 spots) on a physical mesh at half the spot pitch, rescaled so the section's spots span
   [0, 1]. They stand for tissue compartments (tumour, stroma, immune...) and are what ties expression
   to the image.
3. **Expression.** Gene programmes are shared by all patients: log rate = gene baseline + patient gene
   effect (log-normal, small) + ``F @ L`` with sparse non-negative loadings ``L``; the first two panel
   genes of each factor are pure markers of it. Rates are normalised over all genes (a softmax) and
   counts are Poisson with a log-normal library size around a section median drawn between 500 and
   5,000 UMIs. Extra (non-panel) genes carry over half of the UMIs and vary only weakly in space, as
   the rest of the transcriptome does, so normalising by the library over all genes differs from
   normalising by the panel's sum.
4. **Image.** The same fields, interpolated bilinearly to pixels, paint the tissue: nuclei density
   follows factor 0, eosin saturation factor 1, a bluish hue factor 2, and grain factor 3, plus noise.
   A patch cut around a spot therefore shows that spot's programmes, so image methods have real signal
   to learn (and a method that ignores the image can still use spatial smoothness).

Sections differ in outline, fields, library size and noise; patients also differ by their gene effects.
Images are rendered only when a caller asks for them (``Section.image_loader``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from stbench.data.model import Dataset, Section, SectionInfo
from stbench.errors import ConfigError, DataError
from stbench_plugins.synthetic import DIAMETER_PER_PITCH, SyntheticOptions

# Stain colours (RGB), typical of scanned H&E.
BACKGROUND = np.array([240.0, 240.0, 240.0], np.float32)
EOSIN = np.array([230.0, 150.0, 190.0], np.float32)
NUCLEUS = np.array([80.0, 50.0, 140.0], np.float32)
BLUE_SHIFT = np.array([-25.0, -10.0, 20.0], np.float32)  # added at factor 2 = 1

NUCLEI_PER_UM2 = 0.02  # nuclei density at factor 0 = 1 (dense tumour); 3% of that at factor 0 = 0
NUCLEUS_RADIUS_UM = (2.5, 4.0)
STRIP_ROWS = 512  # the image is painted in strips of this many rows, to bound memory
COMPARTMENT_GAIN = 2.0  # logistic gain on the standardised fields: how sharp compartments are
EXTRA_GENE_MASS = 1.5  # extra genes' UMIs over the panel's at mid programmes (55% of all in practice)


def open_synthetic(data_dir, options: Optional[SyntheticOptions] = None) -> "SyntheticDataset":
    """The dataset factory registered as ``synthetic``; ``data_dir`` is ignored (nothing on disk)."""
    if options is None:
        options = SyntheticOptions()
    elif isinstance(options, dict):
        options = SyntheticOptions(**options)
    return SyntheticDataset(options)


def _check(o: SyntheticOptions) -> None:
    """Raise ConfigError naming the option for values the generator cannot honour."""
    positive = ["n_patients", "sections_per_patient", "spots_per_section", "n_genes", "n_factors"]
    for name in positive:
        if int(getattr(o, name)) < 1:
            raise ConfigError(f"dataset_options.{name}={getattr(o, name)!r}: must be at least 1")
    if o.n_extra_genes < 0:
        raise ConfigError(f"dataset_options.n_extra_genes={o.n_extra_genes!r}: must be 0 or more")
    if o.lattice not in DIAMETER_PER_PITCH:
        raise ConfigError(f"dataset_options.lattice={o.lattice!r}: use one of {sorted(DIAMETER_PER_PITCH)}")
    if not o.pitch_um() > 0:
        raise ConfigError(f"dataset_options.spot_pitch_um={o.spot_pitch_um!r}: must be positive")
    if not o.mpp > 0:
        raise ConfigError(f"dataset_options.mpp={o.mpp!r}: must be positive")
    if o.seed < 0:  # numpy's SeedSequence takes non-negative integers only
        raise ConfigError(f"dataset_options.seed={o.seed!r}: must be 0 or more")


def _gene_names(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


@dataclass
class _Scene:
    """The latent truth of one section, in a physical frame whose origin is the image's top-left pixel."""

    grid: np.ndarray  # (N, 2) int64 lattice coordinates (x = column, y = row)
    um: np.ndarray  # (N, 2) spot centres (x, y) in µm
    factors: np.ndarray  # (N, K) latent programmes at the spots, in [0, 1]
    fields: np.ndarray  # (K, ny, nx) float32 the same programmes on a mesh of step `mesh_um`
    mesh_um: float
    image_shape: tuple  # (H, W) pixels


def _lattice_step(lattice: str) -> np.ndarray:
    """Distance (x, y), in pitches, of one grid unit: hex rows are sqrt(3)/2 apart, x counts half pitches."""
    return np.array([1.0, 1.0]) if lattice == "square" else np.array([0.5, math.sqrt(3) / 2])


def _layout(n: int, lattice: str, outline: bool, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) lattice coordinates, row-major, with min x, min y at (or next to) 0."""
    step = _lattice_step(lattice)
    if not outline:
        cols = math.ceil(math.sqrt(n))
        row, col = np.divmod(np.arange(n), cols)
        x = col if lattice == "square" else 2 * col + row % 2
        return np.stack([x, row], axis=1).astype(np.int64)
    # Candidates on a rectangle ~2.5x the tissue area; keep the n most central under a wobbly
    # elliptical radius, so the outline is tissue-like and the count is exact.
    aspect = rng.uniform(0.75, 1.33)
    spot_area = 1.0 if lattice == "square" else math.sqrt(3) / 2  # pitch² of tissue per spot
    radius = math.sqrt(n * spot_area / math.pi)  # pitches
    a, b = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    hx, hy = math.ceil(1.4 * a / step[0]) + 1, math.ceil(1.4 * b / step[1]) + 1
    y, x = np.mgrid[-hy : hy + 1, -hx : hx + 1].reshape(2, -1)
    if lattice == "hex":
        keep = (x - y) % 2 == 0  # Visium: x and row have the same parity
        x, y = x[keep], y[keep]
    px, py = x * step[0] / a, y * step[1] / b
    theta = np.arctan2(py, px)
    phase = rng.uniform(0, 2 * np.pi, 2)
    wobble = 1 + 0.12 * np.sin(2 * theta + phase[0]) + 0.08 * np.sin(3 * theta + phase[1])
    chosen = np.argsort(np.hypot(px, py) / wobble, kind="stable")[:n]
    x, y = x[chosen], y[chosen]
    dx, dy = x.min(), y.min()
    if lattice == "hex" and (dx - dy) % 2:  # shift x and y by amounts of equal parity: keeps hex parity
        dx -= 1
    x, y = x - dx, y - dy
    order = np.lexsort((x, y))
    return np.stack([x[order], y[order]], axis=1).astype(np.int64)


def _lerp_index(coord: np.ndarray, n: int):
    """Left neighbour index and weight for linear interpolation on 0..n-1, clamped at the ends."""
    i0 = np.clip(np.floor(coord).astype(np.int64), 0, n - 2)
    return i0, np.clip(coord - i0, 0.0, 1.0).astype(np.float32)


def _upsample(mesh: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear values of a 2-D mesh at the outer product of fractional rows and columns."""
    i0, wy = _lerp_index(rows, mesh.shape[0])
    j0, wx = _lerp_index(cols, mesh.shape[1])
    tmp = mesh[i0] * (1 - wy)[:, None] + mesh[i0 + 1] * wy[:, None]
    return tmp[:, j0] * (1 - wx) + tmp[:, j0 + 1] * wx


class SyntheticDataset(Dataset):
    """Generated sections ``P1S1, P1S2, P2S1, ...``; see the module docstring for the model."""

    name = "synthetic"
    description = "generated slides with spatial expression and H&E-like images; ships with stbench"

    def __init__(self, options: SyntheticOptions):
        _check(options)
        self.options = o = options
        self.panel = _gene_names("SG", o.n_genes)
        self.genes = np.array(self.panel + _gene_names("XG", o.n_extra_genes))
        self._sections = {
            f"P{p + 1}S{s + 1}": (p, s) for p in range(o.n_patients) for s in range(o.sections_per_patient)
        }
        self._image_cache: dict = {}  # the last rendered image only

        # Programmes shared by all patients: gene baselines and sparse non-negative loadings.
        rng = np.random.default_rng([o.seed, 0])
        n_all, k = len(self.genes), o.n_factors
        self._log_base = rng.normal(0.0, 1.0, n_all)
        loadings = np.minimum(rng.gamma(2.0, 0.75, (k, n_all)), 2.5) * (rng.random((k, n_all)) < 0.4)
        # Extra genes, over half of the UMIs, vary weakly in space (like housekeeping genes): otherwise the
        # per-spot library they dominate would swamp panel genes' programmes after normalisation.
        loadings[:, o.n_genes :] *= 0.3
        for f in range(k):  # pure, well-expressed markers: panel genes 2f and 2f+1 follow factor f only
            markers = [g for g in (2 * f, 2 * f + 1) if g < o.n_genes]
            loadings[:, markers] = 0.0
            loadings[f, markers] = 3.0  # above every other loading (capped at 2.5)
            self._log_base[markers] = np.maximum(self._log_base[markers], 0.0)
        if o.n_extra_genes:  # scale extra genes to EXTRA_GENE_MASS x the panel's UMIs at mid programmes
            typical = np.exp(self._log_base + 0.5 * loadings.sum(axis=0))
            ratio = typical[o.n_genes :].sum() / typical[: o.n_genes].sum()
            self._log_base[o.n_genes :] += math.log(EXTRA_GENE_MASS / ratio)
        self.loadings = loadings  # (n_factors, all genes): ground truth, for tests and diagnostics
        self._patient_effect = [
            np.random.default_rng([o.seed, 1, p]).normal(0.0, 0.25, n_all) for p in range(o.n_patients)
        ]

    # --- Dataset interface -------------------------------------------------------------------------

    def sections(self) -> list[SectionInfo]:
        images = self.options.images
        return [SectionInfo(name, f"P{p + 1}", has_image=images) for name, (p, _) in self._sections.items()]

    def default_panel(self) -> list[str]:
        return list(self.panel)

    def load_section(self, name: str) -> Section:
        o = self.options
        p, s = self._where(name)
        scene = self._scene(p, s)
        rng = np.random.default_rng([o.seed, 3, p, s])
        n = len(scene.grid)

        log_rate = self._log_base + self._patient_effect[p] + scene.factors @ self.loadings
        rates = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
        rates /= rates.sum(axis=1, keepdims=True)
        median_umis = math.exp(rng.uniform(math.log(500), math.log(5000)))
        library = median_umis * np.exp(rng.normal(0.0, 0.4, n))
        counts = rng.poisson(rates * library[:, None]).astype(np.int32)
        if (p, s) == (0, 0):
            if o.constant_gene:
                counts[:, o.n_genes - 1] = 0
            if o.zero_spot:
                counts[n // 2] = 0

        pitch = o.pitch_um()
        renderer = _Renderer(scene, o.mpp, pitch, [o.seed, 4, p, s], self._image_cache, name)
        return Section(
            name=name,
            patient=f"P{p + 1}",
            spot_ids=np.array([f"{x}x{y}" for x, y in scene.grid.tolist()]),
            genes=self.genes.copy(),
            counts=sp.csr_matrix(counts),
            grid=scene.grid,
            pixel=scene.um / o.mpp,
            mpp=float(o.mpp),
            lattice=o.lattice,
            spot_diameter_um=DIAMETER_PER_PITCH[o.lattice] * pitch,
            spot_pitch_um=pitch,
            image_loader=renderer if o.images else None,
            # the image is a pure function of the options and the section: that is its cache identity
            image_key=f"synthetic:{name}:{sorted(vars(o).items())}" if o.images else None,
        )

    # --- ground truth --------------------------------------------------------------------------------

    def factors(self, name: str) -> np.ndarray:
        """(N, n_factors) latent programmes of a section's spots, in ``load_section``'s spot order."""
        return self._scene(*self._where(name)).factors

    # --- internals -----------------------------------------------------------------------------------

    def _where(self, name: str):
        if name not in self._sections:
            valid = ", ".join(self._sections)
            raise DataError(f"synthetic dataset has no section {name!r}; sections: {valid}")
        return self._sections[name]

    def _scene(self, p: int, s: int) -> _Scene:
        o = self.options
        rng = np.random.default_rng([o.seed, 2, p, s])
        pitch = o.pitch_um()
        grid = _layout(o.spots_per_section, o.lattice, o.outline, rng)
        step_um = pitch * _lattice_step(o.lattice)
        margin_um = pitch  # one pitch of background around the outermost spots
        um = margin_um + grid * step_um
        width_um, height_um = um.max(axis=0) + margin_um
        image_shape = (int(math.ceil(height_um / o.mpp)) + 1, int(math.ceil(width_um / o.mpp)) + 1)

        # Smooth fields on a mesh at half the pitch covering the whole image; physical, so isotropic on
        # either lattice. One length scale per programme, 2-4 spots, like tissue compartments.
        mesh_um = pitch / 2
        ny = int(math.ceil(image_shape[0] * o.mpp / mesh_um)) + 2
        nx = int(math.ceil(image_shape[1] * o.mpp / mesh_um)) + 2
        scales = rng.uniform(2.0, 4.0, o.n_factors) * pitch / mesh_um
        fields = rng.standard_normal((o.n_factors, ny, nx)).astype(np.float32)
        at_spots = np.empty((len(grid), o.n_factors))
        for f in range(o.n_factors):
            fields[f] = ndimage.gaussian_filter(fields[f], scales[f], mode="reflect")
            at_spots[:, f] = ndimage.map_coordinates(fields[f], um[:, ::-1].T / mesh_um, order=1)
        # A logistic of the standardised field makes compartments mostly on or off, as tissue regions
        # are, then a rescale makes the spots span [0, 1]. The mesh gets the same map, so pixels
        # between spots interpolate their neighbours' programmes.
        mean, std = at_spots.mean(axis=0), at_spots.std(axis=0)
        std = np.where(std > 0, std, 1.0)

        def squash(v, m, s):  # the logistic, written with tanh so it cannot overflow
            return 0.5 + 0.5 * np.tanh(0.5 * COMPARTMENT_GAIN * (v - m) / s)

        at_spots = squash(at_spots, mean, std)
        lo, hi = at_spots.min(axis=0), at_spots.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        factors = (at_spots - lo) / span
        for f in range(o.n_factors):
            fields[f] = (squash(fields[f], mean[f], std[f]) - lo[f]) / span[f]
        return _Scene(grid, um, factors, fields, mesh_um, image_shape)


class _Renderer:
    """``Section.image_loader``: paints the section's image on demand, caching the last one rendered."""

    def __init__(self, scene: _Scene, mpp: float, pitch: float, seed, cache: dict, key: str):
        self.scene, self.mpp, self.pitch, self.seed = scene, mpp, pitch, seed
        self.cache, self.key = cache, key

    def __call__(self) -> np.ndarray:
        if self.cache.get("key") != self.key:
            self.cache.clear()  # drop the previous image before painting the next
            image = self._render()
            image.flags.writeable = False  # shared through the cache
            self.cache.update(key=self.key, image=image)
        return self.cache["image"]

    def _render(self) -> np.ndarray:
        sc, mpp = self.scene, self.mpp
        H, W = sc.image_shape
        rng = np.random.default_rng(self.seed)
        k = len(sc.fields)
        to_mesh = mpp / sc.mesh_um  # pixel index -> mesh index

        # Tissue = within 0.75 pitch of a spot: covers the lattice with a scalloped edge.
        ny, nx = sc.fields.shape[1:]
        nodes = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), axis=-1).reshape(-1, 2) * sc.mesh_um
        dist, _ = cKDTree(sc.um).query(nodes, distance_upper_bound=2 * self.pitch)
        dist = np.minimum(dist, 2 * self.pitch).reshape(ny, nx).astype(np.float32)
        tissue_um = 0.75 * self.pitch

        # Nuclei: an inhomogeneous Poisson process by thinning, density following factor 0.
        n_cand = rng.poisson(NUCLEI_PER_UM2 * H * W * mpp * mpp)
        xy = rng.uniform(0, 1, (n_cand, 2)) * (W, H)
        radius = rng.uniform(*NUCLEUS_RADIUS_UM, n_cand) / mpp
        accept = rng.random(n_cand)
        at = (xy[:, 1] * to_mesh, xy[:, 0] * to_mesh)
        f0 = np.clip(ndimage.map_coordinates(sc.fields[0], at, order=1, mode="nearest"), 0, 1)
        in_tissue = ndimage.map_coordinates(dist, at, order=1, mode="nearest") < tissue_um
        keep = in_tissue & (accept < 0.03 + 0.97 * f0)
        nuclei = _stamp_discs(xy[keep].astype(np.int64), np.maximum(radius[keep], 0.5), H, W)

        image = np.empty((H, W, 3), np.uint8)
        cols = np.arange(W) * to_mesh
        for y0 in range(0, H, STRIP_ROWS):
            y1 = min(H, y0 + STRIP_ROWS)
            rows = np.arange(y0, y1) * to_mesh

            def factor(f):  # the programme's map on this strip, 0.5 where the section has fewer factors
                return np.clip(_upsample(sc.fields[f], rows, cols), 0, 1) if f < k else np.float32(0.5)

            tissue = _upsample(dist, rows, cols) < tissue_um
            saturation = 0.5 + 0.5 * factor(1)
            blue = factor(2)
            half = rng.standard_normal(((y1 - y0 + 1) // 2, (W + 1) // 2), dtype=np.float32)
            grain = 1 + np.repeat(np.repeat(half, 2, 0), 2, 1)[: y1 - y0, :W] * (0.03 + 0.15 * factor(3))
            noise = 3 * rng.standard_normal((y1 - y0, W), dtype=np.float32)
            nuc = nuclei[y0:y1]
            for c in range(3):
                pink = BACKGROUND[c] + saturation * (EOSIN[c] - BACKGROUND[c])
                tissue_c = (pink + blue * BLUE_SHIFT[c]) * grain
                value = np.where(nuc, NUCLEUS[c], np.where(tissue, tissue_c, BACKGROUND[c])) + noise
                image[y0:y1, :, c] = np.clip(value, 0, 255)
        return image


def _stamp_discs(centres: np.ndarray, radius: np.ndarray, H: int, W: int) -> np.ndarray:
    """(H, W) bool mask of discs at integer (x, y) centres with per-disc radii in pixels."""
    mask = np.zeros(H * W, bool)
    if len(centres) == 0:
        return mask.reshape(H, W)
    r = int(math.ceil(radius.max()))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1].reshape(2, -1)
    offset = np.hypot(dx, dy)
    for start in range(0, len(centres), 50_000):  # chunks bound the (discs x offsets) temporaries
        c, rad = centres[start : start + 50_000], radius[start : start + 50_000]
        xs, ys = c[:, :1] + dx, c[:, 1:] + dy
        ok = (offset <= rad[:, None]) & (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        mask[(ys * W + xs)[ok]] = True
    return mask.reshape(H, W)
