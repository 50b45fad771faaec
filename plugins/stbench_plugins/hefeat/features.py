"""``HEFeatures``: a fixed, weight-free H&E patch descriptor, vectorised over the batch on the CPU.

Everything is computed on optical density, OD = -log10((I + 1) / 256) per RGB channel (0 for white,
2.41 for black), where stain amounts add linearly (Beer-Lambert). The OD is unmixed into haematoxylin
(nuclei), eosin (cytoplasm, stroma) and a residual channel with the Ruifrok & Johnston (2001) H-E-DAB
stain matrix; an H&E slide has no DAB, so the third channel holds what the two stains do not explain
(pigment, blur, stain variation).

The patch is 64 px (the harness resizes to it): a 112 µm patch is then 1.75 µm/px, so a 6-10 µm nucleus
spans 3-6 px, enough for nuclear density, blob counts and texture. Features are not standardised
(fractions, OD units, counts per 100 px); the ridge baselines standardise their inputs.

Plain NumPy, with one thread per core over chunks of the batch: on a 2-core machine torch's intra-op
thread pool made these small memory-bound elementwise ops 5-7x slower than a single thread.

See :data:`FEATURE_NAMES` for the list and :func:`_features` for the definitions.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stbench.errors import ConfigError
from stbench.images.encoder import Encoder

#: OD of each uint8 intensity: a lookup is cheaper than a log per pixel
OD_LUT = (-np.log10((np.arange(256) + 1.0) / 256.0)).astype(np.float32)
# Ruifrok & Johnston 2001 stain OD vectors (rows: haematoxylin, eosin, DAB), the values scikit-image uses
_STAINS_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS_OD /= np.linalg.norm(_STAINS_OD, axis=1, keepdims=True)
#: (H, E, residual) = UNMIX @ (OD_R, OD_G, OD_B): OD = stains @ _STAINS_OD, inverted
UNMIX = np.linalg.inv(_STAINS_OD).T.astype(np.float32)
#: Rec. 601 luma weights: the grey level (0-1) used for intensity texture
LUMA = (np.array([0.299, 0.587, 0.114]) / 255.0).astype(np.float32)

STAINS = ("H", "E", "res")
PERCENTILES = (10, 50, 90)
#: pixels whose summed RGB OD is below this are glass: (230, 230, 230) is background, (220, 220, 220) is not
BACKGROUND_OD = 0.15
#: haematoxylin OD levels of pale, typical and dense nuclei: on the her2st images stroma sits at H ~0.1-0.3
#: and nuclei at 0.5-1.5; a purple (80, 50, 140) pixel is 0.74, a pink (230, 150, 190) one 0
H_THRESHOLDS = (0.4, 0.7, 1.0)
#: a nucleus is a local maximum (5x5) of the 3x3-smoothed H above this level...
PEAK_MIN_H = 0.4
#: ...standing this far above the lowest point of its 5x5 window (so flat dark regions count none)
PEAK_CONTRAST = 0.15
TEXTURE_CHANNELS = ("H", "E", "grey")
#: block-mean factors, each twice the last: 1.75, 3.5 and 7 µm/px at 112 µm patches (chromatin, nuclei,
#: cell groups)
SCALES = (1, 2, 4)
REGIONS = ("tl", "tr", "bl", "br", "centre")

FEATURE_NAMES: list[str] = (
    [f"{s}_{stat}" for s in STAINS for stat in ("mean", "std", *(f"p{p}" for p in PERCENTILES))]
    + ["background_frac", "tissue_r", "tissue_g", "tissue_b"]
    + [f"H_frac_gt{t:.1f}" for t in H_THRESHOLDS]
    + ["nuclei_per_100px"]
    + [f"{c}_{stat}_s{s}" for c in TEXTURE_CHANNELS for s in SCALES for stat in ("grad", "localstd", "lap")]
    + [f"{s}_{r}" for r in REGIONS for s in ("H", "E")]
)

#: the coarsest scale (4) must leave a 4x4 image: 2x2 blocks for the local std, 3x3 for the Laplacian
MIN_SIZE = 16
#: patches per thread task: big enough to amortise NumPy's per-call overhead, small enough that a
#: task's temporaries (~50 kB per 64-px patch) stay near the cache (128 was fastest of 64-512 on 2 cores)
CHUNK = 128
#: the work is memory-bound: more threads than this stop paying
MAX_THREADS = 8


class HEFeatures(Encoder):
    """Colour deconvolution, tissue, nuclear density, multi-scale texture and layout features."""

    name = "hefeat"
    input_size = 64
    dim = len(FEATURE_NAMES)
    weights_id = "none"  # deterministic and parameter-free: nothing to hash into the feature cache key
    batch_size = 512
    feature_names = FEATURE_NAMES

    def __init__(self, weights=None):
        if weights not in (None, "random", "none"):
            raise ConfigError("encoder hefeat has no weights; drop --encoder-weights")

    def encode(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches)
        if (patches.ndim != 4 or patches.dtype != np.uint8 or patches.shape[-1] != 3
                or patches.shape[1] != patches.shape[2] or patches.shape[1] < MIN_SIZE):
            raise ValueError(f"encoder hefeat expects uint8 patches of shape (B, S, S, 3) with S >= {MIN_SIZE}; "
                             f"got {patches.dtype} {patches.shape}")
        out = np.empty((len(patches), self.dim), dtype=np.float32)

        def work(start: int) -> None:
            out[start:start + CHUNK] = _features(patches[start:start + CHUNK])

        # NumPy releases the GIL inside its array loops, so threads over chunks use every core;
        # chunks are independent, so the result does not depend on the number of threads
        starts = range(0, len(patches), CHUNK)
        workers = min(len(starts), MAX_THREADS, _usable_cpus())
        if workers <= 1:
            for start in starts:
                work(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, starts))  # list() re-raises a worker's exception here
        return out


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- the features --------------------------------------------------------------------------------------------

def _window(x: np.ndarray, k: int, op) -> np.ndarray:
    """op-reduce (np.add / maximum / minimum) each k x k window of (B, S, S), edges replicated.

    Separable shifted slices: 2(k-1) whole-array ops instead of a k*k stencil.
    """
    r, n = k // 2, x.shape[-1]
    p = np.pad(x, ((0, 0), (r, r), (r, r)), mode="edge")
    rows = op(p[:, :, 0:n], p[:, :, 1:n + 1])
    for d in range(2, k):
        op(rows, p[:, :, d:d + n], out=rows)
    out = op(rows[:, 0:n], rows[:, 1:n + 1])
    for d in range(2, k):
        op(out, rows[:, d:d + n], out=out)
    return out


def _first_of_ties(x: np.ndarray) -> np.ndarray:
    """Pixels of (B, S, S) strictly above their left, upper-left, upper and upper-right neighbours.

    A flat-topped maximum (a uniform nucleus, saturated stain) would otherwise count every tied pixel;
    this keeps the first of them in raster order (exactly one for a convex plateau).
    """
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    inner = p[:, 1:-1, 1:-1]
    return (inner > p[:, 1:-1, :-2]) & (inner > p[:, :-2, :-2]) & (inner > p[:, :-2, 1:-1]) & (inner > p[:, :-2, 2:])


def _mean(x: np.ndarray) -> np.ndarray:
    """Per-patch mean of a (B, ...) array."""
    return x.reshape(len(x), -1).mean(1) if x.flags.c_contiguous else x.mean(tuple(range(1, x.ndim)))


def _texture(img: np.ndarray) -> dict:
    """{(stat, scale): (B,)}: gradient magnitude, local std and Laplacian RMS of (B, S, S) at each scale."""
    out = {}
    x = img
    for s in SCALES:  # each step halves the image: x holds the s x s block means of img
        dx, dy = x[:, :, 1:] - x[:, :, :-1], x[:, 1:, :] - x[:, :-1, :]
        lap = (dx[:, 1:-1, 1:] - dx[:, 1:-1, :-1]) + (dy[:, 1:, 1:-1] - dy[:, :-1, 1:-1])  # 4-neighbour
        out["lap", s] = np.sqrt(np.einsum("bij,bij->b", lap, lap) / lap[0].size)
        dx2, dy2 = np.square(dx, out=dx), np.square(dy, out=dy)
        out["grad", s] = _mean(np.sqrt(dx2[:, :-1] + dy2[:, :, :-1]))
        # variance inside each 2x2 block [a b; c d], averaged over blocks; it splits exactly into
        # ((a-b)^2 + (c-d)^2) / 8 (within rows, from dx) and (mean(a,b) - mean(c,d))^2 / 4 (between rows)
        m = x.shape[-1] // 2 * 2
        pairs = (x[:, :m, 0:m:2] + x[:, :m, 1:m:2]) * 0.5
        between = pairs[:, 0::2] - pairs[:, 1::2]
        out["localstd", s] = np.sqrt((_mean(dx2[:, :m, 0:m:2]) + _mean(np.square(between, out=between))) / 4)
        x = (pairs[:, 0::2] + pairs[:, 1::2]) * 0.5
    return out


def _features(patches: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 → (B, len(FEATURE_NAMES)) float32, columns in FEATURE_NAMES order."""
    b, n = patches.shape[0], patches.shape[1]
    planar = np.ascontiguousarray(patches.transpose(0, 3, 1, 2)).reshape(b, 3, -1)  # contiguous colour planes
    rgb = planar.astype(np.float32)
    od = OD_LUT[planar]
    stains = np.matmul(UNMIX, od)  # (B, 3, S*S): H, E, residual
    h, e = stains[:, 0].reshape(b, n, n), stains[:, 1].reshape(b, n, n)
    f: dict[str, np.ndarray] = {}

    # stain distributions; exact percentiles from one sort per (patch, stain) (NumPy's sort is SIMD)
    mean = stains.mean(-1)
    dev = stains - mean[..., None]
    std = np.sqrt(np.einsum("bcn,bcn->bc", dev, dev) / stains.shape[-1])
    ordered = np.sort(stains, axis=-1)
    pos = np.array(PERCENTILES) / 100 * (stains.shape[-1] - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, stains.shape[-1] - 1)
    frac = (pos - lo).astype(np.float32)
    pct = ordered[..., lo] * (1 - frac) + ordered[..., hi] * frac  # linear interpolation, as np.percentile
    for i, s in enumerate(STAINS):
        f[f"{s}_mean"], f[f"{s}_std"] = mean[:, i], std[:, i]
        for j, p in enumerate(PERCENTILES):
            f[f"{s}_p{p}"] = pct[:, i, j]

    # tissue vs glass; the tissue colour falls back to the whole patch when it is all glass
    tissue = (od.sum(1) >= BACKGROUND_OD).astype(np.float32)
    f["background_frac"] = 1.0 - tissue.mean(1)
    weight = np.where(tissue.any(1, keepdims=True), tissue, np.float32(1.0))
    tissue_rgb = np.matmul(rgb, weight[:, :, None])[:, :, 0] / (weight.sum(1, keepdims=True) * 255.0)
    f["tissue_r"], f["tissue_g"], f["tissue_b"] = tissue_rgb.T

    # nuclear density: haematoxylin-rich area, and nuclei counted as prominent peaks of the smoothed H
    for t in H_THRESHOLDS:
        f[f"H_frac_gt{t:.1f}"] = _mean(h > t).astype(np.float32)
    smooth = _window(h, 3, np.add) / 9.0
    peaks = ((smooth >= _window(smooth, 5, np.maximum)) & (smooth > PEAK_MIN_H)
             & (smooth - _window(smooth, 5, np.minimum) > PEAK_CONTRAST) & _first_of_ties(smooth))
    f["nuclei_per_100px"] = _mean(peaks).astype(np.float32) * 100.0

    # multi-scale texture of the two stains and of the grey level
    grey = np.matmul(LUMA, rgb).reshape(b, n, n)
    for c, img in zip(TEXTURE_CHANNELS, (h, e, grey)):
        for (stat, s), v in _texture(img).items():
            f[f"{c}_{stat}_s{s}"] = v

    # coarse layout: quadrants, and the central half where the spot sits
    half, q = n // 2, n // 4
    he = stains[:, :2].reshape(b, 2, n, n)
    windows = {"tl": he[..., :half, :half], "tr": he[..., :half, half:], "bl": he[..., half:, :half],
               "br": he[..., half:, half:], "centre": he[..., q:n - q, q:n - q]}
    for r, w in windows.items():
        f[f"H_{r}"], f[f"E_{r}"] = w.mean((2, 3)).T

    return np.stack([f[name] for name in FEATURE_NAMES], 1).astype(np.float32)
