"""Patch geometry in physical units, and spot neighbourhoods on square and hexagonal lattices.

Every patch is specified in µm and converted per section with that section's microns per pixel, so a
section scanned at another scale (her2st patient A: ~0.92 µm/px against ~0.69 for the others) gets the
same tissue area, not the same pixel count.

Three kinds of patch (METHODS.md §1.2, §6, §7.1, §8.1):

* ``spot``: a square of ``size_um`` centred on the spot (HEST / PHG2ST: 224 px at 0.5 µm/px = 112 µm).
* ``neighbour``: a ``grid × grid`` (5×5) block of sub-patches of ``size_um`` each, centred on the spot
  (PHG2ST / TRIPLEX: 1120 px = 560 µm); sub-patch index ``row * grid + col``, the centre is the spot
  patch. A sub-patch that is not (mostly) inside the image is masked, never silently filled.
* ``niche``: one square covering the spot and its lattice neighbours (HyperST): side = 2 · pitch +
  ``size_um``, i.e. the 3×3 block on a square lattice or the 7-spot rosette on a hexagonal one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stbench.errors import ConfigError

PATCH_KINDS = ("spot", "neighbour", "niche")


@dataclass(frozen=True)
class PatchSpec:
    """What to cut around each spot. ``size_um`` is the side of one (sub-)patch in µm."""

    kind: str = "spot"
    size_um: float = 112.0
    grid: int = 1

    def __post_init__(self):
        if self.kind not in PATCH_KINDS:
            raise ConfigError(f"unknown patch kind {self.kind!r}; choose one of {', '.join(PATCH_KINDS)}")
        if not self.size_um > 0:
            raise ConfigError(f"patch size must be positive µm, got {self.size_um}")
        if self.grid < 1 or self.grid % 2 == 0:
            raise ConfigError(f"a neighbour grid must be odd (centred on the spot), got {self.grid}")

    @property
    def n_sub(self) -> int:
        return self.grid * self.grid


def um_to_px(size_um: float, mpp: float) -> float:
    """Microns to full-resolution pixels of a section with ``mpp`` microns per pixel."""
    if mpp is None or not mpp > 0:
        raise ConfigError("this section has no microns-per-pixel; patches in µm cannot be placed on it")
    return size_um / mpp


def patch_boxes(centres_px: np.ndarray, spec: PatchSpec, mpp: float, pitch_um: float = 200.0) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) in full-resolution pixels, float, shape (N, n_sub, 4).

    For ``neighbour`` patches the sub-patches tile a ``grid × grid`` block centred on the spot, in
    row-major order (row = y). For ``niche`` the single box spans the spot's lattice neighbours.
    """
    centres = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    if spec.kind == "niche":
        side = um_to_px(2.0 * pitch_um + spec.size_um, mpp)
        offsets = np.zeros((1, 2))
    else:
        side = um_to_px(spec.size_um, mpp)
        steps = np.arange(spec.grid) - spec.grid // 2
        gy, gx = np.meshgrid(steps, steps, indexing="ij")
        offsets = np.stack([gx.ravel(), gy.ravel()], axis=1) * side  # (n_sub, 2) as (dx, dy)
    sub_centres = centres[:, None, :] + offsets[None, :, :]
    half = side / 2.0
    return np.concatenate([sub_centres - half, sub_centres + half], axis=2)


def inside_fraction(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Share of each box's area that lies inside a ``width × height`` image."""
    x0 = np.clip(boxes[..., 0], 0, width)
    y0 = np.clip(boxes[..., 1], 0, height)
    x1 = np.clip(boxes[..., 2], 0, width)
    y1 = np.clip(boxes[..., 3], 0, height)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return np.clip((x1 - x0), 0, None) * np.clip((y1 - y0), 0, None) / area


def lattice_neighbours(grid: np.ndarray, lattice: str) -> list[np.ndarray]:
    """Indices of each spot's lattice neighbours among the given spots (missing positions skipped).

    ``square`` (legacy ST): the 8 spots of the surrounding 3×3 block. ``hex`` (Visium array
    coordinates, columns numbered 0, 2, 4 … on even rows and 1, 3, 5 … on odd rows): the 6 spots at
    (x ± 2, y) and (x ± 1, y ± 1).
    """
    grid = np.asarray(grid, dtype=np.int64)
    if lattice == "square":
        offsets = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)]
    elif lattice == "hex":
        offsets = [(-2, 0), (2, 0), (-1, -1), (1, -1), (-1, 1), (1, 1)]
    else:
        raise ConfigError(f"unknown lattice {lattice!r}; expected 'square' or 'hex'")
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(grid)}
    return [
        np.array([index[(x + dx, y + dy)] for dx, dy in offsets if (x + dx, y + dy) in index], dtype=np.int64)
        for x, y in grid.tolist()
    ]
