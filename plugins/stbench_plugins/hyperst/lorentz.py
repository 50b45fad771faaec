"""Lorentz-model (hyperboloid) operations for HyperST, and their Euclidean counterparts.

Implements METHODS.md §3, bullet "Lorentz-model operations" (HyperST's hyperbolic geometry, identical to MERU's),
written from the formulas listed there:

* A point is stored as its **space components** x ∈ R^D; its time component is x_t = sqrt(1/c + ‖x‖²), so that the
  full vector (x_t, x) lies on the hyperboloid ⟨x, x⟩_L = −1/c (curvature −c, c > 0).
* expmap0(v) = sinh(√c‖v‖) · v / (√c‖v‖); the sinh argument is clamped to [1e−8, asinh(2^15)], the denominator ≥ 1e−8.
* ⟨x, y⟩_L = x·y − x_t y_t.
* d(x, y) = arccosh(max(−c⟨x, y⟩_L, 1 + 1e−8)) / √c.
* aper(x) = arcsin(clamp(2K / (√c‖x‖ + 1e−8), −1 + ε, 1 − ε)), K = ``min_radius`` = 0.1.
* ext(x, y) (MERU's "oxy_angle", the exterior angle at x of the triangle O-x-y), with s = c·(x·y − x_t y_t):
  arccos(clamp((y_t + s·x_t) / (‖x‖·sqrt(max(s² − 1, ε)) + ε), −1 + ε, 1 − ε)), ε = 1e−8.
* MERU entailment: max(0, ext(parent, child) − aper(parent)) per sample (the batch mean is taken by the caller,
  see ``losses.py``; HyperST scales the aperture, METHODS.md §7.3 / AMB-18, hence ``aperture_scale``).

Everything is computed in float32, also under autocast ("Compute all hyperbolic quantities in float32, even under
AMP", §3; "Hyperbolic ops run in fp32", §7.4): inputs are cast to float32 and autocast is disabled inside.

The Euclidean counterparts serve the ablation "Euclidean counterpart" (same architecture, no expmap, negative
Euclidean distance in the contrastive terms, Euclidean entailment cones as in Ganea et al. 2018): half-aperture
arcsin(K/‖x‖) and the angle at x between y − x and x, with the same kind of clamps (arcsin/arccos arguments in
[−1 + ε, 1 − ε], norms ≥ ε).

Numerical note [INF]. In float32, 1 ± 1e−8 rounds to exactly 1, so the clamps above are in effect [−1, 1] and
[1, ∞). At those bounds arcsin/arccos/arccosh have infinite derivatives. The clamps here are written so that a value
at or beyond a bound gets a **zero** gradient (``_clamp``); forward values are exactly those of an ordinary clamp.
This keeps gradients finite at and near the origin and for identical points (d(x, x), child on the parent's ray).
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "EPS",
    "MIN_RADIUS",
    "dist",
    "entailment",
    "euclidean_entailment",
    "euclidean_exterior_angle",
    "euclidean_half_aperture",
    "expmap0",
    "exterior_angle",
    "half_aperture",
    "inner",
    "pairwise_dist",
    "pairwise_inner",
    "time_component",
]

EPS = 1e-8
"""ε of METHODS.md §3 (the expmap0 clamps, the arccosh floor 1 + ε, the arcsin/arccos clamps, the ext denominators)."""

MIN_RADIUS = 0.1
"""K ("min_radius", the HyperST summary's Q) of the entailment-cone half-aperture, METHODS.md §3 and §7.3."""

_SINH_MAX = math.asinh(2.0**15)  # upper clamp of the sinh argument in expmap0 (§3)


# ----------------------------------------------------------------------------------------------------------- helpers


def _no_autocast(device: torch.device):
    """A context in which autocast is off for ``device`` (a null context where autocast knows no such device)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not support: nothing to disable
        return contextlib.nullcontext()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float32)


def _curv(c, like: torch.Tensor) -> torch.Tensor:
    """The curvature parameter c (> 0; float or tensor, e.g. a learnable one) as a float32 tensor on like's device."""
    if isinstance(c, (int, float)) and not c > 0:  # a tensor c is not checked (no device sync per call)
        raise ValueError(f"the curvature parameter c must be > 0 (the curvature is -c), got {c}")
    return torch.as_tensor(c, device=like.device).to(torch.float32)


def _clamp(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """clamp(x, lo, hi) whose gradient is zero at and beyond the bounds.

    Forward values equal ``torch.clamp``. ``torch.clamp`` passes the gradient through at a value equal to a bound,
    and whether a float32 value "equals" 1 ± 1e−8 depends on how the comparison rounds; written with strict
    inequalities the zero gradient does not depend on it. Used before arcsin/arccos/arccosh/sqrt, whose derivatives
    are infinite at the float32-rounded bounds.
    """
    if lo is not None:
        x = torch.where(x > lo, x, torch.full_like(x, lo))
    if hi is not None:
        x = torch.where(x < hi, x, torch.full_like(x, hi))
    return x


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(x * x, dim=-1)


def _safe_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """max(‖x‖, eps) over the last axis, with a zero gradient where ‖x‖ ≤ eps."""
    return torch.sqrt(_clamp(_sq_norm(x), lo=eps * eps))


# --------------------------------------------------------------------------------------------------- Lorentz model


def time_component(x: torch.Tensor, c) -> torch.Tensor:
    """x_t = sqrt(1/c + ‖x‖²) for space components x (..., D) → (...); METHODS.md §3."""
    with _no_autocast(x.device):
        x = _f32(x)
        c = _curv(c, x)
        return torch.sqrt(1.0 / c + _sq_norm(x))


def expmap0(v: torch.Tensor, c) -> torch.Tensor:
    """Exponential map at the hyperboloid's origin: tangent vector v (..., D) → space components (..., D).

    expmap0(v) = sinh(√c‖v‖) · v / (√c‖v‖), with the sinh argument clamped to [1e−8, asinh(2^15)] and the denominator
    clamped ≥ 1e−8 (METHODS.md §3). Float32.
    """
    with _no_autocast(v.device):
        v = _f32(v)
        c = _curv(c, v)
        r = torch.sqrt(c) * torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        num = torch.sinh(torch.clamp(r, min=EPS, max=_SINH_MAX))
        den = torch.clamp(r, min=EPS)
        return num / den * v


def inner(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Lorentz inner product ⟨x, y⟩_L = x·y − x_t y_t of space components, elementwise over the batch (..., D) → (...).

    METHODS.md §3. Float32.
    """
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        c = _curv(c, x)
        xt = torch.sqrt(1.0 / c + _sq_norm(x))
        yt = torch.sqrt(1.0 / c + _sq_norm(y))
        return torch.sum(x * y, dim=-1) - xt * yt


def pairwise_inner(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """All-pairs Lorentz inner products: x (B, D), y (B', D) → (B, B') with entry [i, j] = ⟨x_i, y_j⟩_L. Float32."""
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        c = _curv(c, x)
        xt = torch.sqrt(1.0 / c + _sq_norm(x))
        yt = torch.sqrt(1.0 / c + _sq_norm(y))
        return x @ y.transpose(-1, -2) - xt.unsqueeze(-1) * yt.unsqueeze(-2)


def _arccosh_dist(neg_c_inner: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # d = arccosh(max(−c⟨x,y⟩_L, 1 + 1e−8)) / √c  (§3)
    return torch.acosh(_clamp(neg_c_inner, lo=1.0 + EPS)) / torch.sqrt(c)


def dist(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Geodesic distance, elementwise over the batch: x, y (..., D) → (...). METHODS.md §3. Float32.

    d(x, y) = arccosh(max(−c⟨x, y⟩_L, 1 + 1e−8)) / √c; d(x, x) is 0 up to that floor.
    """
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        c = _curv(c, x)
        return _arccosh_dist(-c * inner(x, y, c), c)


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """All-pairs geodesic distances: x (B, D), y (B', D) → (B, B'), entry [i, j] = d(x_i, y_j). Float32.

    Used for the contrastive logits −s·d of HCA (METHODS.md §7.3).
    """
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        c = _curv(c, x)
        return _arccosh_dist(-c * pairwise_inner(x, y, c), c)


def half_aperture(x: torch.Tensor, c, min_radius: float = MIN_RADIUS) -> torch.Tensor:
    """Half-aperture of the entailment cone at x (..., D) → (...). METHODS.md §3. Float32.

    aper(x) = arcsin(clamp(2K / (√c‖x‖ + 1e−8), −1 + ε, 1 − ε)), K = ``min_radius`` (0.1). Near the origin the
    argument exceeds 1 and the aperture saturates at π/2 (zero gradient there).
    """
    with _no_autocast(x.device):
        x = _f32(x)
        c = _curv(c, x)
        arg = 2.0 * min_radius / (torch.sqrt(c) * torch.linalg.vector_norm(x, dim=-1) + EPS)
        return torch.asin(_clamp(arg, lo=-1.0 + EPS, hi=1.0 - EPS))


def exterior_angle(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Exterior angle at x of the hyperbolic triangle O-x-y (MERU's "oxy_angle"): x, y (..., D) → (...). Float32.

    With s = c·(x·y − x_t y_t) (x_t, y_t = sqrt(1/c + ‖·‖²), without √c), METHODS.md §3:
    ext(x, y) = arccos(clamp((y_t + s·x_t) / (‖x‖·sqrt(max(s² − 1, ε)) + ε), −1 + ε, 1 − ε)), ε = 1e−8.
    It is 0 when y lies beyond x on the geodesic ray from the origin through x, and π when y lies between O and x.
    """
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        c = _curv(c, x)
        xt = torch.sqrt(1.0 / c + _sq_norm(x))
        yt = torch.sqrt(1.0 / c + _sq_norm(y))
        s = c * (torch.sum(x * y, dim=-1) - xt * yt)
        num = yt + s * xt
        den = torch.linalg.vector_norm(x, dim=-1) * torch.sqrt(_clamp(s * s - 1.0, lo=EPS)) + EPS
        return torch.acos(_clamp(num / den, lo=-1.0 + EPS, hi=1.0 - EPS))


def entailment(parent: torch.Tensor, child: torch.Tensor, c, aperture_scale: float = 1.0,
               min_radius: float = MIN_RADIUS) -> torch.Tensor:
    """Per-sample entailment-cone violation max(0, ext(parent, child) − aperture_scale·aper(parent)) → (...).

    METHODS.md §3 (MERU, ``aperture_scale`` = 1) and §7.3 (HyperST's code form scales the aperture by 0.7 / 1.2,
    AMB-18). The batch mean is taken by the caller. Float32.
    """
    with _no_autocast(parent.device):
        ext = exterior_angle(parent, child, c)
        aper = half_aperture(parent, c, min_radius=min_radius)
        return torch.clamp(ext - aperture_scale * aper, min=0.0)


# ------------------------------------------------------------------------------------------ Euclidean counterparts


def euclidean_half_aperture(x: torch.Tensor, K: float = MIN_RADIUS) -> torch.Tensor:
    """Euclidean entailment-cone half-aperture (Ganea et al. 2018): arcsin(K/‖x‖), x (..., D) → (...). Float32.

    Clamps as for the hyperbolic cone: ‖x‖ ≥ ε, the arcsin argument in [−1 + ε, 1 − ε] (π/2 for ‖x‖ ≤ K).
    """
    with _no_autocast(x.device):
        x = _f32(x)
        return torch.asin(_clamp(K / _safe_norm(x), lo=-1.0 + EPS, hi=1.0 - EPS))


def euclidean_exterior_angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle at x between y − x and x (Ganea et al. 2018's Ξ(x, y)): x, y (..., D) → (...). Float32.

    arccos(clamp(⟨y − x, x⟩ / (max(‖y − x‖, ε)·max(‖x‖, ε)), −1 + ε, 1 − ε)); the Euclidean analogue of ext.
    """
    with _no_autocast(x.device):
        x, y = _f32(x), _f32(y)
        d = y - x
        cos = torch.sum(d * x, dim=-1) / (_safe_norm(d) * _safe_norm(x))
        return torch.acos(_clamp(cos, lo=-1.0 + EPS, hi=1.0 - EPS))


def euclidean_entailment(parent: torch.Tensor, child: torch.Tensor, aperture_scale: float = 1.0,
                         K: float = MIN_RADIUS) -> torch.Tensor:
    """Per-sample Euclidean cone violation max(0, Ξ(parent, child) − aperture_scale·arcsin(K/‖parent‖)). Float32.

    The "Euclidean counterpart" ablation of HyperST (METHODS.md §7.3 losses with Euclidean geometry).
    """
    with _no_autocast(parent.device):
        ext = euclidean_exterior_angle(parent, child)
        aper = euclidean_half_aperture(parent, K=K)
        return torch.clamp(ext - aperture_scale * aper, min=0.0)
