"""hefeat: the offline H&E feature encoder (registration, shapes, robustness, sensitivity, errors)."""

import time

import numpy as np
import pytest

from stbench.errors import ConfigError
from stbench.images.encoder import Encoder
from stbench.specs import EncoderSpec, resolve
from stbench_plugins import hefeat
from stbench_plugins.hefeat.features import FEATURE_NAMES, HEFeatures

PINK = (230, 150, 190)  # eosin-stained stroma
PURPLE = (80, 50, 140)  # haematoxylin-stained nucleus


def _uniform(colour, size=64, n=1):
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (n, size, size, 3)).copy()


def _dotted(size=64, n_dots=40, radius=2.5, seed=0):
    """A pink patch with purple discs of ~5 px (nuclei at 1.75 µm/px)."""
    rng = np.random.default_rng(seed)
    patch = _uniform(PINK, size)[0]
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in rng.uniform(3, size - 3, size=(n_dots, 2)):
        patch[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = PURPLE
    return patch[None]


def _feature(features, name):
    return features[:, FEATURE_NAMES.index(name)]


@pytest.fixture(scope="module")
def encoder():
    return HEFeatures()


def test_registers_hefeat():
    specs = []
    hefeat.stbench_register_encoders(register=specs.append)
    assert [s.name for s in specs] == ["hefeat"]
    assert isinstance(specs[0], EncoderSpec)
    enc = resolve(specs[0].factory)(None)
    assert isinstance(enc, Encoder) and enc.name == "hefeat"


def test_contract_attributes(encoder):
    assert encoder.input_size == 64 and encoder.weights_id == "none" and encoder.batch_size == 512
    assert encoder.dim == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    assert encoder.describe()["dim"] == encoder.dim


@pytest.mark.parametrize("size", [64, 48])
def test_finite_on_any_input(encoder, size):
    rng = np.random.default_rng(size)
    batch = np.concatenate([
        rng.integers(0, 256, size=(5, size, size, 3), dtype=np.uint8),  # noise
        _uniform((255, 255, 255), size),  # glass only
        _uniform((0, 0, 0), size),
        _uniform(PINK, size),
        _uniform((128, 128, 128), size),
    ])
    out = encoder.encode(batch)
    assert out.shape == (len(batch), encoder.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    white = out[5]
    assert _feature(out, "background_frac")[5] == 1.0
    # all glass: the tissue colour falls back to the whole patch
    assert np.allclose(white[[FEATURE_NAMES.index(c) for c in ("tissue_r", "tissue_g", "tissue_b")]], 1.0)
    # a flat patch has no texture and no nuclei, whatever its colour
    texture = [i for i, name in enumerate(FEATURE_NAMES) if "_grad_" in name or "_lap_" in name or "_localstd_" in name]
    assert np.allclose(out[5:][:, texture], 0.0, atol=1e-6)
    assert (_feature(out, "nuclei_per_100px")[5:] == 0).all()


def test_deterministic_and_batch_independent(encoder):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)  # spans several thread chunks
    first = encoder.encode(batch)
    assert np.array_equal(first, encoder.encode(batch.copy()))
    assert np.array_equal(first, HEFeatures("none").encode(batch))
    np.testing.assert_allclose(encoder.encode(batch[7:8]), first[7:8], rtol=1e-6, atol=1e-6)


def test_read_only_and_empty_input(encoder):
    batch = np.random.default_rng(2).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    frozen = batch.copy()
    frozen.flags.writeable = False
    assert np.array_equal(encoder.encode(frozen), encoder.encode(batch))
    assert encoder.encode(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, encoder.dim)


def test_haematoxylin_dots_raise_nuclear_features(encoder):
    out = encoder.encode(np.concatenate([_dotted(), _uniform(PINK)]))
    dots, pink = out
    for name in ("H_mean", "H_p90", "H_frac_gt0.4", "nuclei_per_100px", "H_grad_s1", "H_centre"):
        assert dots[FEATURE_NAMES.index(name)] > pink[FEATURE_NAMES.index(name)] + 0.05, name
    # the 40 discs are counted as roughly 40 nuclei (a few touch and merge)
    assert 20 <= _feature(out, "nuclei_per_100px")[0] * 64 * 64 / 100 <= 45


def test_pink_has_more_eosin_than_white(encoder):
    pink, white = encoder.encode(np.concatenate([_uniform(PINK), _uniform((255, 255, 255))]))
    e = FEATURE_NAMES.index("E_mean")
    assert pink[e] > white[e] + 0.1
    assert pink[FEATURE_NAMES.index("background_frac")] == 0.0


@pytest.mark.parametrize("weights", ["/tmp/some.safetensors", "imagenet", ""])
def test_weights_are_refused(weights):
    with pytest.raises(ConfigError, match="hefeat has no weights"):
        HEFeatures(weights)


@pytest.mark.parametrize("weights", [None, "random", "none"])
def test_no_weights_accepted(weights):
    assert HEFeatures(weights).weights_id == "none"


def test_bad_shapes_are_refused(encoder):
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((2, 64, 48, 3), np.uint8))
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((2, 64, 64, 3), np.float32))


def test_throughput_smoke(encoder):
    """Encodes 2048 patches; prints the rate (pytest -s) but asserts nothing about time."""
    batch = np.random.default_rng(3).integers(0, 256, size=(2048, 64, 64, 3), dtype=np.uint8)
    start = time.perf_counter()
    step = encoder.batch_size
    out = np.concatenate([encoder.encode(batch[i:i + step]) for i in range(0, len(batch), step)])
    elapsed = time.perf_counter() - start
    assert out.shape == (2048, encoder.dim)
    print(f"\nhefeat: {len(batch) / elapsed:.0f} patches/s at 64 px")
