"""A spot lattice laid over the tissue of a plain H&E image, for ``stbench predict --image``.

A pathologist with only a slide has no spots: this module makes them. The tissue is found on a
thumbnail (longest side :data:`THUMBNAIL_PX`): the saturation of each pixel (HSV S = (max − min) / max of
R, G, B: stain is coloured, glass and background are grey-white) is thresholded with Otsu's method, and
so is its brightness (HSV V = max of R, G, B), because a stain haze on the glass can be as coloured as
pale tissue but is much brighter. Both are median-filtered first (:data:`SMOOTH_PX`, so pale loose
tissue between stained nuclei is not lost); tissue is saturated *and* dark; the mask is closed, its
holes filled and specks smaller than :data:`MIN_REGION` of the tissue removed. A square or hexagonal
lattice with the model's spot pitch (in µm, converted with the image's µm per pixel) is laid over the
whole image, and the spots whose disc lies mostly on tissue (:data:`MIN_ON_TISSUE`) are kept.

Grid coordinates follow the data model's conventions, so lattice neighbours, niches and the 5×5
neighbour grid behave as on measured slides: ``square`` (legacy ST) uses column and row; ``hex``
(Visium) doubles the column index (0, 2, 4 … on even rows, 1, 3, 5 … on odd rows) with rows
pitch·√3/2 apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stbench.data.model import Section
from stbench.errors import ConfigError, DataError

#: longest side of the thumbnail the tissue is found on
THUMBNAIL_PX = 1024
#: median filter and closing sizes on the thumbnail, in thumbnail pixels
SMOOTH_PX = 9
CLOSE_PX = 7
#: a connected piece of tissue smaller than this share of all tissue is dropped (dust, pen marks)
MIN_REGION = 0.002
#: a spot is kept when at least this share of its disc's bounding square is tissue
MIN_ON_TISSUE = 0.5
LATTICES = ("square", "hex")


def read_thumbnail(path: Path, max_side: int = THUMBNAIL_PX) -> tuple[np.ndarray, float, tuple[int, int]]:
    """``(rgb, scale, (width, height))``: an RGB thumbnail whose longest side is at most ``max_side``,
    thumbnail pixels per full-resolution pixel, and the full-resolution size. Read through the region
    readers (:mod:`stbench.images.region`): a pyramidal whole-slide image from a pyramid level, a JPEG at
    a reduced DCT scale, so a whole slide is never held at full resolution."""
    from stbench.images import region

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} (option --image); give the path of an H&E image file")
    image = _image_only(path)
    try:
        size = region.image_size(image)
        rgb, scale = region.read_thumbnail(image, max_side)
    except DataError as exc:
        raise DataError(f"{exc} (option --image); give a JPEG, PNG or (pyramidal) TIFF H&E image") from None
    return rgb, scale, tuple(int(v) for v in size)


def _image_only(path: Path) -> Section:
    """A section holding only an image, for the region readers (its spots come later)."""
    empty = np.zeros((0, 2))
    return Section(name=path.stem, patient="", spot_ids=np.array([], dtype=str), genes=np.array([], dtype=str),
                   counts=None, grid=empty, pixel=empty, mpp=None, image_path=path)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    # empty bins between two populations give a plateau of equal maxima: cut in its middle
    best = np.flatnonzero(np.isclose(between, between.max(), rtol=1e-12, atol=0.0))
    return float(edges[(best[0] + best[-1]) // 2 + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (H, W, 3) uint8 image."""
    x = np.asarray(rgb, dtype=np.float64)
    hi, lo = x.max(axis=2), x.min(axis=2)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: tissue pixels of a thumbnail (Otsu on the smoothed saturation and brightness,
    closed, holes filled, specks removed)."""
    from scipy import ndimage

    sat = ndimage.median_filter(saturation(rgb), size=SMOOTH_PX)
    value = ndimage.median_filter(np.asarray(rgb).max(axis=2) / 255.0, size=SMOOTH_PX)
    mask = (sat > otsu_threshold(sat)) & (value < otsu_threshold(value))
    mask = ndimage.binary_closing(mask, structure=np.ones((CLOSE_PX, CLOSE_PX)))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= MIN_REGION * sizes.sum()) + 1
        mask = np.isin(labels, keep)
    return mask


def lattice_positions(width: float, height: float, pitch_px: float, lattice: str) -> tuple[np.ndarray, np.ndarray]:
    """Every lattice position inside a ``width × height`` px image: ``(grid (M, 2) int, pixel (M, 2))``."""
    if lattice not in LATTICES:
        raise ConfigError(f"unknown lattice {lattice!r} (option --lattice); choose square or hex")
    if lattice == "square":
        xs = np.arange(pitch_px / 2, width, pitch_px)
        ys = np.arange(pitch_px / 2, height, pitch_px)
        gy, gx = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
        pixel = np.stack([xs[grid[:, 0]], ys[grid[:, 1]]], axis=1)
        return grid.astype(np.int64), pixel
    row_h = pitch_px * np.sqrt(3) / 2
    grid, pixel = [], []
    for r, y in enumerate(np.arange(pitch_px / 2, height, row_h)):
        offset = (r % 2) * pitch_px / 2
        for i, x in enumerate(np.arange(pitch_px / 2 + offset, width, pitch_px)):
            grid.append((2 * i + r % 2, r))
            pixel.append((x, y))
    return np.asarray(grid, dtype=np.int64).reshape(-1, 2), np.asarray(pixel, dtype=np.float64).reshape(-1, 2)


def _box_share(mask: np.ndarray, centres: np.ndarray, half: float) -> np.ndarray:
    """Share of tissue pixels in the square of half-side ``half`` (mask pixels) around each centre."""
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(centres[:, 0] - half), 0, w).astype(int)
    x1 = np.clip(np.ceil(centres[:, 0] + half), 0, w).astype(int)
    y0 = np.clip(np.floor(centres[:, 1] - half), 0, h).astype(int)
    y1 = np.clip(np.ceil(centres[:, 1] + half), 0, h).astype(int)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return inside / area


def spots_on_tissue(image: Path, mpp: float, pitch_um: float, diameter_um: float, lattice: str) -> Section:
    """A :class:`Section` without counts: the lattice spots on the tissue of ``image``."""
    if not mpp or not mpp > 0:
        raise ConfigError(f"--mpp must be a positive number of µm per pixel, got {mpp}; read it from the scanner's metadata")
    rgb, scale, (width, height) = read_thumbnail(image)
    mask = tissue_mask(rgb)
    if not mask.any():
        raise DataError(f"no tissue found in {image}: the image looks blank (Otsu threshold on saturation); "
                        "check the file, or crop it to the tissue")
    grid, pixel = lattice_positions(width, height, pitch_um / mpp, lattice)
    share = _box_share(mask, pixel * scale, diameter_um / mpp * scale / 2)
    keep = share >= MIN_ON_TISSUE
    if not keep.any():
        raise DataError(f"no spot of a {pitch_um:g} µm {lattice} lattice lies on the tissue of {image} at {mpp} µm/px; "
                        "check --mpp (a wrong scale makes spots larger than the tissue)")
    grid, pixel = grid[keep], pixel[keep]
    path = Path(image)
    return Section(
        name=path.stem, patient="unknown", spot_ids=np.array([f"{x}x{y}" for x, y in grid]),
        genes=np.array([], dtype=str), counts=None, grid=grid, pixel=pixel, mpp=float(mpp), lattice=lattice,
        spot_diameter_um=float(diameter_um), spot_pitch_um=float(pitch_um), image_path=path,
        source_files=(path,),
    )
