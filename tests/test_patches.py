"""The patch store: cache keys, memory-mapped read-only arrays, the same pixels as the feature cutter,
masks, niches over the lattice, corrupt files, cheap copies."""

import copy
import dataclasses
import json
import mmap
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from stbench.data.model import Section
from stbench.errors import ConfigError, DataError
from stbench.images import patches as patches_mod
from stbench.images.encoder import Encoder
from stbench.images.features import FeatureStore, _cut, _open_image
from stbench.images.geometry import lattice_neighbours
from stbench.images.patches import PatchRequest, PatchSet, PatchStore
from stbench_plugins.synthetic import SyntheticOptions
from stbench_plugins.synthetic.generate import open_synthetic

SPOT = PatchRequest("spot", 112.0, 32)


def _section(image, pixel, grid=None, mpp=1.0, name="S1", key="img-v1", lattice="square", pitch=200.0, loads=None):
    n = len(pixel)
    grid = np.c_[np.arange(n), np.zeros(n, int)] if grid is None else np.asarray(grid)

    def loader():
        if loads is not None:
            loads.append(1)
        return image

    return Section(name=name, patient="P", spot_ids=np.array([f"{i}" for i in range(n)]), genes=np.array(["g"]),
                   counts=sp.csr_matrix(np.ones((n, 1))), grid=grid, pixel=np.asarray(pixel, float), mpp=mpp,
                   lattice=lattice, spot_pitch_um=pitch, image_loader=loader, image_key=key)


@pytest.fixture(scope="module")
def synthetic():
    """A generated section of 50 spots (square lattice, 2 µm/px, ~800 x 1000 px)."""
    opts = SyntheticOptions(n_patients=1, sections_per_patient=1, spots_per_section=50, mpp=2.0,
                            n_genes=5, n_extra_genes=0)
    return open_synthetic(None, opts).load_section("P1S1")


@pytest.fixture
def cached(tmp_path, synthetic):
    store = PatchStore(tmp_path, "syn")
    first = store.get(synthetic, [SPOT])[SPOT.name]
    return store, synthetic, first


def test_request_names_defaults_and_checks():
    assert PatchRequest().name == "spot-112um-224px" and PatchRequest().grid == 1
    nb = PatchRequest("neighbour", 112, 64)
    assert nb.grid == 5 and nb.n_sub == 25 and nb.name == "neighbour5x5-112um-64px"
    assert PatchRequest("niche", 56.5, 32).name == "niche-56.5um-32px"
    assert PatchRequest("spot", 112, 224) == PatchRequest("spot", 112.0, 224)  # one key, one name
    assert nb.spec.kind == "neighbour" and nb.spec.grid == 5 and nb.spec.size_um == 112.0
    for bad in [dict(kind="tile"), dict(kind="niche", grid=3), dict(kind="neighbour", grid=4),
                dict(size_um=0), dict(out_px=0), dict(out_px=2.5)]:
        with pytest.raises(ConfigError):
            PatchRequest(**bad)


def test_second_get_loads_the_same_bytes_without_decoding(tmp_path, synthetic):
    loads = []
    image = synthetic.read_image()
    sec = dataclasses.replace(synthetic, image_loader=lambda: loads.append(1) or image)
    store = PatchStore(tmp_path, "syn")
    reqs = [SPOT, PatchRequest("niche", 112, 32), PatchRequest("neighbour", 112, 16, grid=3)]
    first = store.get(sec, reqs)
    assert list(first) == [r.name for r in reqs] and len(loads) == 1  # one decode for all three
    assert (store.computed, store.loaded) == (3, 0)
    again = store.get(sec, reqs)
    assert (store.computed, store.loaded) == (3, 3) and len(loads) == 1
    for r in reqs:
        assert again[r.name].patches.shape == (50, r.n_sub, r.out_px, r.out_px, 3)
        assert again[r.name].patches.tobytes() == first[r.name].patches.tobytes()
        np.testing.assert_array_equal(again[r.name].mask, first[r.name].mask)
    assert not list(store.root.rglob(".tmp-*"))  # nothing left over


def test_arrays_are_read_only_memory_maps(cached):
    store, sec, ps = cached
    for x in (ps, store.get(sec, [SPOT])[SPOT.name]):  # as computed and as loaded
        assert isinstance(x.patches, np.memmap) and x.patches.dtype == np.uint8
        assert isinstance(x.patches.base, mmap.mmap) and Path(x.patches.filename) == x.path.resolve()
        with pytest.raises(ValueError, match="read-only"):
            x.patches[0, 0, 0, 0, 0] = 1
        with pytest.raises(ValueError, match="read-only"):
            x.mask[0] = False


def test_copies_share_the_file_instead_of_the_pixels(cached):
    store, sec, ps = cached

    class Method:  # a method that (wrongly) keeps patches: the fine-tuning protocol deep-copies it
        def __init__(self):
            self.patches = {SPOT.name: ps}

    clone = copy.deepcopy(Method())
    assert clone.patches[SPOT.name] is ps and copy.copy(ps) is ps
    blob = pickle.dumps(ps)
    assert len(blob) < ps.patches.nbytes / 10  # the path travels, not the pixels
    back = pickle.loads(blob)
    assert isinstance(back.patches, np.memmap) and not back.patches.flags.writeable and not back.mask.flags.writeable
    assert back.path == ps.path and back.request == ps.request
    np.testing.assert_array_equal(back.patches, ps.patches)
    np.testing.assert_array_equal(back.mask, ps.mask)


class Recorder(Encoder):
    """Keeps every patch the feature extractor hands to the encoder."""

    name, dim, weights_id = "recorder", 1, "none"

    def __init__(self, size):
        self.input_size, self.seen = size, []

    def encode(self, patches):
        self.seen.append(patches.copy())
        return np.zeros((len(patches), 1), np.float32)


@pytest.mark.parametrize("source", ["array", "jpeg"])
def test_spot_patches_are_what_the_feature_extractor_sees(tmp_path, synthetic, source):
    sec = synthetic
    if source == "jpeg":  # a JPEG at 1 µm/px: decoded at half scale for 112 µm at 32 px (3.5 µm/px)
        from PIL import Image

        image = synthetic.read_image()
        big = Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2))
        big.save(tmp_path / "he.jpg", quality=90)
        sec = dataclasses.replace(synthetic, image_path=tmp_path / "he.jpg", image_loader=None, image_key=None,
                                  pixel=synthetic.pixel * 2, mpp=1.0)
        assert _open_image(sec, SPOT.target_mpp)[1] == 0.5
    rec = Recorder(SPOT.out_px)
    fs = FeatureStore(rec, "recorder", "syn", tmp_path).get(sec, [SPOT.spec])["spot"]
    ps = PatchStore(tmp_path, "syn").get(sec, [SPOT])[SPOT.name]
    np.testing.assert_array_equal(ps.mask, fs.mask)
    np.testing.assert_array_equal(ps.patches[ps.mask], np.concatenate(rec.seen))
    # and each is the shared cutter's patch of the geometry's box
    image, scale = _open_image(sec, SPOT.target_mpp)
    boxes = PatchStore(tmp_path, "syn").boxes(sec, SPOT)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(ps.patches[i, 0], _cut(image, boxes[i, 0], scale, SPOT.out_px))


def test_masks_flag_patches_outside_the_image(tmp_path):
    image = np.full((200, 200, 3), 60, np.uint8)
    # inside, 75 % inside, 25 % inside, wholly outside
    sec = _section(image, [[100, 100], [10, 100], [-10, 100], [-300, 100]])
    store = PatchStore(tmp_path, "t")
    ps = store.get(sec, [PatchRequest("spot", 40, 8)])["spot-40um-8px"]
    assert ps.mask[:, 0].tolist() == [True, True, False, False]
    assert (ps.patches[~ps.mask] == 255).all()  # masked: white filler, not pixels
    assert (ps.patches[0] == 60).all()
    assert (ps.patches[1][:, :, :1] > 200).all() and (ps.patches[1][:, :, 3:] == 60).all()  # padded white
    nb = store.get(sec, [PatchRequest("neighbour", 40, 8, grid=3)])["neighbour3x3-40um-8px"]
    # spot 0: a 120 px block inside the image; spot 1: its left column is off the image
    assert nb.mask[0].all() and nb.mask[1].tolist() == [False, True, True] * 3
    assert PatchStore(tmp_path, "t", min_inside=0.2).get(sec, [PatchRequest("spot", 40, 8)])[
        "spot-40um-8px"].mask[:, 0].tolist() == [True, True, True, False]


def _dot_image(pixel, shape, r=3):
    image = np.full(shape + (3,), 230, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y in pixel:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = 0
    return image


@pytest.mark.parametrize("lattice", ["square", "hex"])
def test_niche_covers_the_lattice_neighbours(tmp_path, lattice):
    pitch, mpp = (200.0, 2.0) if lattice == "square" else (100.0, 1.0)
    if lattice == "square":
        grid = np.array([(x, y) for y in range(5) for x in range(5)])
        um = grid * pitch
    else:  # Visium array coordinates: doubled columns, offset rows
        grid = np.array([(x, y) for y in range(5) for x in range(y % 2, 10, 2)])
        um = grid * [pitch / 2, pitch * np.sqrt(3) / 2]
    pixel = (um + 150) / mpp
    shape = tuple(int(v) + 150 for v in pixel.max(0)[::-1])
    sec = _section(_dot_image(pixel, shape), pixel, grid, mpp=mpp, lattice=lattice, pitch=pitch)
    req = PatchRequest("niche", 40, 64)
    store = PatchStore(tmp_path, "t")
    ps = store.get(sec, [req])[req.name]
    boxes = store.boxes(sec, req)[:, 0]
    nbs = lattice_neighbours(grid, lattice)
    centre = int(np.argmax([len(n) for n in nbs]))
    assert len(nbs[centre]) == (8 if lattice == "square" else 6)
    x0, y0, x1, y1 = boxes[centre]
    patch = ps.patches[centre, 0]
    for j in [centre, *nbs[centre]]:
        px, py = pixel[j]
        assert x0 < px < x1 and y0 < py < y1  # the neighbour's centre is in the box ...
        u = int((px - x0) / (x1 - x0) * req.out_px)
        v = int((py - y0) / (y1 - y0) * req.out_px)
        assert patch[v, u].max() < 120  # ... and its dot is in the patch's pixels
    assert (x1 - x0) * mpp == pytest.approx(2 * pitch + 40)
    # a point between spots is background: the dots are where the spots are, not everywhere
    gap = np.array([pitch / 2, pitch / 2] if lattice == "square" else [0, pitch / np.sqrt(3)]) / mpp
    u, v = ((pixel[centre] + gap - [x0, y0]) / (x1 - x0) * req.out_px).astype(int)
    assert patch[v, u].min() > 200


@pytest.mark.parametrize("change", ["image", "spots", "mpp", "pitch", "kind", "size", "grid", "out_px", "min_inside",
                                    "dataset", "section", "version"])
def test_every_keyed_setting_gives_a_new_file(cached, change, monkeypatch):
    store, sec, ps = cached
    req = SPOT
    path = store.path(sec, req)
    if change == "image":
        sec = dataclasses.replace(sec, image_key="another image")
    elif change == "spots":
        sec = dataclasses.replace(sec, pixel=sec.pixel + 1)
    elif change == "mpp":
        sec = dataclasses.replace(sec, mpp=1.5)
    elif change == "pitch":
        sec = dataclasses.replace(sec, spot_pitch_um=150.0)
    elif change == "kind":
        req = PatchRequest("niche", 112, 32)
    elif change == "size":
        req = PatchRequest("spot", 100, 32)
    elif change == "grid":
        req, path = PatchRequest("neighbour", 112, 32, grid=3), store.path(sec, PatchRequest("neighbour", 112, 32))
    elif change == "out_px":
        req = PatchRequest("spot", 112, 48)
    elif change == "min_inside":
        store = PatchStore(store.root.parent.parent, "syn", min_inside=0.9)
    elif change == "dataset":
        store = PatchStore(store.root.parent.parent, "syn2")
    elif change == "section":
        sec = dataclasses.replace(sec, name="P1S2")
    elif change == "version":
        monkeypatch.setattr(patches_mod, "PATCH_VERSION", patches_mod.PATCH_VERSION + 1)
    assert store.path(sec, req) != path
    computed = store.computed
    store.get(sec, [req])
    assert store.computed == computed + 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "sidecar missing", "stale key", "wrong shape"])
def test_damaged_cache_file_is_recomputed_with_a_warning(cached, damage):
    store, sec, first = cached
    path = store.path(sec, SPOT)
    sidecar = path.with_suffix(".json")
    expected = np.array(first.patches)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not an npy file")
    elif damage == "sidecar missing":
        sidecar.unlink()
    else:
        meta = json.loads(sidecar.read_text())
        if damage == "stale key":
            meta["key"]["size_um"] = 100.0
        else:  # an array of another shape, with a sidecar that agrees with it
            np.save(path, np.zeros((3, 1, 32, 32, 3), np.uint8))
            meta["shape"], meta["nbytes"] = [3, 1, 32, 32, 3], path.stat().st_size
        sidecar.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="corrupt or stale"):
        again = store.get(sec, [SPOT])[SPOT.name]
    assert store.computed == 2
    np.testing.assert_array_equal(again.patches, expected)
    assert store.get(sec, [SPOT])[SPOT.name].patches.shape == expected.shape and store.loaded == 1


def test_written_in_chunks_like_in_one_go(tmp_path, synthetic, monkeypatch):
    req = PatchRequest("neighbour", 112, 8, grid=3)  # 450 sub-patches
    whole = PatchStore(tmp_path / "a", "syn").get(synthetic, [req])[req.name]
    monkeypatch.setattr(patches_mod, "CHUNK_BYTES", 7 * 8 * 8 * 3)  # 7 sub-patches per chunk
    cut = []
    real = patches_mod.cut_patches
    monkeypatch.setattr(patches_mod, "cut_patches", lambda im, b, s, o: cut.append(len(b)) or real(im, b, s, o))
    chunked = PatchStore(tmp_path / "b", "syn").get(synthetic, [req])[req.name]
    assert max(cut) <= 7 and sum(cut) == int(whole.mask.sum())
    assert chunked.patches.tobytes() == whole.patches.tobytes()


def test_a_section_without_image_or_scale_is_refused(tmp_path, synthetic):
    sec = dataclasses.replace(synthetic, image_loader=None, image_key=None)
    with pytest.raises(DataError, match="no image"):
        PatchStore(tmp_path, "syn").get(sec, [SPOT])
    loads = []
    unscaled = dataclasses.replace(synthetic, mpp=None, image_loader=lambda: loads.append(1) or synthetic.read_image())
    with pytest.raises(ConfigError, match="microns-per-pixel"):
        PatchStore(tmp_path, "syn").get(unscaled, [SPOT])
    assert not loads  # refused before decoding a whole-slide image


def test_patchset_is_what_get_returns(cached):
    store, sec, ps = cached
    assert isinstance(ps, PatchSet) and len(ps) == 50 and ps.n_sub == 1 and ps.request == SPOT
    np.testing.assert_array_equal(ps.read([3, 1]), ps.patches[[3, 1]])
    assert not isinstance(ps.read(slice(0, 2)), np.memmap)
    assert SPOT.name in repr(ps)
