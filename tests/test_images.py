"""Patches in microns, border masking, lattice neighbours, and the feature cache."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from stbench.data.model import Section
from stbench.errors import ConfigError
from stbench.images.encoder import Encoder
from stbench.images.features import FeatureStore, _cut, _open_image
from stbench.images.geometry import PatchSpec, inside_fraction, lattice_neighbours, patch_boxes, um_to_px


class MeanColour(Encoder):
    """A tiny deterministic encoder: per-channel means of the patch (counts its calls)."""

    name, input_size, dim, weights_id = "meancolour", 16, 3, "none"

    def __init__(self):
        self.calls = 0

    def encode(self, patches):
        self.calls += 1
        return patches.reshape(len(patches), -1, 3).mean(1).astype(np.float32)


def _section(image, pixel, mpp=1.0, name="S1", key="img-v1"):
    n = len(pixel)
    return Section(name=name, patient="P", spot_ids=np.array([f"{i}x0" for i in range(n)]), genes=np.array(["g"]),
                   counts=sp.csr_matrix(np.ones((n, 1))), grid=np.c_[np.arange(n), np.zeros(n, int)],
                   pixel=np.asarray(pixel, float), mpp=mpp, image_loader=lambda: image, image_key=key)


def test_micron_sizes_convert_per_section_scale():
    assert um_to_px(112, 0.5) == 224
    # her2st: B-H at ~0.689 µm/px, patient A at ~0.918 µm/px: the same tissue, fewer pixels for A
    b = patch_boxes([[1000, 1000]], PatchSpec("spot", 112), 0.689)
    a = patch_boxes([[1000, 1000]], PatchSpec("spot", 112), 0.918)
    assert b[0, 0, 2] - b[0, 0, 0] == pytest.approx(112 / 0.689)
    assert a[0, 0, 2] - a[0, 0, 0] == pytest.approx(112 / 0.918)
    with pytest.raises(ConfigError, match="microns-per-pixel"):
        um_to_px(112, None)


def test_neighbour_grid_is_row_major_around_the_spot():
    boxes = patch_boxes([[500, 500]], PatchSpec("neighbour", 100, grid=5), mpp=0.5)[0]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert boxes.shape == (25, 4)
    np.testing.assert_allclose(centres[12], [500, 500])  # index 12 = the spot patch
    np.testing.assert_allclose(centres[0], [500 - 400, 500 - 400])  # row 0, col 0: up-left
    np.testing.assert_allclose(centres[1], [500 - 200, 500 - 400])  # row 0, col 1: one step right
    np.testing.assert_allclose(centres[5], [500 - 400, 500 - 200])  # row 1, col 0: one step down
    niche = patch_boxes([[500, 500]], PatchSpec("niche", 100), mpp=0.5, pitch_um=200)[0, 0]
    assert niche[2] - niche[0] == pytest.approx((2 * 200 + 100) / 0.5)


def test_border_masking(tmp_path):
    boxes = patch_boxes([[10, 50], [50, 50], [-40, 50]], PatchSpec("spot", 40), mpp=1.0)
    frac = inside_fraction(boxes, 100, 100)[:, 0]
    np.testing.assert_allclose(frac, [0.75, 1.0, 0.0])
    image = np.full((100, 100, 3), 200, np.uint8)
    store = FeatureStore(MeanColour(), "meancolour", "t", tmp_path)
    fs = store._compute(_section(image, [[10, 50], [50, 50], [-40, 50]]), PatchSpec("spot", 40),
                        *_open_image(_section(image, [[0, 0]]), 1.0))
    assert fs.mask[:, 0].tolist() == [True, True, False]
    assert (fs.features[2] == 0).all()  # masked, not filled with made-up pixels


def test_border_patch_is_padded_with_white():
    from PIL import Image

    image = Image.fromarray(np.zeros((100, 100, 3), np.uint8))
    patch = _cut(image, np.array([-50, 0, 50, 100]), 1.0, 10)  # left half outside
    assert patch[:, :4].min() > 200 and patch[:, 6:].max() < 30


def test_square_and_hex_neighbours():
    square = np.array([(x, y) for y in range(3) for x in range(3)])
    nb = lattice_neighbours(square, "square")
    assert sorted(nb[4].tolist()) == [0, 1, 2, 3, 5, 6, 7, 8]  # centre: all 8
    assert sorted(nb[0].tolist()) == [1, 3, 4]  # corner: 3
    # Visium array coordinates: even rows use even columns, odd rows odd columns
    hexgrid = np.array([(x, y) for y in range(5) for x in range(y % 2, 10, 2)])
    index = {tuple(p): i for i, p in enumerate(hexgrid.tolist())}
    centre = index[(4, 2)]
    got = {tuple(hexgrid[j]) for j in lattice_neighbours(hexgrid, "hex")[centre]}
    assert got == {(2, 2), (6, 2), (3, 1), (5, 1), (3, 3), (5, 3)}
    with pytest.raises(ConfigError):
        lattice_neighbours(square, "triangle")


def test_patches_reflect_the_image_at_their_position(tmp_path):
    image = np.zeros((200, 400, 3), np.uint8)
    image[:, 200:] = (255, 0, 0)  # right half red
    store = FeatureStore(MeanColour(), "meancolour", "t", tmp_path)
    sec = _section(image, [[100, 100], [300, 100]])
    fs = store._compute(sec, PatchSpec("spot", 50), *_open_image(sec, 1.0))
    assert fs.features[0, 0].tolist() == [0, 0, 0] and fs.features[1, 0, 0] > 250


@pytest.fixture
def cached(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    enc = MeanColour()
    store = FeatureStore(enc, "meancolour", "toy", tmp_path)
    sec = _section(image, [[100, 100], [150, 150], [200, 120]])
    spec = PatchSpec("spot", 40)
    first = store.get(sec, [spec])["spot"]
    return store, sec, spec, first, enc


def test_cache_is_reused(cached):
    store, sec, spec, first, enc = cached
    calls = enc.calls
    again = store.get(sec, [spec])["spot"]
    assert enc.calls == calls and store.loaded == 1
    np.testing.assert_array_equal(again.features, first.features)


@pytest.mark.parametrize("change", ["image", "spots", "mpp", "kind", "size", "grid", "weights", "input_size", "encoder", "dataset"])
def test_any_keyed_setting_change_recomputes(cached, change):
    store, sec, spec, first, enc = cached
    path = store.path(sec, spec)
    if change == "image":
        sec = dataclasses.replace(sec, image_key="img-v2")
    elif change == "spots":
        sec = dataclasses.replace(sec, pixel=sec.pixel + 1)
    elif change == "mpp":
        sec = dataclasses.replace(sec, mpp=0.5)
    elif change == "kind":
        spec = PatchSpec("niche", 40)
    elif change == "size":
        spec = PatchSpec("spot", 48)
    elif change == "grid":
        spec = PatchSpec("neighbour", 40, grid=3)
    elif change == "weights":
        enc.weights_id = "abc123"
    elif change == "input_size":
        enc.input_size = 8
    elif change == "encoder":
        store.encoder_name = "other"
    elif change == "dataset":
        store = FeatureStore(enc, "meancolour", "toy2", store.root.parent.parent)
    assert store.path(sec, spec) != path
    computed = store.computed
    store.get(sec, [spec])
    assert store.computed == computed + 1


def test_corrupt_or_partial_cache_file_is_recomputed(cached):
    store, sec, spec, first, enc = cached
    path = store.path(sec, spec)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.warns(UserWarning, match="corrupt or stale"):
        again = store.get(sec, [spec])["spot"]
    np.testing.assert_array_equal(again.features, first.features)
    assert store.computed == 2
    # and the rewritten file is whole again
    assert store.get(sec, [spec])["spot"].features.shape == first.features.shape and store.loaded == 1


def test_image_decoded_once_for_several_kinds(tmp_path, monkeypatch):
    image = np.full((300, 300, 3), 128, np.uint8)
    loads = []
    sec = _section(image, [[150, 150]])
    sec = dataclasses.replace(sec, image_loader=lambda: loads.append(1) or image)
    store = FeatureStore(MeanColour(), "meancolour", "toy", tmp_path)
    out = store.get(sec, [PatchSpec("spot", 40), PatchSpec("neighbour", 40, 3), PatchSpec("niche", 20)])
    assert len(loads) == 1 and set(out) == {"spot", "neighbour", "niche"}
    assert out["neighbour"].features.shape == (1, 9, 3)
    store.get(sec, [PatchSpec("spot", 40)])
    assert len(loads) == 1  # cached: not decoded again
