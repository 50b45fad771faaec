"""Cutting patches from a section's image and encoding them, with an on-disk feature cache.

Each section's image is opened once per section, for every patch kind still missing from the cache,
through a region reader (:mod:`stbench.images.region`) at the coarsest resolution the encoder's input
still resolves: a pyramidal whole-slide image is read region by region from the right pyramid level
(OpenSlide), a JPEG decoded at a reduced scale (libjpeg's DCT scaling, PIL ``draft``), so a 10,000 ×
10,000 px image never has to be held at full resolution for a 64-px encoder. Patches are cut and resized
one by one and encoded in chunks, so memory stays bounded by one decoded image (none for a whole-slide
image) plus one chunk of patches.

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
from stbench.data.model import Section
from stbench.images import region
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


def decode_factor(section: Section, target_mpp: float) -> int:
    """How much :func:`_open_image` reduces the section's image for ``target_mpp`` (1: full resolution).

    Reads only the file's header, so a caller can group the patch sizes that share one decode.
    """
    return region.reduction(section, target_mpp)


def _open_image(section: Section, target_mpp: float):
    """A :class:`~stbench.images.region.RegionReader` of the section's image at the coarsest resolution
    that still resolves ``target_mpp``, and its scale (full-resolution pixels to the reader's pixels)."""
    reader = region.open_reader(section, target_mpp)
    return reader, reader.scale


def _reader(image, scale: float) -> region.RegionReader:
    """``image`` as a region reader: readers pass through, a decoded PIL image is wrapped at ``scale``."""
    return image if isinstance(image, region.RegionReader) else region.DecodedReader(image, scale)


def _cut(image, box: np.ndarray, scale: float, out: int) -> np.ndarray:
    """One patch: the box (full-resolution px) resized to ``out`` px; outside the image is white.
    ``image`` is a reader from :func:`_open_image` or a PIL image decoded at ``scale``."""
    return _reader(image, scale).patch(box, out)


def cut_patches(image, boxes: np.ndarray, scale: float, out: int) -> np.ndarray:
    """Patches for (M, 4) boxes in full-resolution px: (M, out, out, 3) uint8, each cut by :func:`_cut`."""
    return _reader(image, scale).patches(boxes, out)


def layout(section: Section, spec: PatchSpec, image, scale: float, min_inside: float):
    """Where the patches of ``spec`` lie on a decoded image: boxes (N, n_sub, 4) in full-resolution px
    and the mask (N, n_sub), True where at least ``min_inside`` of the box lies inside the image."""
    boxes = patch_boxes(section.pixel, spec, section.mpp, section.spot_pitch_um)  # (N, n_sub, 4)
    full_w, full_h = _reader(image, scale).full_size
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

