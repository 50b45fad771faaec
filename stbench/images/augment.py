"""Augmentation and colour normalisation of batches of patches, for methods that train on pixels.

Works on numpy arrays and torch tensors alike (on any device), per sample, without Python loops over
the batch:

* :func:`dihedral` applies one of the 8 symmetries of the square (the dihedral group D4) to a batch, the
  same one to every sample or one per sample;
* :func:`random_dihedral` draws one symmetry per sample and applies it identically to every batch in a
  list, so a spot patch and its niche turn together (HyperST);
* :func:`random_flips_rot90` flips horizontally, flips vertically and rotates by 90°, each with
  probability ½, independently per sample;
* :func:`to_float` turns uint8 (…, H, W, 3) RGB, as :class:`~stbench.images.patches.PatchSet` stores
  it, into float32 (…, 3, H, W) in [0, 1], then normalised with the ImageNet mean and std, or not.

A batch is channels-last (…, H, W, C) or channels-first (…, C, H, W); which one is read from the shape
(a channel axis has 1, 3 or 4 entries). Pass ``channels_last`` when the shape cannot tell (e.g. a 3 × 3
image). The symmetries act on square patches when each sample gets its own.

Random draws come from ``rng``: a ``numpy.random.Generator``, a ``torch.Generator`` or an int seed; the
same seed gives the same transforms.

Symmetry ``k`` = ``r + 4 f`` is "flip left-right if ``f``, then rotate by ``r`` quarter turns
counter-clockwise" (``np.rot90``): 0 identity, 1 rot90, 2 rot180, 3 rot270, 4 left-right flip,
5 transpose, 6 up-down flip, 7 anti-transpose. :func:`inverse` gives the symmetry that undoes ``k``.

A ``neighbour`` block (…, 25, H, W, 3) turns each sub-patch in place; it does not move the sub-patches
within the 5 × 5 grid.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from stbench.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS = ("imagenet", "none")
#: the symmetries of the square: k = r + 4 f (left-right flip f, then r quarter turns counter-clockwise)
N_DIHEDRAL = 8


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def inverse(k: int) -> int:
    """The symmetry that undoes ``k``: rotations invert to the opposite turn, flips are their own inverse."""
    k = int(k)
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral transform index must be 0..7, got {k}")
    return (4 - k) % 4 if k < 4 else k


def _spatial_axes(x, channels_last: Optional[bool]) -> tuple[int, int]:
    """(row axis, column axis) of a batch, as negative indices."""
    if x.ndim < 3:
        raise ValueError(f"expected a batch of images (…, H, W, C) or (…, C, H, W), got shape {tuple(x.shape)}")
    if channels_last is None:
        last, first = x.shape[-1] in (1, 3, 4), x.shape[-3] in (1, 3, 4)
        if last == first:
            raise ValueError(f"cannot tell the channel axis of a batch of shape {tuple(x.shape)}; "
                             "pass channels_last=True or False")
        channels_last = last
    return (-3, -2) if channels_last else (-2, -1)


def _apply(x, k: int, axes: tuple[int, int]):
    """One symmetry on a whole array or tensor."""
    flip, turns = divmod(int(k), 4)
    if _is_torch(x):
        import torch

        if flip:
            x = torch.flip(x, dims=(axes[1],))
        return torch.rot90(x, turns, dims=axes) if turns else x
    if flip:
        x = np.flip(x, axis=axes[1])
    return np.rot90(x, turns, axes=axes) if turns else x


def dihedral(x, k, channels_last: Optional[bool] = None):
    """Symmetry ``k`` (0..7) of a batch: one int for every sample, or an (B,) array/tensor, one per sample.

    Returns a new array or tensor of the same type (numpy results are contiguous copies).
    """
    axes = _spatial_axes(x, channels_last)
    if (k.ndim if _is_torch(k) else np.ndim(k)) == 0:
        k = int(k)
        if not 0 <= k < N_DIHEDRAL:
            raise ValueError(f"dihedral transform index must be 0..7, got {k}")
        out = _apply(x, k, axes)
        return out.contiguous() if _is_torch(out) else np.ascontiguousarray(out)
    ks = k.detach().cpu().numpy() if _is_torch(k) else np.asarray(k)
    ks = ks.astype(np.int64).ravel()
    if len(ks) != x.shape[0]:
        raise ValueError(f"{len(ks)} transform indices for a batch of {x.shape[0]}")
    if ((ks < 0) | (ks >= N_DIHEDRAL)).any():
        raise ValueError(f"dihedral transform indices must be 0..7, got {sorted(set(ks.tolist()))}")
    if x.shape[axes[0]] != x.shape[axes[1]] and (ks % 2).any():
        raise ValueError(f"per-sample quarter turns need square images, got {x.shape[axes[0]]} x {x.shape[axes[1]]}")
    if _is_torch(x):
        import torch

        out = torch.empty_like(x)
        for value in np.unique(ks):
            idx = torch.as_tensor(np.flatnonzero(ks == value), device=x.device)
            out[idx] = _apply(x[idx], value, axes)
        return out
    x = np.asarray(x)
    out = np.empty_like(x)
    for value in np.unique(ks):
        idx = np.flatnonzero(ks == value)
        out[idx] = _apply(x[idx], value, axes)
    return out


def _generator(rng):
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    if isinstance(rng, np.random.Generator) or _is_torch(rng):
        return rng
    raise TypeError(f"rng must be a numpy.random.Generator, a torch.Generator or an int seed, got {type(rng).__name__}")


def _integers(rng, high: int, n: int) -> np.ndarray:
    rng = _generator(rng)
    if isinstance(rng, np.random.Generator):
        return rng.integers(0, high, n)
    import torch

    return torch.randint(0, high, (n,), generator=rng, device=rng.device).cpu().numpy()


def _coins(rng, shape: tuple) -> np.ndarray:
    rng = _generator(rng)
    if isinstance(rng, np.random.Generator):
        return rng.random(shape) < 0.5
    import torch

    return (torch.rand(shape, generator=rng, device=rng.device) < 0.5).cpu().numpy()


def _batches(xs) -> tuple[list, bool]:
    single = not isinstance(xs, (list, tuple))
    batches = [xs] if single else list(xs)
    if not batches:
        raise ValueError("no batches to transform")
    n = batches[0].shape[0]
    if any(b.shape[0] != n for b in batches):
        raise ValueError(f"batches of different lengths: {[b.shape[0] for b in batches]}")
    return batches, single


def random_dihedral(xs, rng, channels_last: Optional[bool] = None, return_k: bool = False):
    """One random symmetry per sample, the same for every batch of ``xs`` (e.g. ``[spot, niche]``).

    ``xs``: one batch or a list of batches with equal first dimension. Returns the same structure
    (and the (B,) symmetry indices when ``return_k``).
    """
    batches, single = _batches(xs)
    ks = _integers(rng, N_DIHEDRAL, batches[0].shape[0])
    out = [dihedral(b, ks, channels_last) for b in batches]
    out = out[0] if single else out
    return (out, ks) if return_k else out


def _flips_to_k() -> np.ndarray:
    """Symmetry index of "left-right flip if h, then up-down flip if v, then rotate 90° if r"."""
    probe = np.arange(16).reshape(1, 4, 4, 1)
    table = np.zeros((2, 2, 2), dtype=np.int64)
    images = [_apply(probe, k, (-3, -2)) for k in range(N_DIHEDRAL)]
    for h in (0, 1):
        for v in (0, 1):
            for r in (0, 1):
                y = probe
                if h:
                    y = np.flip(y, axis=-2)
                if v:
                    y = np.flip(y, axis=-3)
                if r:
                    y = np.rot90(y, 1, axes=(-3, -2))
                table[h, v, r] = next(k for k, im in enumerate(images) if np.array_equal(im, y))
    return table


_FLIPS_TO_K = _flips_to_k()


def random_flips_rot90(xs, rng, channels_last: Optional[bool] = None, return_k: bool = False):
    """Per sample, a left-right flip, an up-down flip and a 90° turn, each with probability ½ (the same
    for every batch of ``xs`` when it is a list). Returns what :func:`random_dihedral` returns."""
    batches, single = _batches(xs)
    coins = _coins(rng, (batches[0].shape[0], 3)).astype(np.int64)
    ks = _FLIPS_TO_K[coins[:, 0], coins[:, 1], coins[:, 2]]
    out = [dihedral(b, ks, channels_last) for b in batches]
    out = out[0] if single else out
    return (out, ks) if return_k else out


def to_float(x, normalise: str = "imagenet"):
    """uint8 RGB (…, H, W, 3) → float32 (…, 3, H, W): ``/255``, then ImageNet mean/std if ``"imagenet"``.

    numpy in, numpy out; torch in, torch out on the same device (move uint8 to the GPU first: it is a
    quarter of the bytes).
    """
    if normalise not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {normalise!r}; choose one of {', '.join(NORMALISATIONS)}")
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB patches (…, H, W, 3), got shape {tuple(x.shape)}")
    if _is_torch(x):
        import torch

        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 patches, got {x.dtype}")
        y = x.movedim(-1, -3).to(torch.float32).div_(255.0)
        if normalise == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=y.device).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=y.device).view(3, 1, 1)
            y = y.sub_(mean).div_(std)
        return y.contiguous()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 patches, got {x.dtype}")
    y = np.moveaxis(x, -1, -3).astype(np.float32, order="C")  # a contiguous copy in the new layout
    y /= 255.0
    if normalise == "imagenet":
        y -= np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
        y /= np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    return y
