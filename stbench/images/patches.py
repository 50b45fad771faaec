"""Image patches as a declared input: cut once per section, cached on disk, read memory-mapped.

A method that trains or fine-tunes on pixels declares the patches it wants as :class:`PatchRequest`
(kind ``spot``, ``niche`` or ``neighbour``, size in µm, output pixels). The harness cuts them with the
same geometry and cutting code as the feature cache (:mod:`stbench.images.features`: µm converted per
section, JPEG decoded at a reduced scale where the output resolution allows, border patches padded
white), so a ``spot`` patch of this store is exactly the patch an encoder of that input size sees.

Each (section, request) is one ``.npy`` file of uint8 (N, n_sub, out_px, out_px, 3) under
``<cache>/patches/<dataset>/<section>/<name>-<digest>.npy``, with a JSON sidecar holding its key, shape
and mask. The digest hashes everything that changes the pixels (image fingerprint, spot centres, scale,
pitch, kind, size, grid, output pixels, masking threshold), as the feature cache does. The array is
written in chunks into a temporary file (a 100,000-spot section never has to fit in memory) and moved
into place atomically; it is then opened read-only with ``np.load(..., mmap_mode="r")``, so reading a
cached section costs page-cache reads instead of a whole-slide decode.

**Methods must not keep a :class:`PatchSet` (or its array) on ``self``.** The fine-tuning protocol
deep-copies methods; a :class:`PatchSet` defends itself (``copy.deepcopy`` returns it unchanged and
pickling reopens the file by path), but a bare ``np.memmap`` held by a method would be copied into
memory, gigabytes at a time. Read the patches from the slide each time they are needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from stbench import atomic
from stbench.data.model import Section
from stbench.errors import ConfigError, DataError
from stbench.images.features import _open_image, cut_patches, decode_factor, layout
from stbench.images.geometry import PATCH_KINDS, PatchSpec, patch_boxes, um_to_px

#: bump when cutting changes in a way that changes the pixels
PATCH_VERSION = 1
#: bytes of patches cut in memory before they are written to the file (bounds memory per section)
CHUNK_BYTES = 64 << 20
#: the value of masked (sub-)patches: white, like the padding of border patches
WHITE = 255


@dataclass(frozen=True)
class PatchRequest:
    """Patches a method wants around every spot.

    ``kind``: ``spot`` (one square of ``size_um``), ``neighbour`` (a ``grid × grid`` block of
    ``size_um`` sub-patches centred on the spot, row-major) or ``niche`` (one square of
    2 · pitch + ``size_um`` covering the spot's lattice neighbours). Every (sub-)patch is resized to
    ``out_px × out_px`` pixels. ``grid`` defaults to 5 for ``neighbour`` and must be 1 otherwise.
    """

    kind: str = "spot"
    size_um: float = 112.0
    out_px: int = 224
    grid: Optional[int] = None

    def __post_init__(self):
        if self.kind not in PATCH_KINDS:
            raise ConfigError(f"unknown patch kind {self.kind!r}; choose one of {', '.join(PATCH_KINDS)}")
        grid = (5 if self.kind == "neighbour" else 1) if self.grid is None else self.grid
        if isinstance(grid, bool) or int(grid) != grid:
            raise ConfigError(f"a patch grid must be a whole number, got {self.grid!r}")
        if self.kind != "neighbour" and grid != 1:
            raise ConfigError(f"{self.kind} patches have no grid (got grid={grid}); use kind 'neighbour'")
        if isinstance(self.out_px, bool) or int(self.out_px) != self.out_px or self.out_px < 1:
            raise ConfigError(f"patch output size must be a positive number of pixels, got {self.out_px!r}")
        object.__setattr__(self, "grid", int(grid))
        object.__setattr__(self, "out_px", int(self.out_px))
        object.__setattr__(self, "size_um", float(self.size_um))
        self.spec  # validates size and grid (ConfigError)

    @property
    def spec(self) -> PatchSpec:
        """The geometry's description of these patches."""
        return PatchSpec(self.kind, self.size_um, self.grid)

    @property
    def n_sub(self) -> int:
        return self.grid * self.grid

    @property
    def name(self) -> str:
        """A short stable name: ``spot-112um-224px``, ``neighbour5x5-112um-224px``, ``niche-112um-224px``."""
        kind = f"neighbour{self.grid}x{self.grid}" if self.kind == "neighbour" else self.kind
        return f"{kind}-{self.size_um:g}um-{self.out_px}px"

    @property
    def target_mpp(self) -> float:
        """µm per output pixel of a (sub-)patch: what the image decode must still resolve."""
        return self.size_um / self.out_px


@dataclass(frozen=True, eq=False, repr=False)
class PatchSet:
    """The patches of one request for every spot of a section.

    ``patches``: read-only ``np.memmap`` of uint8, (N, n_sub, out_px, out_px, 3) RGB, white where masked.
    ``mask``: (N, n_sub) bool, True where the (sub-)patch lies (mostly) inside the image; a masked
    (sub-)patch is white filler and must not be used as tissue.

    Cheap to copy: ``copy.deepcopy`` returns the same object and pickling stores the path, not the
    pixels. Methods must still not hold one (see the module's note).
    """

    patches: np.memmap
    mask: np.ndarray
    request: PatchRequest
    path: Path

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def n_sub(self) -> int:
        return self.patches.shape[1]

    def read(self, index) -> np.ndarray:
        """The patches of ``index`` (int, slice or index array of spots, in any order) as an in-memory
        array in that order. An index array is read in file order (sequential reads of the memory map)
        and put back in the order asked for."""
        if isinstance(index, (int, np.integer, slice)):
            return np.array(self.patches[index])
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        return np.array(self.patches[index[order]])[np.argsort(order)]

    def __deepcopy__(self, memo) -> "PatchSet":
        return self  # read-only and file-backed: sharing is safe, copying would cost gigabytes

    def __copy__(self) -> "PatchSet":
        return self

    def __reduce__(self):
        return _reopen, (str(self.path), self.request, self.mask)

    def __repr__(self) -> str:
        n, n_sub = self.mask.shape
        return (f"PatchSet({self.request.name}: {n} spots x {n_sub} of {self.request.out_px} px, "
                f"{int(self.mask.sum())} inside, {self.path})")


def _reopen(path: str, request: PatchRequest, mask: np.ndarray) -> PatchSet:
    """Unpickle a :class:`PatchSet`: map its file again."""
    patches = np.load(path, mmap_mode="r")
    mask = np.array(mask, dtype=bool)
    mask.flags.writeable = False
    if patches.shape[:2] != mask.shape:
        raise DataError(f"patch cache file {path} changed since it was pickled: shape {patches.shape}, "
                        f"expected {mask.shape[0]} spots x {mask.shape[1]}; run again to recompute it")
    return PatchSet(patches, mask, request, Path(path))


def _pack_mask(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask.ravel()).tobytes()).decode("ascii")


def _unpack_mask(text: str, shape: tuple) -> np.ndarray:
    bits = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.uint8)
    n = int(np.prod(shape))
    if len(bits) != (n + 7) // 8:
        raise ValueError("mask length")
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)


class PatchStore:
    """Cuts and caches the patches of sections, per request; hands them out memory-mapped."""

    def __init__(self, cache_root: os.PathLike | str, dataset: str, min_inside: float = 0.5,
                 progress: Optional[Callable[[str], None]] = None):
        self.dataset = dataset
        self.root = Path(cache_root) / "patches" / dataset
        self.min_inside = min_inside
        self.progress = progress
        #: counters for tests and benchmarks: requests cut from the image, requests read from the cache
        self.computed = 0
        self.loaded = 0

    # -- keys and files -------------------------------------------------------------------------
    def key(self, section: Section, request: PatchRequest) -> dict:
        spots = hashlib.sha256(np.ascontiguousarray(section.pixel, dtype=np.float64).tobytes()).hexdigest()[:16]
        return {
            "version": PATCH_VERSION, "dataset": self.dataset, "section": section.name,
            "image": section.image_fingerprint(), "spots": spots, "mpp": section.mpp,
            "pitch_um": section.spot_pitch_um, "kind": request.kind, "size_um": request.size_um,
            "grid": request.grid, "out_px": request.out_px, "min_inside": self.min_inside,
        }

    def path(self, section: Section, request: PatchRequest, key: Optional[dict] = None) -> Path:
        """The ``.npy`` file of the patches; the sidecar is the same path with ``.json``."""
        key = self.key(section, request) if key is None else key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / section.name / f"{request.name}-{digest}.npy"

    def boxes(self, section: Section, request: PatchRequest) -> np.ndarray:
        """The (N, n_sub, 4) boxes (x0, y0, x1, y1) in full-resolution pixels that the patches show."""
        return patch_boxes(section.pixel, request.spec, section.mpp, section.spot_pitch_um)

    @staticmethod
    def _expected_shape(section: Section, request: PatchRequest) -> tuple:
        return (section.n_spots, request.n_sub, request.out_px, request.out_px, 3)

    def _load(self, path: Path, key: dict, section: Section, request: PatchRequest) -> Optional[PatchSet]:
        sidecar = path.with_suffix(".json")
        if not path.exists() and not sidecar.exists():
            return None
        shape = self._expected_shape(section, request)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            mask = _unpack_mask(meta["mask"], shape[:2])
            ok = (meta["key"] == json.loads(json.dumps(key)) and tuple(meta["shape"]) == shape
                  and meta["dtype"] == "uint8" and path.stat().st_size == meta["nbytes"])
            if ok:
                patches = np.load(path, mmap_mode="r")
                ok = isinstance(patches, np.memmap) and patches.shape == shape and patches.dtype == np.uint8
        except Exception:  # missing half, truncated file, bad JSON or header: recompute
            ok = False
        if not ok:
            warnings.warn(f"patch cache file {path} is corrupt or stale; recomputing", stacklevel=3)
            return None
        mask.flags.writeable = False
        return PatchSet(patches, mask, request, path)

    # -- computing ------------------------------------------------------------------------------
    def get(self, section: Section, requests: Iterable[PatchRequest]) -> dict[str, PatchSet]:
        """The patches of every request, by :attr:`PatchRequest.name`; the image is decoded only on a
        cache miss, once for all the missing requests that share a decode scale."""
        requests = list(dict.fromkeys(requests))  # drop repeats, keep the order
        if not requests:
            return {}
        if not section.has_image:
            raise DataError(f"section {section.name} has no image: patches cannot be cut from it")
        um_to_px(1.0, section.mpp)  # a section without a scale cannot place µm patches (ConfigError)
        out: dict[str, PatchSet] = {}
        keys = {r: self.key(section, r) for r in requests}  # hashes the spot centres: once per request
        missing = []
        for r in requests:
            cached = self._load(self.path(section, r, keys[r]), keys[r], section, r)
            if cached is None:
                missing.append(r)
            else:
                out[r.name] = cached
                self.loaded += 1
        # one decode per JPEG reduction (usually one for all): the pixels of a request then depend on
        # its own key only, never on which other requests happened to be cut with it
        groups: dict[int, list[PatchRequest]] = {}
        for r in missing:
            groups.setdefault(decode_factor(section, r.target_mpp), []).append(r)
        for group in groups.values():
            if self.progress:
                self.progress(f"cutting {', '.join(r.name for r in group)} patches of section {section.name}")
            image, scale = _open_image(section, min(r.target_mpp for r in group))
            try:
                for r in group:
                    path = self.path(section, r, keys[r])
                    self._write(path, keys[r], section, r, image, scale)
                    self.computed += 1
                    loaded = self._load(path, keys[r], section, r)
                    if loaded is None:
                        raise DataError(f"patch cache file {path} could not be read back after writing it")
                    out[r.name] = loaded
            finally:
                image.close()
        return {r.name: out[r.name] for r in requests}

    def _write(self, path: Path, key: dict, section: Section, request: PatchRequest, image, scale: float) -> None:
        """Cut every (sub-)patch into a temporary ``.npy`` chunk by chunk, then move it into place."""
        boxes, mask = layout(section, request.spec, image, scale, self.min_inside)
        shape = self._expected_shape(section, request)
        flat_boxes, flat_mask = boxes.reshape(-1, 4), mask.ravel()
        with atomic.atomic_path(path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _fill(array.reshape(-1, request.out_px, request.out_px, 3), image, flat_boxes, flat_mask, scale,
                  request.out_px)
            array.flush()
            del array  # unmap before the file is synced and renamed
        meta = {"key": key, "shape": list(shape), "dtype": "uint8", "nbytes": path.stat().st_size,
                "mask": _pack_mask(mask)}
        atomic.write_text(path.with_suffix(".json"), json.dumps(meta, sort_keys=True))


def _fill(flat: np.ndarray, image, boxes: np.ndarray, mask: np.ndarray, scale: float, out: int) -> None:
    """Write the patches of (M, 4) ``boxes`` into ``flat`` (M, out, out, 3), white where ``mask`` is
    False, ``CHUNK_BYTES`` of patches at a time."""
    chunk = max(1, CHUNK_BYTES // (out * out * 3))
    for start in range(0, len(boxes), chunk):
        stop = min(start + chunk, len(boxes))
        buf = np.full((stop - start, out, out, 3), WHITE, dtype=np.uint8)
        valid = np.flatnonzero(mask[start:stop])
        if len(valid):
            buf[valid] = cut_patches(image, boxes[start:stop][valid], scale, out)
        flat[start:stop] = buf
