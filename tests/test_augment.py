"""Augmentation of patch batches: the 8 symmetries of the square, shared transforms for a spot and its
niche, random flips and turns, and colour normalisation."""

import numpy as np
import pytest
import torch

from stbench.errors import ConfigError
from stbench.images.augment import (IMAGENET_MEAN, IMAGENET_STD, dihedral, inverse, random_dihedral,
                                    random_flips_rot90, to_float)


def _asymmetric(b=2, h=6, channels=3):
    """Channels-last uint8 images that no symmetry of the square maps onto themselves."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (b, h, h, channels), dtype=np.uint8)


def _all(x):
    return [dihedral(x, k) for k in range(8)]


def test_the_eight_symmetries_are_distinct_and_named_as_documented():
    x = _asymmetric()
    outs = _all(x)
    assert len({o.tobytes() for o in outs}) == 8
    a = x[0, :, :, 0]
    expected = [a, np.rot90(a), np.rot90(a, 2), np.rot90(a, 3), a[:, ::-1], a.T, a[::-1], np.rot90(a, 2).T]
    for k in range(8):
        np.testing.assert_array_equal(outs[k][0, :, :, 0], expected[k])


def test_the_symmetries_form_a_group():
    x = _asymmetric()
    outs = {o.tobytes(): k for k, o in enumerate(_all(x))}
    for k in range(8):
        np.testing.assert_array_equal(dihedral(dihedral(x, k), inverse(k)), x)
        for j in range(8):  # closed under composition
            assert dihedral(dihedral(x, k), j).tobytes() in outs
    assert [inverse(k) for k in range(8)] == [0, 3, 2, 1, 4, 5, 6, 7]


def test_numpy_channels_last_and_torch_channels_first_agree():
    x = _asymmetric(4, 8)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    ks = np.array([1, 4, 7, 2])
    for k in [*range(8), ks, torch.as_tensor(ks)]:
        got = dihedral(t, k)
        assert isinstance(got, torch.Tensor) and got.shape == t.shape
        np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), dihedral(x, k))
    # per sample: sample i gets transform ks[i]
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(dihedral(x, ks)[i], dihedral(x[i : i + 1], int(k))[0])
    with pytest.raises(ValueError, match="channel axis"):
        dihedral(np.zeros((2, 3, 3, 3)), 1)
    np.testing.assert_array_equal(dihedral(np.arange(9).reshape(1, 3, 3, 1), 1, channels_last=True)[0, :, :, 0],
                                  np.rot90(np.arange(9).reshape(3, 3)))
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_spot_and_niche_turn_together():
    spot = _asymmetric(64, 5)
    niche = np.kron(spot, np.ones((1, 3, 3, 1), np.uint8))  # the same picture at 3x: (64, 15, 15, 3)
    turned_spot, turned_niche = random_dihedral([spot, niche], np.random.default_rng(1))
    np.testing.assert_array_equal(turned_niche, np.kron(turned_spot, np.ones((1, 3, 3, 1), np.uint8)))
    # and in torch, channels-first, with a torch generator
    ts, tn = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (spot, niche))
    (out_s, out_n), ks = random_dihedral([ts, tn], torch.Generator().manual_seed(0), return_k=True)
    assert len(set(ks.tolist())) == 8  # one transform per sample, all 8 drawn among 64
    for i, k in enumerate(ks):
        assert torch.equal(out_s[i], dihedral(ts[i : i + 1], int(k))[0])
        assert torch.equal(out_n[i], dihedral(tn[i : i + 1], int(k))[0])


@pytest.mark.parametrize("fn", [random_dihedral, random_flips_rot90])
def test_random_transforms_are_seeded(fn):
    x = _asymmetric(32, 5)
    a, b = fn(x, np.random.default_rng(7)), fn(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fn(x, np.random.default_rng(8)))
    np.testing.assert_array_equal(fn(x, 7), a)  # an int seeds a numpy generator
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    assert torch.equal(fn(t, torch.Generator().manual_seed(3)), fn(t, torch.Generator().manual_seed(3)))


def test_flips_and_turn_each_with_probability_one_half():
    x = _asymmetric(4000, 5)
    out, ks = random_flips_rot90(x, np.random.default_rng(0), return_k=True)
    variants = [dihedral(x, k) for k in range(8)]
    for i in (0, 1, 2, 3999):
        assert any(np.array_equal(out[i], v[i]) for v in variants)
    counts = np.bincount(ks, minlength=8) / len(ks)
    np.testing.assert_allclose(counts, 1 / 8, atol=0.02)  # three fair coins: the 8 outcomes uniform
    turned = np.isin(ks, [1, 3, 5, 7]).mean()  # an odd number of quarter turns: the rot90 coin
    assert abs(turned - 0.5) < 0.03


def test_to_float_layout_and_normalisation():
    x = np.zeros((2, 4, 5, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 255, 0, 128
    plain = to_float(x, "none")
    assert plain.shape == (2, 3, 4, 5) and plain.dtype == np.float32 and plain.flags.c_contiguous
    np.testing.assert_allclose(plain[:, :, 0, 0], [[1.0, 0.0, 128 / 255]] * 2, rtol=1e-6)
    net = to_float(x)  # imagenet by default
    want = (np.array([1.0, 0.0, 128 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(net[1, :, 3, 4], want, rtol=1e-5)
    np.testing.assert_allclose(net[0, 0], (1 - 0.485) / 0.229, rtol=1e-5)
    t = to_float(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(t.numpy(), net, rtol=1e-6)
    np.testing.assert_allclose(to_float(torch.from_numpy(x), "none").numpy(), plain)
    # neighbour blocks keep their leading axes
    assert to_float(np.zeros((2, 25, 8, 8, 3), np.uint8)).shape == (2, 25, 3, 8, 8)
    with pytest.raises(ConfigError, match="normalisation"):
        to_float(x, "zscore")
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.astype(np.float32))


def test_to_float_reads_memory_mapped_patches(tmp_path):
    x = _asymmetric(3, 6)
    np.save(tmp_path / "p.npy", x)
    mm = np.load(tmp_path / "p.npy", mmap_mode="r")
    out = to_float(mm[:2], "none")
    assert type(out) is np.ndarray
    np.testing.assert_allclose(out, x[:2].transpose(0, 3, 1, 2) / 255, rtol=1e-6)
