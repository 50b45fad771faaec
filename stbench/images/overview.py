"""Downscaled overview pictures of a section: spot centres and patch outlines drawn on the H&E, so a
user can see that coordinates, scale and patches line up (``stbench data check``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stbench import atomic
from stbench.data.model import Section
from stbench.images.region import read_thumbnail
from stbench.images.geometry import PatchSpec, patch_boxes

#: longest side of the overview picture in pixels
OVERVIEW_PX = 2000


def draw_overview(section: Section, out: Path, spot_um: float = 112.0, grid: int = 5) -> Path:
    """Write ``out`` (PNG): spot centres (black dots), spot patches (green squares) and, for the spot
    nearest the tissue's centre, its ``grid × grid`` neighbour sub-patches (blue)."""
    from PIL import Image, ImageDraw

    # read coarsely: the picture only needs OVERVIEW_PX pixels on its longest side
    pixels, factor = read_thumbnail(section, OVERVIEW_PX)  # factor: full-resolution pixels -> overview pixels
    image = Image.fromarray(pixels)
    full_w, full_h = image.size[0] / factor, image.size[1] / factor
    draw = ImageDraw.Draw(image)
    spots = patch_boxes(section.pixel, PatchSpec("spot", spot_um), section.mpp)[:, 0] * factor
    for x0, y0, x1, y1 in spots:
        draw.rectangle((x0, y0, x1, y1), outline=(0, 160, 0))
    r = max(1.5, 0.01 * OVERVIEW_PX / 4)
    for x, y in section.pixel * factor:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 0, 0))
    middle = int(np.argmin(((section.pixel - section.pixel.mean(0)) ** 2).sum(1)))
    for x0, y0, x1, y1 in patch_boxes(section.pixel[middle : middle + 1], PatchSpec("neighbour", spot_um, grid), section.mpp)[0] * factor:
        draw.rectangle((x0, y0, x1, y1), outline=(30, 60, 230), width=2)
    # "um", not "µm": PIL's built-in bitmap font has no µ
    text = (f"{section.name}: {section.n_spots} spots, {section.mpp:.3f} um/px, image {int(full_w)}x{int(full_h)} px; "
            f"green: {spot_um:g} um spot patches; blue: {grid}x{grid} neighbour grid")
    draw.rectangle((0, 0, image.size[0], 18), fill=(255, 255, 255))
    draw.text((4, 3), text, fill=(0, 0, 0))
    with atomic.atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out
