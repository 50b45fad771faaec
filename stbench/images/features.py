"""Cutting patches from a section's image and encoding them, with an on-disk feature cache.

Each whole-slide image is decoded once per section, for every patch kind still missing from the cache.
A JPEG is decoded at a reduced scale (libjpeg's DCT scaling, PIL ``draft``) when the encoder's input is
coarser than the scan, so a 10,000 × 10,000 px image never has to be held at full resolution for a
64-px encoder; patches are cut and resized one by one and encoded in chunks, so memory stays bounded by
one decoded image plus one chunk of patches.

The cache key holds everything that changes the numbers: dataset, section, the image's fingerprint, the
spot centres and scale, the patch kind, size in µm and grid, the encoder's name, weights id and input
size, and the masking threshold. A changed setting gives another file; a corrupt or partial file is
detected on load and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stbench import atomic
from stbench.errors import DataError
from stbench.data.model import Section
from stbench.images.encoder import Encoder
from stbench.images.geometry import PatchSpec, inside_fraction, patch_boxes

#: bump when extraction changes in a way that changes features
EXTRACTION_VERSION = 2
#: patches cut and encoded per chunk (bounds memory: 1024 × 224² × 3 bytes ≈ 150 MB)
CHUNK = 1024


@dataclass
class FeatureSet:
    """Features of one patch kind for every spot of a section."""

    features: np.ndarray  # (N, n_sub, dim) float32; zeros where masked
    mask: np.ndarray  # (N, n_sub) bool: True where the (sub-)patch lies (mostly) inside the image


def image_error(section: Section, exc: BaseException) -> DataError:
    """One line for an image that cannot be decoded: the file, the section, PIL's reason and the fix."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"image {section.image_path} of section {section.name} cannot be decoded ({reason}): the file is "
                     "truncated or corrupt; download it again, or move it away to run the section without its image")


def _reduction(im, mpp: Optional[float], target_mpp: float) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) for an opened, not yet decoded PIL image: the largest one
    that keeps the decoded pixel at least as fine as ``target_mpp``; 1 for other formats."""
    if im.format != "JPEG" or not mpp:
        return 1
    # reduce by 2, 4 or 8 while the decoded pixel stays at least as fine as the encoder's pixel;
    # the patch resize then only ever downsamples (PIL's filters are area-aware when shrinking)
    factor = 1
    while factor < 8 and mpp * factor * 2 <= target_mpp:
        factor *= 2
    return factor


def decode_factor(section: Section, target_mpp: float) -> int:
    """How much :func:`_open_image` reduces the section's image for ``target_mpp`` (1: full resolution).

    Reads only the file's header, so a caller can group the patch sizes that share one decode.
    """
    if section.image_path is None:
        return 1
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide scans exceed PIL's decompression-bomb guard
    try:
        with Image.open(section.image_path) as im:
            return _reduction(im, section.mpp, target_mpp)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or corrupt files
        raise image_error(section, exc) from None


def _open_image(section: Section, target_mpp: float):
    """The section's image as PIL, decoded at the coarsest JPEG scale that still resolves ``target_mpp``,
    and the factor from full-resolution pixels to the decoded image's pixels."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide scans exceed PIL's decompression-bomb guard
    if section.image_path is None:
        array = section.read_image()
        return Image.fromarray(np.ascontiguousarray(array)), 1.0
    try:
        with Image.open(section.image_path) as source:  # closed on every path, errors included
            width = source.size[0]
            factor = _reduction(source, section.mpp, target_mpp)
            if factor > 1:
                source.draft("RGB", (source.size[0] // factor, source.size[1] // factor))
            im = source.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or corrupt files
        raise image_error(section, exc) from None
    return im, im.size[0] / width


def _cut(image, box: np.ndarray, scale: float, out: int) -> np.ndarray:
    """One patch: the box (full-resolution px) resized to ``out`` px; outside the image is white."""
    from PIL import Image

    x0, y0, x1, y1 = (float(v) * scale for v in box)
    w, h = image.size
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.asarray(image.resize((out, out), Image.BILINEAR, box=(x0, y0, x1, y1)))
    # a border patch: paste the part inside the image onto a white canvas, then resize
    ix0, iy0, ix1, iy1 = (int(round(v)) for v in (x0, y0, x1, y1))
    canvas = Image.new("RGB", (max(1, ix1 - ix0), max(1, iy1 - iy0)), (255, 255, 255))
    cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    if cx1 > cx0 and cy1 > cy0:
        canvas.paste(image.crop((cx0, cy0, cx1, cy1)), (cx0 - ix0, cy0 - iy0))
    return np.asarray(canvas.resize((out, out), Image.BILINEAR))


def cut_patches(image, boxes: np.ndarray, scale: float, out: int) -> np.ndarray:
    """Patches for (M, 4) boxes in full-resolution px: (M, out, out, 3) uint8, each cut by :func:`_cut`."""
    patches = np.empty((len(boxes), out, out, 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        patches[i] = _cut(image, box, scale, out)
    return patches


def layout(section: Section, spec: PatchSpec, image, scale: float, min_inside: float):
    """Where the patches of ``spec`` lie on a decoded image: boxes (N, n_sub, 4) in full-resolution px
    and the mask (N, n_sub), True where at least ``min_inside`` of the box lies inside the image."""
    boxes = patch_boxes(section.pixel, spec, section.mpp, section.spot_pitch_um)  # (N, n_sub, 4)
    full_w, full_h = image.size[0] / scale, image.size[1] / scale
    return boxes, inside_fraction(boxes, full_w, full_h) >= min_inside


class FeatureStore:
    """Computes and caches encoder features of sections, per patch kind."""

    def __init__(self, encoder: Encoder, encoder_name: str, dataset: str, cache_root: Path,
                 min_inside: float = 0.5, progress: Optional[Callable[[str], None]] = None):
        self.encoder = encoder
        self.encoder_name = encoder_name
        self.dataset = dataset
        self.root = Path(cache_root) / "features" / dataset
        self.min_inside = min_inside
        self.progress = progress
        #: counters for tests and benchmarks
        self.computed = 0
        self.loaded = 0

    # -- keys and files -------------------------------------------------------------------------
    def key(self, section: Section, spec: PatchSpec) -> dict:
        spots = hashlib.sha256(np.ascontiguousarray(section.pixel, dtype=np.float64).tobytes()).hexdigest()[:16]
        return {
            "version": EXTRACTION_VERSION, "dataset": self.dataset, "section": section.name,
            "image": section.image_fingerprint(), "spots": spots, "mpp": section.mpp,
            "pitch_um": section.spot_pitch_um, "kind": spec.kind, "size_um": spec.size_um, "grid": spec.grid,
            "encoder": self.encoder_name, "weights": self.encoder.weights_id,
            "input_size": self.encoder.input_size, "min_inside": self.min_inside,
            "precision": self.encoder.describe().get("precision", "float32"),
        }

    def path(self, section: Section, spec: PatchSpec, key: Optional[dict] = None) -> Path:
        key = self.key(section, spec) if key is None else key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / section.name / f"{spec.kind}-{self.encoder_name}-{digest}.npz"

    def _load(self, path: Path, key: dict, n_spots: int, n_sub: int) -> Optional[FeatureSet]:
        if not path.exists():
            return None
        try:
            with open(path, "rb") as fh, np.load(fh) as data:
                stored = json.loads(str(data["key"]))
                feats, mask = data["features"], data["mask"]
            ok = (stored == json.loads(json.dumps(key)) and feats.shape == (n_spots, n_sub, self.encoder.dim)
                  and mask.shape == (n_spots, n_sub) and np.isfinite(feats).all())
        except Exception:  # truncated zip, bad JSON, missing arrays: recompute
            ok = False
        if not ok:
            warnings.warn(f"feature cache file {path} is corrupt or stale; recomputing", stacklevel=3)
            return None
        return FeatureSet(feats.astype(np.float32, copy=False), mask.astype(bool, copy=False))

    def _save(self, path: Path, key: dict, fs: FeatureSet) -> None:
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=fs.features, mask=fs.mask, key=json.dumps(key))

    # -- computing ------------------------------------------------------------------------------
    def get(self, section: Section, specs: list[PatchSpec]) -> dict[str, FeatureSet]:
        """Features of every requested kind; the image is decoded at most once, only on a cache miss."""
        out: dict[str, FeatureSet] = {}
        missing = []
        keys = {spec: self.key(section, spec) for spec in specs}  # hashes the spot centres: once per kind
        for spec in specs:
            cached = self._load(self.path(section, spec, keys[spec]), keys[spec], section.n_spots, spec.n_sub)
            if cached is None:
                missing.append(spec)
            else:
                out[spec.kind] = cached
                self.loaded += 1
        if missing:
            if self.progress:
                self.progress(f"extracting {', '.join(s.kind for s in missing)} features of section {section.name} "
                              f"with encoder {self.encoder_name}")
            target_mpp = min(s.size_um for s in missing) / self.encoder.input_size
            image, scale = _open_image(section, target_mpp)
            try:
                for spec in missing:
                    fs = self._compute(section, spec, image, scale)
                    self._save(self.path(section, spec, keys[spec]), keys[spec], fs)
                    out[spec.kind] = fs
                    self.computed += 1
            finally:
                image.close()
        return out

    def _compute(self, section: Section, spec: PatchSpec, image, scale: float) -> FeatureSet:
        boxes, mask = layout(section, spec, image, scale, self.min_inside)
        flat_boxes = boxes.reshape(-1, 4)
        valid = np.flatnonzero(mask.ravel())
        feats = np.zeros((len(flat_boxes), self.encoder.dim), dtype=np.float32)
        size = self.encoder.input_size
        for start in range(0, len(valid), CHUNK):
            idx = valid[start : start + CHUNK]
            patches = cut_patches(image, flat_boxes[idx], scale, size)
            feats[idx] = self.encoder.encode(patches)
        n, n_sub = mask.shape
        return FeatureSet(feats.reshape(n, n_sub, -1), mask)

