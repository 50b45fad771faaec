"""HyperST Lorentz-model operations and Euclidean cones (METHODS.md §3, §7.3) against independent computations.

The references below are float64 numpy written differently from the implementation: the hyperboloid point of
expmap0 through cosh/sinh of the geodesic, distances through the Poincaré-ball model, exterior angles through the
hyperbolic law of cosines, Euclidean angles through atan2.
"""

import math

import numpy as np
import pytest
import torch
from stbench_plugins.hyperst import lorentz as L

CURVS = [0.1, 0.5, 1.0, 2.0, 10.0]


def f64(t):
    return t.detach().double().cpu().numpy()


def ref_poincare_dist(x, y, c):
    """Geodesic distance via the Poincaré ball of radius 1/√c (x, y: space components of hyperboloid points)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = math.sqrt(c)
    xt = np.sqrt(1 / c + (x * x).sum(-1, keepdims=True))
    yt = np.sqrt(1 / c + (y * y).sum(-1, keepdims=True))
    p, q = x / (1 + k * xt), y / (1 + k * yt)
    pq = ((p - q) ** 2).sum(-1)
    num = 2 * c * pq
    den = (1 - c * (p * p).sum(-1)) * (1 - c * (q * q).sum(-1))
    return np.arccosh(1 + num / den) / k


def ref_exterior_angle(x, y, c):
    """π − (angle at x of the geodesic triangle O-x-y), by the hyperbolic law of cosines at curvature −c."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = math.sqrt(c)
    o = np.zeros_like(x)
    a, b, e = k * ref_poincare_dist(o, x, c), k * ref_poincare_dist(x, y, c), k * ref_poincare_dist(o, y, c)
    cos_oxy = (np.cosh(a) * np.cosh(b) - np.cosh(e)) / (np.sinh(a) * np.sinh(b))
    return math.pi - np.arccos(np.clip(cos_oxy, -1, 1))


def rot2(v, theta):
    """Rotate the first two coordinates of v (..., D) by theta."""
    out = v.clone()
    out[..., 0] = math.cos(theta) * v[..., 0] - math.sin(theta) * v[..., 1]
    out[..., 1] = math.sin(theta) * v[..., 0] + math.cos(theta) * v[..., 1]
    return out


# ---------------------------------------------------------------------------------------------------------- expmap0


@pytest.mark.parametrize("c", CURVS)
def test_expmap0_lands_on_the_hyperboloid(c):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 5, generator=g)
    v = u / u.norm(dim=-1, keepdim=True) * torch.linspace(0.05, 1.2, 6)[:, None]  # √c‖v‖ < asinh(2^15)
    x = L.expmap0(v, c)
    assert x.dtype == torch.float32 and x.shape == v.shape
    r = np.linalg.norm(f64(v), axis=-1)
    # the geodesic from the origin (1/√c, 0) with unit tangent u: (cosh(√c r)/√c, sinh(√c r)/√c · u)
    t_expected = np.cosh(math.sqrt(c) * r) / math.sqrt(c)
    space_expected = (np.sinh(math.sqrt(c) * r) / (math.sqrt(c) * r))[:, None] * f64(v)
    np.testing.assert_allclose(f64(x), space_expected, rtol=1e-5, atol=1e-7)
    # the full (time, space) vector lies on <X, X>_L = -1/c
    full = np.concatenate([t_expected[:, None], f64(x)], axis=1)
    minkowski = -full[:, 0] ** 2 + (full[:, 1:] ** 2).sum(-1)
    np.testing.assert_allclose(minkowski, -1 / c, rtol=1e-4)
    np.testing.assert_allclose(f64(L.time_component(x, c)), t_expected, rtol=1e-5)
    np.testing.assert_allclose(f64(L.inner(x, x, c)), -1 / c, rtol=1e-4)
    np.testing.assert_allclose(np.diag(f64(L.pairwise_inner(x, x, c))), -1 / c, rtol=1e-4)


def test_expmap0_tiny_vectors_are_the_identity_and_large_ones_stay_finite():
    v = torch.tensor([[1e-9, -2e-9, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(f64(L.expmap0(v, 1.0)), f64(v), rtol=1e-6, atol=0)
    big = L.expmap0(torch.tensor([[1e4, 0.0]]), 1.0)  # sinh argument clamped at asinh(2^15)
    assert torch.isfinite(big).all()
    np.testing.assert_allclose(f64(big)[0, 0], 2.0**15, rtol=1e-5)


def test_curvature_can_be_a_learnable_tensor_and_must_be_positive():
    c = torch.tensor(0.5, requires_grad=True)
    d = L.dist(torch.zeros(1, 3), L.expmap0(torch.tensor([[0.3, 0.4, 0.0]]), c), c)
    np.testing.assert_allclose(f64(d), [0.5], rtol=1e-5)
    x = L.expmap0(torch.tensor([[1.0, 0.0]]), c)
    L.dist(x, torch.zeros(1, 2), c).sum().backward()
    assert torch.isfinite(c.grad)
    with pytest.raises(ValueError, match="c must be > 0"):
        L.expmap0(torch.ones(1, 2), 0.0)


# ------------------------------------------------------------------------------------------------------- distances


@pytest.mark.parametrize("c", CURVS)
def test_dist_matches_the_poincare_ball_and_is_symmetric(c):
    g = torch.Generator().manual_seed(1)
    x = L.expmap0(torch.randn(5, 4, generator=g) * 0.6, c)
    y = L.expmap0(torch.randn(5, 4, generator=g) * 0.6, c)
    d = L.dist(x, y, c)
    np.testing.assert_allclose(f64(d), ref_poincare_dist(f64(x), f64(y), c), rtol=1e-4, atol=1e-4)
    assert torch.equal(d, L.dist(y, x, c))
    pd = L.pairwise_dist(x, y, c)
    assert pd.shape == (5, 5)
    ref = ref_poincare_dist(f64(x)[:, None, :], f64(y)[None, :, :], c)
    np.testing.assert_allclose(f64(pd), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(pd), f64(L.pairwise_dist(y, x, c)).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.diag(f64(pd)), f64(d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", CURVS)
def test_dist_to_itself_is_zero_up_to_the_clamp(c):
    x = L.expmap0(torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.3], [0.7, 0.2, -0.5], [1e-9, 0.0, 0.0]]), c)
    d = L.dist(x, x, c)
    assert (d >= 0).all()
    np.testing.assert_allclose(f64(d), 0.0, atol=5e-3)
    np.testing.assert_allclose(np.diag(f64(L.pairwise_dist(x, x, c))), 0.0, atol=5e-3)


@pytest.mark.parametrize("c", CURVS)
def test_distance_from_the_origin_is_the_tangent_norm(c):
    u = torch.tensor([0.6, 0.0, -0.8])
    r = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0])
    v = r[:, None] * u
    d = L.dist(torch.zeros_like(v), L.expmap0(v, c), c)
    np.testing.assert_allclose(f64(d), f64(r), rtol=1e-3)


# ----------------------------------------------------------------------------------------------- cones and angles


def test_half_aperture_by_hand():
    cases = [  # (x, c, K, expected)
        ([0.5, 0.0], 1.0, 0.1, math.asin(0.2 / 0.5)),
        ([0.6, 0.8], 4.0, 0.1, math.asin(0.2 / 2.0)),
        ([0.0, 3.0], 0.25, 0.1, math.asin(0.2 / 1.5)),
        ([0.6, 0.8], 1.0, 0.2, math.asin(0.4)),
        ([0.01, 0.0], 1.0, 0.1, math.pi / 2),  # 2K / (√c‖x‖) > 1: saturated
        ([0.0, 0.0], 1.0, 0.1, math.pi / 2),
    ]
    for x, c, k, expected in cases:
        got = L.half_aperture(torch.tensor([x]), c, min_radius=k)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(f64(got), [expected], rtol=1e-5, err_msg=str((x, c, k)))


@pytest.mark.parametrize("c", CURVS)
def test_exterior_angle_matches_the_law_of_cosines(c):
    g = torch.Generator().manual_seed(2)
    x = L.expmap0(torch.randn(8, 3, generator=g) * 0.8, c)
    y = L.expmap0(torch.randn(8, 3, generator=g) * 0.8, c)
    np.testing.assert_allclose(f64(L.exterior_angle(x, y, c)), ref_exterior_angle(f64(x), f64(y), c), atol=2e-3)


@pytest.mark.parametrize("c", [0.5, 1.0, 4.0])
def test_exterior_angle_on_a_ray_through_the_origin(c):
    v = torch.tensor([[0.3, 0.4], [-1.0, 0.2]])
    x = L.expmap0(v, c)
    # float32: an arccos argument within a few ulps of ±1 is an angle error of a few 1e-3 rad
    np.testing.assert_allclose(f64(L.exterior_angle(x, L.expmap0(3 * v, c), c)), 0.0, atol=5e-3)  # beyond x
    np.testing.assert_allclose(f64(L.exterior_angle(x, L.expmap0(-v, c), c)), math.pi, atol=5e-3)  # across O
    np.testing.assert_allclose(f64(L.exterior_angle(x, L.expmap0(0.5 * v, c), c)), math.pi, atol=5e-3)  # O..x


@pytest.mark.parametrize("c", [0.5, 1.0, 4.0])
def test_entailment_zero_inside_the_cone_and_positive_outside(c):
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.8, 0.6]])
    parent = L.expmap0(v, c)
    aper = f64(L.half_aperture(parent, c))
    assert (aper < 0.5).all()
    beyond = L.expmap0(3 * v, c)
    assert torch.equal(L.entailment(parent, beyond, c), torch.zeros(2))
    opposite = L.expmap0(-v, c)
    np.testing.assert_allclose(f64(L.entailment(parent, opposite, c)), math.pi - aper, atol=2e-3)
    np.testing.assert_allclose(f64(L.entailment(parent, opposite, c, aperture_scale=0.7)), math.pi - 0.7 * aper,
                               atol=2e-3)
    # off the ray: inside the cone (small turn: ext <= 0.037 < aper for these c) -> 0; outside (large turn) -> > 0
    for theta, inside in [(0.005, True), (0.6, False)]:
        child = L.expmap0(rot2(3 * v[:1], theta), c)
        ext = ref_exterior_angle(f64(parent[:1]), f64(child), c)
        got = f64(L.entailment(parent[:1], child, c))
        np.testing.assert_allclose(got, np.maximum(0.0, ext - aper[:1]), atol=2e-3)
        assert (got == 0).all() if inside else (got > 0.05).all()


# -------------------------------------------------------------------------------------------------------- Euclidean


def test_euclidean_half_aperture_by_hand():
    x = torch.tensor([[0.5, 0.0], [0.0, -0.25], [0.05, 0.0], [0.0, 0.0]])
    expected = [math.asin(0.1 / 0.5), math.asin(0.1 / 0.25), math.pi / 2, math.pi / 2]
    np.testing.assert_allclose(f64(L.euclidean_half_aperture(x)), expected, rtol=1e-6)
    np.testing.assert_allclose(f64(L.euclidean_half_aperture(x[:2], K=0.2)), [math.asin(0.4), math.asin(0.8)],
                               rtol=1e-6)


def test_euclidean_exterior_angle_against_atan2():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    xs, ds = f64(x), f64(y) - f64(x)
    cross = xs[:, 0] * ds[:, 1] - xs[:, 1] * ds[:, 0]
    dot = (xs * ds).sum(-1)
    np.testing.assert_allclose(f64(L.euclidean_exterior_angle(x, y)), np.abs(np.arctan2(cross, dot)), atol=1e-3)
    v = torch.tensor([[0.3, 0.4]])
    np.testing.assert_allclose(f64(L.euclidean_exterior_angle(v, 2 * v)), [0.0], atol=1e-3)
    np.testing.assert_allclose(f64(L.euclidean_exterior_angle(v, -v)), [math.pi], atol=1e-3)


def test_euclidean_entailment_zero_inside_positive_outside():
    parent = torch.tensor([[0.5, 0.0]])
    aper = math.asin(0.1 / 0.5)
    assert L.euclidean_entailment(parent, 2 * parent).item() == 0.0
    assert L.euclidean_entailment(parent, torch.tensor([[1.0, 0.05]])).item() == 0.0  # angle 0.1 < aper
    np.testing.assert_allclose(L.euclidean_entailment(parent, -parent).item(), math.pi - aper, rtol=1e-5)
    np.testing.assert_allclose(L.euclidean_entailment(parent, -parent, aperture_scale=1.2).item(),
                               math.pi - 1.2 * aper, rtol=1e-5)
    np.testing.assert_allclose(L.euclidean_entailment(parent, torch.tensor([[0.5, 0.5]])).item(),
                               math.pi / 2 - aper, rtol=1e-5)


# ------------------------------------------------------------------------------------ gradients, dtype, autocast


def _y(c):
    return L.expmap0(torch.tensor([[0.3, -0.2, 0.5]]), c)


GRAD_CASES = {
    "expmap0": lambda x, c: x,
    "time_component": lambda x, c: L.time_component(x, c),
    "dist_self": lambda x, c: L.dist(x, x, c),
    "dist_origin": lambda x, c: L.dist(x, torch.zeros_like(x), c),
    "dist_other": lambda x, c: L.dist(x, _y(c), c),
    "pairwise_dist": lambda x, c: L.pairwise_dist(torch.cat([x, _y(c)]), torch.cat([x, x]), c),
    "half_aperture": lambda x, c: L.half_aperture(x, c),
    "exterior_angle_parent": lambda x, c: L.exterior_angle(x, _y(c), c),
    "exterior_angle_child": lambda x, c: L.exterior_angle(_y(c), x, c),
    "exterior_angle_self": lambda x, c: L.exterior_angle(x, x, c),
    "entailment": lambda x, c: L.entailment(x, _y(c), c) + L.entailment(_y(c), x, c) + L.entailment(x, x, c),
    "euclidean_half_aperture": lambda x, c: L.euclidean_half_aperture(x),
    "euclidean_exterior_angle": lambda x, c: L.euclidean_exterior_angle(x, _y(c)) + L.euclidean_exterior_angle(
        _y(c), x) + L.euclidean_exterior_angle(x, x),
    "euclidean_entailment": lambda x, c: L.euclidean_entailment(x, _y(c)) + L.euclidean_entailment(_y(c), x),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
@pytest.mark.parametrize("scale", [0.0, 1e-9])
def test_gradients_are_finite_at_and_near_the_origin(name, scale):
    v = torch.full((1, 3), scale, requires_grad=True)
    c = torch.tensor(1.0, requires_grad=True)
    out = GRAD_CASES[name](L.expmap0(v, c), c)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(v.grad).all(), v.grad
    assert c.grad is None or torch.isfinite(c.grad).all(), c.grad


def test_expmap0_gradient_at_the_origin_is_the_identity():
    v = torch.zeros(2, 3, requires_grad=True)
    L.expmap0(v, 2.0).sum().backward()
    np.testing.assert_allclose(f64(v.grad), 1.0, rtol=1e-6)


VALUE_CASES = {
    "expmap0": lambda a, b: L.expmap0(a, 0.7),
    "time_component": lambda a, b: L.time_component(a, 0.7),
    "inner": lambda a, b: L.inner(a, b, 0.7),
    "pairwise_inner": lambda a, b: L.pairwise_inner(a, b, 0.7),
    "dist": lambda a, b: L.dist(a, b, 0.7),
    "pairwise_dist": lambda a, b: L.pairwise_dist(a, b, 0.7),
    "half_aperture": lambda a, b: L.half_aperture(a, 0.7),
    "exterior_angle": lambda a, b: L.exterior_angle(a, b, 0.7),
    "entailment": lambda a, b: L.entailment(a, b, 0.7, aperture_scale=0.7),
    "euclidean_half_aperture": lambda a, b: L.euclidean_half_aperture(a),
    "euclidean_exterior_angle": lambda a, b: L.euclidean_exterior_angle(a, b),
    "euclidean_entailment": lambda a, b: L.euclidean_entailment(a, b),
}


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_float32_under_bfloat16_autocast(name):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 16, generator=g) * 0.5, torch.randn(6, 16, generator=g) * 0.5
    fn = VALUE_CASES[name]
    expected = fn(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32 = fn(a, b)  # float32 inputs: nothing may be rounded to bfloat16 inside
        got16 = fn(a.bfloat16(), b.bfloat16())  # bfloat16 inputs: upcast, then float32 arithmetic
    assert expected.dtype == got32.dtype == got16.dtype == torch.float32
    torch.testing.assert_close(got32, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got16, fn(a.bfloat16().float(), b.bfloat16().float()), rtol=1e-6, atol=1e-6)
