"""The region readers: OpenSlide levels and regions against the decoded pixels, PIL's reduced-scale JPEG
decoding unchanged (her2st patches bit-identical to the whole-image cutter), thumbnails, damaged files."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
from hest_samples import toy_image, write_pyramid_tiff
from PIL import Image

from stbench.data.model import Section
from stbench.errors import DataError
from stbench.images import region
from stbench.images.features import _open_image, decode_factor
from stbench.images.patches import PatchRequest, PatchStore


def _section(pixel, mpp=1.0, image_path=None, image=None, name="S1"):
    pixel = np.asarray(pixel, float)
    n = len(pixel)
    return Section(name=name, patient="P", spot_ids=np.array([str(i) for i in range(n)]), genes=np.array(["g"]),
                   counts=sp.csr_matrix(np.ones((n, 1))), grid=np.c_[np.arange(n), np.zeros(n, int)], pixel=pixel,
                   mpp=mpp, image_path=image_path, image_loader=None if image is None else (lambda: image),
                   image_key=None if image is None else "toy")


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 3-level pyramidal TIFF of 512 x 384 px (levels exactly 2x apart) and its levels' pixels."""
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    levels = write_pyramid_tiff(path, toy_image(384, 512), levels=3, mpp=0.5)
    return path, levels


def _boxes(rng, n, width, height, size):
    """Boxes of ``size`` px with random float corners, some crossing the image's borders."""
    x0 = rng.uniform(-size / 2, width - size / 2, n)
    y0 = rng.uniform(-size / 2, height - size / 2, n)
    return np.column_stack([x0, y0, x0 + size, y0 + size])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_slide_regions_equal_the_decoded_level(pyramid, level):
    """Cut through OpenSlide region by region == cut from the whole level decoded in memory."""
    path, levels = pyramid
    sec = _section([[100, 100]], mpp=0.5, image_path=path)
    reader = region.open_reader(sec, target_mpp=0.5 * 2**level)
    assert isinstance(reader, region.SlideReader) and reader.level == level and reader.scale == 0.5**level
    assert reader.full_size == (512.0, 384.0)
    decoded = region.DecodedReader(Image.fromarray(levels[level]), 0.5**level)
    boxes = _boxes(np.random.default_rng(level), 40, 512, 384, 70.3)
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= 512) & (boxes[:, 3] <= 384)
    assert 5 < inside.sum() < 40  # both kinds are tested
    got, want = reader.patches(boxes, 24), decoded.patches(boxes, 24)
    # the same neighbourhood, the same resize: equal up to PIL's fixed-point rounding of the filter
    # weights, which move in the last bit when the box is shifted into the region's frame
    assert np.abs(got[inside].astype(int) - want[inside]).max() <= 1
    assert (got[inside] == want[inside]).mean() > 0.9
    # border patches: the same picture up to where the edge falls (the box is rounded differently)
    assert np.abs(got[~inside].astype(int) - want[~inside]).mean() < 8
    reader.close()


def test_outside_the_slide_is_white(pyramid):
    path, levels = pyramid
    with region.open_reader(_section([[0, 0]], mpp=0.5, image_path=path), 0.5) as reader:
        assert (reader.patch([-300, -300, -200, -200], 16) == 255).all()
        left_half_out = reader.patch([-50, 100, 50, 200], 16)
        assert (left_half_out[:, :7] == 255).all() and left_half_out[:, 9:].mean() < 250


@pytest.mark.parametrize("target, level", [(0.4, 0), (0.5, 0), (1.0, 1), (1.99, 1), (2.0, 2), (50.0, 2)])
def test_the_coarsest_level_that_resolves_the_target(pyramid, target, level):
    path, _ = pyramid
    sec = _section([[0, 0]], mpp=0.5, image_path=path)
    with region.open_reader(sec, target) as reader:
        assert reader.level == level
    assert decode_factor(sec, target) == 2**level
    assert region.open_reader(dataclasses.replace(sec, mpp=None), 50.0).level == 0  # no scale: full resolution


def _record_region_reads(monkeypatch) -> list:
    """The size of every region the slide readers read, in order."""
    read = []
    real = region.SlideReader.__init__

    def spy(self, slide, *args):
        real(self, slide, *args)
        original = slide.read_region
        slide.read_region = lambda loc, lev, size: read.append(size) or original(loc, lev, size)

    monkeypatch.setattr(region.SlideReader, "__init__", spy)
    return read


def test_only_regions_are_read_never_the_whole_slide(pyramid, tmp_path, monkeypatch):
    path, _ = pyramid
    sec = _section([[100, 100], [300, 200], [500, 370]], mpp=0.5, image_path=path)
    read = _record_region_reads(monkeypatch)
    req = PatchRequest("spot", 20, 16)  # 40 px boxes at level 0, read at level 1 (1.25 µm/px asked)
    ps = PatchStore(tmp_path, "t").get(sec, [req])[req.name]
    assert ps.mask[:, 0].tolist() == [True, True, True]  # the last one is 68 % inside
    assert len(read) == 3 and max(w * h for w, h in read) < 30 * 30  # 20 px at level 1, plus the filter's reach


def test_reduced_jpeg_decoding_is_kept(tmp_path):
    image = toy_image(400, 600)
    Image.fromarray(image).save(tmp_path / "he.jpg", quality=92)
    sec = _section([[10, 10]], mpp=0.5, image_path=tmp_path / "he.jpg")
    for target, factor in [(0.5, 1), (1.0, 2), (2.0, 4), (4.0, 8), (100.0, 8)]:
        reader, scale = _open_image(sec, target)
        assert isinstance(reader, region.DecodedReader) and scale == 1 / factor and decode_factor(sec, target) == factor
        assert reader.size == (600 // factor, 400 // factor)
    Image.fromarray(image).save(tmp_path / "he.png")  # PNG has no DCT scaling: full resolution
    assert _open_image(dataclasses.replace(sec, image_path=tmp_path / "he.png"), 4.0)[1] == 1.0


def _old_cut(image, box, scale, out):
    """The patch cutter of stbench before the region readers (features._cut), kept verbatim as the reference."""
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    w, h = image.size
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.asarray(image.resize((out, out), Image.BILINEAR, box=(x0, y0, x1, y1)))
    ix0, iy0, ix1, iy1 = (int(round(v)) for v in (x0, y0, x1, y1))
    canvas = Image.new("RGB", (max(1, ix1 - ix0), max(1, iy1 - iy0)), (255, 255, 255))
    cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    if cx1 > cx0 and cy1 > cy0:
        canvas.paste(image.crop((cx0, cy0, cx1, cy1)), (cx0 - ix0, cy0 - iy0))
    return np.asarray(canvas.resize((out, out), Image.BILINEAR))


@pytest.mark.slow
def test_her2_jpeg_patches_are_bit_identical_to_the_whole_image_cutter(her2_dir, tmp_path):
    """her2st's JPEGs go through PIL at the same DCT reduction and the same resize as before: every
    patch of the store is byte for byte the old cutter's patch of the old decode."""
    from stbench_plugins.her2.reader import open_her2

    sec = open_her2(her2_dir).load_section("C6")  # its spots come within 300 px of the left edge
    # 1.75, 3.5 and 25 µm/px: three DCT reductions; the 2 mm grids reach past the image's edges
    reqs = {PatchRequest("spot", 112, 64): 2, PatchRequest("neighbour", 112, 32): 4, PatchRequest("neighbour", 400, 16): 8}
    got = PatchStore(tmp_path, "her2").get(sec, list(reqs))
    for req, factor in reqs.items():
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(sec.image_path) as source:  # the old decode: PIL draft at the JPEG reduction
            width = source.size[0]
            assert decode_factor(sec, req.target_mpp) == factor
            source.draft("RGB", (source.size[0] // factor, source.size[1] // factor))
            image = source.convert("RGB")
        scale = image.size[0] / width
        boxes = PatchStore(tmp_path, "her2").boxes(sec, req)
        full = np.array(image.size) / scale
        inside = ((np.clip(boxes[..., 2], 0, full[0]) - np.clip(boxes[..., 0], 0, full[0]))
                  * (np.clip(boxes[..., 3], 0, full[1]) - np.clip(boxes[..., 1], 0, full[1]))
                  / ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))) >= 0.5
        ps = got[req.name]
        np.testing.assert_array_equal(ps.mask, inside)
        for i, j in zip(*np.nonzero(inside)):
            assert np.array_equal(ps.patches[i, j], _old_cut(image, boxes[i, j], scale, req.out_px)), (i, j)
        assert (ps.patches[~inside] == 255).all()
        if req.size_um == 400:  # masked sub-patches, and border ones that are kept and padded white
            crossing = (boxes[..., 0] < 0) | (boxes[..., 1] < 0) | (boxes[..., 2] > full[0]) | (boxes[..., 3] > full[1])
            assert (~inside).any() and (inside & crossing).any()
        image.close()


@pytest.mark.parametrize("kind", ["tiff", "jpeg", "array"])
def test_thumbnails(pyramid, tmp_path, kind):
    path, levels = pyramid
    image = levels[0]
    if kind == "tiff":
        sec = _section([[0, 0]], mpp=0.5, image_path=path)
    elif kind == "jpeg":
        Image.fromarray(image).save(tmp_path / "he.jpg", quality=95)
        sec = _section([[0, 0]], mpp=0.5, image_path=tmp_path / "he.jpg")
    else:
        sec = _section([[0, 0]], mpp=0.5, image=image)
    thumb, scale = region.read_thumbnail(sec, 100)
    assert thumb.dtype == np.uint8 and thumb.shape == (75, 100, 3) and scale == pytest.approx(100 / 512)
    # the thumbnail shows the image: compare with a plain downscale, a few grey levels apart on average
    reference = np.asarray(Image.fromarray(image).resize((100, 75), Image.BOX), dtype=int)
    assert np.abs(thumb.astype(int) - reference).mean() < 6
    big, big_scale = region.read_thumbnail(sec, 5000)  # never enlarged
    assert big.shape == (384, 512, 3) and big_scale == 1.0
    assert region.image_size(sec) == (512, 384)


def test_a_damaged_slide_is_one_line(pyramid, tmp_path):
    path, _ = pyramid
    broken = tmp_path / "broken.tif"
    data = path.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # the header survives, the tiles do not
    sec = _section([[200, 200]], mpp=0.5, image_path=broken)
    with pytest.raises(DataError, match="cannot be decoded") as info:
        PatchStore(tmp_path, "t").get(sec, [PatchRequest("spot", 20, 16)])
    assert "\n" not in str(info.value) and "broken.tif" in str(info.value)


def test_neighbour_grids_are_read_as_one_region_each(pyramid, tmp_path, monkeypatch):
    """The 25 sub-patches of a 5x5 grid share one read, and come out as if cut one by one."""
    path, levels = pyramid
    sec = _section([[150, 150], [330, 230], [420, 120]], mpp=0.5, image_path=path)
    read = _record_region_reads(monkeypatch)
    req = PatchRequest("neighbour", 10, 8)  # 20 px sub-patches, 100 px grids, read at level 1
    ps = PatchStore(tmp_path / "grouped", "t").get(sec, [req])[req.name]
    assert 1 <= len(read) <= 3 and ps.mask.all()  # one read per grid at most (close grids may share one)
    grouped = sum(w * h for w, h in read)
    read.clear()
    monkeypatch.setattr(region.SlideReader, "MAX_WASTE", 0.0)  # one read per sub-patch
    alone = PatchStore(tmp_path / "alone", "t").get(sec, [req])[req.name]
    assert len(read) == 75 and grouped <= 2 * sum(w * h for w, h in read)  # never twice what separate reads take
    assert np.abs(np.asarray(ps.patches, dtype=int) - alone.patches).max() <= 1
    boxes = PatchStore(tmp_path, "t").boxes(sec, req).reshape(-1, 4)
    one_by_one = region.DecodedReader(Image.fromarray(levels[1]), 0.5).patches(boxes, 8)
    assert np.abs(np.asarray(ps.patches, dtype=int).reshape(one_by_one.shape) - one_by_one).max() <= 1


def test_tiles_missing_from_the_slide_are_white(tmp_path):
    """A sparse slide (a tile with no data: not scanned) reads as transparent in OpenSlide: shown white."""
    import tifffile

    path = tmp_path / "sparse.tif"
    write_pyramid_tiff(path, np.zeros((256, 256, 3), np.uint8), levels=1, tile=64, compression=None)
    with tifffile.TiffFile(path, mode="r+") as tif:  # drop the first tile's data
        counts = list(tif.pages[0].tags["TileByteCounts"].value)
        counts[0] = 0
        tif.pages[0].tags["TileByteCounts"].overwrite(counts)
    with region.open_reader(_section([[0, 0]], mpp=1.0, image_path=path), 1.0) as reader:
        assert (reader.patch([8, 8, 56, 56], 8) == 255).all()  # the missing tile
        assert (reader.patch([72, 72, 120, 120], 8) == 0).all()  # a scanned one
