"""Reading a section's image one region at a time, whatever it is stored as.

Patches are cut by a :class:`RegionReader` opened for the finest resolution they need (``target_mpp``,
µm per pixel of the patches):

* :class:`SlideReader`: pyramidal whole-slide images that OpenSlide reads (TIFF, SVS, NDPI, MRXS, ...;
  HEST-1k's ``wsis/<id>.tif``). It reads the pyramid level that still resolves ``target_mpp``, and only
  the regions the patches cover: a 100,000 × 100,000 px scan is never decoded whole.
* :class:`DecodedReader`: an image decoded whole in memory. JPEG and PNG files (OpenSlide does not read
  them; her2st's H&E are JPEGs) go through PIL, a JPEG decoded at a reduced DCT scale (PIL ``draft``:
  1/2, 1/4 or 1/8) when the patches need less resolution; generated images (``Section.image_loader``)
  are wrapped as they are.

Both cut a patch the same way: the box (full-resolution pixels, floats) is mapped into the reader's
pixels by ``scale`` and resized to ``out × out`` with PIL's bilinear filter (area-aware when shrinking);
what lies outside the image is white. :func:`read_thumbnail` gives a small picture of the whole image
for overviews and spot maps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from stbench.errors import DataError

#: RGB of what lies outside the image (and of border padding): white, like slide background
WHITE = (255, 255, 255)
#: the JPEG DCT reductions libjpeg can decode directly
JPEG_REDUCTIONS = (1, 2, 4, 8)


def image_error(section, exc: BaseException) -> DataError:
    """One line for an image that cannot be decoded: the file, the section, the reader's reason and the fix."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"image {section.image_path} of section {section.name} cannot be decoded ({reason}): the file is "
                     "truncated or corrupt; download it again, or move it away to run the section without its image")


# --- readers -------------------------------------------------------------------------------------------


class RegionReader:
    """An opened image of a section, read region by region.

    ``scale`` maps full-resolution pixels to this reader's pixels (0.5: the reader works at half
    resolution); ``full_size`` is the image's (width, height) in full-resolution pixels. Close it (or use
    it as a context manager) to release the decoded pixels or the slide's file handle.
    """

    scale: float = 1.0

    @property
    def full_size(self) -> tuple[float, float]:
        raise NotImplementedError

    def patch(self, box, out: int) -> np.ndarray:
        """The box (x0, y0, x1, y1) in full-resolution pixels as an (out, out, 3) uint8 RGB patch;
        white where the box leaves the image."""
        raise NotImplementedError

    def patches(self, boxes: np.ndarray, out: int) -> np.ndarray:
        """(M, out, out, 3) uint8 patches of (M, 4) boxes, each cut by :meth:`patch`."""
        result = np.empty((len(boxes), out, out, 3), dtype=np.uint8)
        for i, box in enumerate(boxes):
            result[i] = self.patch(box, out)
        return result

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecodedReader(RegionReader):
    """An image decoded whole (a PIL image), ``scale`` times the full resolution."""

    def __init__(self, image, scale: float = 1.0):
        self.image = image
        self.scale = scale

    @property
    def size(self) -> tuple[int, int]:
        """The decoded image's (width, height) in its own pixels."""
        return self.image.size

    @property
    def full_size(self) -> tuple[float, float]:
        # the decoded size divided by the scale (not the file's header), as stbench always computed it
        return self.image.size[0] / self.scale, self.image.size[1] / self.scale

    def patch(self, box, out: int) -> np.ndarray:
        from PIL import Image

        image = self.image
        x0, y0, x1, y1 = (float(v) * self.scale for v in box)
        w, h = image.size
        if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
            return np.asarray(image.resize((out, out), Image.BILINEAR, box=(x0, y0, x1, y1)))
        # a border patch: paste the part inside the image onto a white canvas, then resize
        ix0, iy0, ix1, iy1 = (int(round(v)) for v in (x0, y0, x1, y1))
        canvas = Image.new("RGB", (max(1, ix1 - ix0), max(1, iy1 - iy0)), WHITE)
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
        if cx1 > cx0 and cy1 > cy0:
            canvas.paste(image.crop((cx0, cy0, cx1, cy1)), (cx0 - ix0, cy0 - iy0))
        return np.asarray(canvas.resize((out, out), Image.BILINEAR))

    def close(self) -> None:
        self.image.close()


class SlideReader(RegionReader):
    """A whole-slide image read through OpenSlide at one pyramid level, region by region.

    Consecutive boxes that lie close together (the sub-patches of one neighbour grid, the spots of one
    row) are read as one region, as long as it holds at most twice their pixels, so a slide costs a few
    reads per spot instead of one per sub-patch.
    """

    #: a region read at once is at most this many pixels on a side (bounds memory: 4 bytes per pixel)
    MAX_SIDE = 4096
    #: boxes share a read while the region holds at most this many times their own pixels
    MAX_WASTE = 2.0

    def __init__(self, slide, level: int, path=None):
        self.slide = slide
        self.path = path
        self.level = level
        self.downsample = float(slide.level_downsamples[level])
        # OpenSlide maps level-0 pixels to level pixels by its downsample; so does this reader
        self.scale = 1.0 / self.downsample
        self.level_size = slide.level_dimensions[level]

    @property
    def full_size(self) -> tuple[float, float]:
        return tuple(float(v) for v in self.slide.dimensions)

    def patch(self, box, out: int) -> np.ndarray:
        return self.patches(np.asarray(box, dtype=np.float64).reshape(1, 4), out)[0]

    def _extent(self, box: np.ndarray, out: int) -> np.ndarray:
        """The level pixels (x0, y0, x1, y1) that cutting ``box`` (level pixels) reads: the box plus a margin
        as wide as the bilinear filter's reach, so that the resize sees the same neighbourhood as it would
        on the whole level; clipped to the level, as a whole image is."""
        reach = max((box[2] - box[0]) / out, (box[3] - box[1]) / out, 1.0) + 2
        w, h = self.level_size
        return np.array([max(math.floor(box[0] - reach), 0), max(math.floor(box[1] - reach), 0),
                         min(math.ceil(box[2] + reach), w), min(math.ceil(box[3] + reach), h)])

    def patches(self, boxes: np.ndarray, out: int) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * self.scale  # in level pixels
        result = np.full((len(boxes), out, out, 3), WHITE[0], dtype=np.uint8)
        extents = [self._extent(b, out) for b in boxes]
        start = 0
        while start < len(boxes):
            union, area, stop = extents[start].copy(), 0.0, start
            while stop < len(boxes):  # grow the group while one region stays small and mostly useful
                e = extents[stop]
                grown = np.r_[np.minimum(union[:2], e[:2]), np.maximum(union[2:], e[2:])]
                side = max(grown[2] - grown[0], grown[3] - grown[1])
                used = area + max(e[2] - e[0], 0) * max(e[3] - e[1], 0)
                if stop > start and (side > self.MAX_SIDE or (grown[2] - grown[0]) * (grown[3] - grown[1]) > self.MAX_WASTE * used):
                    break
                union, area, stop = grown, used, stop + 1
            self._cut_group(boxes[start:stop], union, out, result[start:stop])
            start = stop
        return result

    def _cut_group(self, boxes: np.ndarray, extent: np.ndarray, out: int, result: np.ndarray) -> None:
        """Read the region ``extent`` (level pixels) once and cut every box of the group from it."""
        from PIL import Image

        rx0, ry0, rx1, ry1 = (int(v) for v in extent)
        if rx1 <= rx0 or ry1 <= ry0:  # wholly outside the image: stays white
            return
        # OpenSlide takes the origin in level-0 pixels; its level origin is origin / downsample (a
        # fraction of a pixel off rx0 when the downsample is not a whole number), so the boxes are
        # placed relative to where the region really starts
        origin = (int(round(rx0 * self.downsample)), int(round(ry0 * self.downsample)))
        ox, oy = origin[0] / self.downsample, origin[1] / self.downsample
        try:
            rgba = self.slide.read_region(origin, self.level, (rx1 - rx0, ry1 - ry0))
        except Exception as exc:  # OpenSlideError on a damaged tile
            raise DataError(f"whole-slide image {self.path}: cannot read a region ({exc}); "
                            "the file is truncated or corrupt: download it again") from None
        region = Image.new("RGBA", rgba.size, WHITE + (255,))
        region.alpha_composite(rgba)  # transparent (not scanned, or outside the slide) -> white
        region = region.convert("RGB")
        rw, rh = region.size
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            x0, y0, x1, y1 = x0 - ox, y0 - oy, x1 - ox, y1 - oy  # in the region's pixels
            if x0 >= 0 and y0 >= 0 and x1 <= rw and y1 <= rh:
                result[i] = np.asarray(region.resize((out, out), Image.BILINEAR, box=(x0, y0, x1, y1)))
                continue
            # a border patch: the part inside the image on a white canvas the size of the box, resized
            ix0, iy0 = int(round(x0)), int(round(y0))
            canvas = Image.new("RGB", (max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))), WHITE)
            cx0, cy0 = max(ix0, 0), max(iy0, 0)
            cx1, cy1 = min(ix0 + canvas.size[0], rw), min(iy0 + canvas.size[1], rh)
            if cx1 > cx0 and cy1 > cy0:
                canvas.paste(region.crop((cx0, cy0, cx1, cy1)), (cx0 - ix0, cy0 - iy0))
            result[i] = np.asarray(canvas.resize((out, out), Image.BILINEAR))

    def close(self) -> None:
        self.slide.close()


# --- choosing and opening a reader ---------------------------------------------------------------------


def _openslide():
    import openslide  # the openslide-bin wheel carries the C library

    return openslide


def _slide_format(path: Path) -> Optional[str]:
    """OpenSlide's name for the file's format ("generic-tiff", "aperio", ...), or None when OpenSlide
    does not read it (JPEG, PNG, a TIFF without tiles): those are decoded whole with PIL."""
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except OSError:
        return None


def _level_for(slide, mpp: Optional[float], target_mpp: float) -> int:
    """The coarsest pyramid level whose pixel is still at least as fine as ``target_mpp`` (0 without a scale)."""
    if not mpp:
        return 0
    fine_enough = [i for i, ds in enumerate(slide.level_downsamples) if mpp * ds <= target_mpp * (1 + 1e-9)]
    return max(fine_enough, default=0)


def _jpeg_reduction(im, mpp: Optional[float], target_mpp: float) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) for an opened, not yet decoded PIL image: the largest one
    that keeps the decoded pixel at least as fine as ``target_mpp``; 1 for other formats."""
    if im.format != "JPEG" or not mpp:
        return 1
    # reduce by 2, 4 or 8 while the decoded pixel stays at least as fine as the patches' pixel;
    # the patch resize then only ever downsamples (PIL's filters are area-aware when shrinking)
    factor = 1
    while factor < 8 and mpp * factor * 2 <= target_mpp:
        factor *= 2
    return factor


def _open_slide(section):
    try:
        return _openslide().OpenSlide(str(section.image_path))
    except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise image_error(section, exc) from None


def _open_pil(section):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide scans exceed PIL's decompression-bomb guard
    try:
        return Image.open(section.image_path)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or corrupt files
        raise image_error(section, exc) from None


def reduction(section, target_mpp: float) -> int:
    """How much :func:`open_reader` reduces the section's image for ``target_mpp`` (1: full resolution):
    the JPEG DCT reduction, or the pyramid level's downsample rounded. Reads only the file's header, so
    a caller can group the patch sizes that share one decode."""
    if section.image_path is None:
        return 1
    if _slide_format(section.image_path):
        slide = _open_slide(section)
        try:
            return int(round(slide.level_downsamples[_level_for(slide, section.mpp, target_mpp)]))
        finally:
            slide.close()
    try:
        with _open_pil(section) as im:
            return _jpeg_reduction(im, section.mpp, target_mpp)
    except (OSError, SyntaxError, ValueError) as exc:
        raise image_error(section, exc) from None


def open_reader(section, target_mpp: float) -> RegionReader:
    """A reader of the section's image at the coarsest resolution that still resolves ``target_mpp``."""
    from PIL import Image

    if section.image_path is None:  # a generated image, held in memory
        return DecodedReader(Image.fromarray(np.ascontiguousarray(section.read_image())), 1.0)
    if _slide_format(section.image_path):
        slide = _open_slide(section)
        return SlideReader(slide, _level_for(slide, section.mpp, target_mpp), section.image_path)
    try:
        with _open_pil(section) as source:  # closed on every path, errors included
            width = source.size[0]
            factor = _jpeg_reduction(source, section.mpp, target_mpp)
            if factor > 1:
                source.draft("RGB", (source.size[0] // factor, source.size[1] // factor))
            im = source.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or corrupt files
        raise image_error(section, exc) from None
    return DecodedReader(im, im.size[0] / width)


def image_size(section) -> tuple[int, int]:
    """The image's full-resolution (width, height), from the file's header (a generated image is made)."""
    if section.image_path is None:
        h, w = section.read_image().shape[:2]
        return w, h
    if _slide_format(section.image_path):
        slide = _open_slide(section)
        try:
            return tuple(slide.dimensions)
        finally:
            slide.close()
    with _open_pil(section) as im:
        return im.size


def read_thumbnail(section, max_side: int) -> tuple[np.ndarray, float]:
    """The whole image at most ``max_side`` pixels on its longest side, as (H, W, 3) uint8 RGB, and its
    scale (thumbnail pixels per full-resolution pixel; multiply spot pixels by it to draw on it).

    A whole-slide image is read from the pyramid level nearest above that size, a JPEG decoded at the
    coarsest DCT scale that still covers it; nothing is ever decoded at full resolution for a thumbnail.
    """
    from PIL import Image

    if max_side < 1:
        raise ValueError(f"a thumbnail needs at least one pixel, got max_side={max_side}")
    if section.image_path is None:
        image = Image.fromarray(np.ascontiguousarray(section.read_image()))
        full_w = image.size[0]
    elif _slide_format(section.image_path):
        slide = _open_slide(section)
        try:
            full_w = slide.dimensions[0]
            image = slide.get_thumbnail((max_side, max_side)).convert("RGB")
        except Exception as exc:  # OpenSlideError on a damaged tile
            raise image_error(section, exc) from None
        finally:
            slide.close()
    else:
        try:
            with _open_pil(section) as source:
                full_w = source.size[0]
                factor = 1
                if source.format == "JPEG":  # the coarsest DCT scale whose longest side still covers max_side
                    while factor < 8 and max(source.size) / (factor * 2) >= max_side:
                        factor *= 2
                if factor > 1:
                    source.draft("RGB", (source.size[0] // factor, source.size[1] // factor))
                image = source.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise image_error(section, exc) from None
    shrink = min(1.0, max_side / max(image.size))
    if shrink < 1.0:
        image = image.resize((max(1, int(image.size[0] * shrink)), max(1, int(image.size[1] * shrink))),
                             Image.BILINEAR)
    return np.asarray(image), image.size[0] / full_w
