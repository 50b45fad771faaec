"""HyperST HCA and HEA losses (METHODS.md §7.3, AMB-18) against hand values and independent float64 references."""

import itertools
import math

import numpy as np
import pytest
import torch
from stbench_plugins.hyperst import lorentz as L
from stbench_plugins.hyperst.losses import HEA_PAIRS, contrastive, hca_loss, hea_loss, hea_terms

NAMES = ("I_s", "I_n", "G_s", "G_n")


def f64(t):
    return t.detach().double().cpu().numpy()


# ------------------------------------------------------------------------------- independent float64 references


def ref_dist(x, y, c):
    """Lorentz distance through the Poincaré ball (radius 1/√c); x, y space components, broadcasting."""
    k = math.sqrt(c)
    p = x / (1 + k * np.sqrt(1 / c + (x * x).sum(-1, keepdims=True)))
    q = y / (1 + k * np.sqrt(1 / c + (y * y).sum(-1, keepdims=True)))
    ratio = 2 * c * ((p - q) ** 2).sum(-1) / ((1 - c * (p * p).sum(-1)) * (1 - c * (q * q).sum(-1)))
    return np.arccosh(1 + ratio) / k


def ref_contrastive(a, b, s, geometry, c=None):
    """mean_i [logsumexp_j(-s d_ij) + s d_ii] with d over all pairs (a_i, b_j)."""
    if geometry == "lorentz":
        d = ref_dist(a[:, None, :], b[None, :, :], c)
    else:
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    z = -s * d
    zmax = z.max(1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(lse - np.diag(z)))


def ref_ext(x, y, c, geometry):
    """Exterior angle at x: hyperbolic law of cosines (lorentz) or the angle of y - x against x (euclidean)."""
    if geometry == "euclidean":
        d = y - x
        cos = (d * x).sum(-1) / (np.linalg.norm(d, axis=-1) * np.linalg.norm(x, axis=-1))
        return np.arccos(np.clip(cos, -1, 1))
    k = math.sqrt(c)
    o = np.zeros_like(x)
    a, b, e = k * ref_dist(o, x, c), k * ref_dist(x, y, c), k * ref_dist(o, y, c)
    return math.pi - np.arccos(np.clip((np.cosh(a) * np.cosh(b) - np.cosh(e)) / (np.sinh(a) * np.sinh(b)), -1, 1))


def ref_aper(x, c, geometry, k=0.1):
    n = np.linalg.norm(x, axis=-1)
    arg = k / n if geometry == "euclidean" else 2 * k / (math.sqrt(c) * n)
    return np.arcsin(np.minimum(arg, 1.0))


# The HEA pairs and factors written out again (METHODS.md §7.3): (parent, child, factor in the code form, image->gene)
REF_PAIRS = [("I_s", "G_s", 0.7, True), ("I_n", "G_n", 0.7, True), ("I_s", "I_n", 1.2, False),
             ("G_s", "G_n", 1.2, False)]


def ref_hea(pts, c, form, geometry, include_gene_image=True, reverse=False, ext_fn=None):
    total = 0.0
    for parent, child, factor, gene_image in REF_PAIRS:
        if gene_image and not include_gene_image:
            continue
        if reverse:
            parent, child = child, parent
        f = factor if form == "code" else 1.0
        ext = ext_fn(parent, child) if ext_fn else ref_ext(pts[parent], pts[child], c, geometry)
        total += np.mean(np.maximum(0.0, ext - f * ref_aper(pts[parent], c, geometry)))
    return total * (0.5 if form == "code" else 0.25)


def random_points(geometry, c, n=5, d=4, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in NAMES:
        v = torch.randn(n, d, generator=g) * scale
        out[name] = L.expmap0(v, c) if geometry == "lorentz" else v
    return out


# ------------------------------------------------------------------------------------------------------ contrastive


def test_contrastive_euclidean_2x2_by_hand():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    s = 2.0
    # d = [[0, 1], [5, √18]]; row 0 targets column 0, row 1 column 1
    row0 = -math.log(math.exp(-s * 0) / (math.exp(-s * 0) + math.exp(-s * 1)))
    row1 = -math.log(math.exp(-s * math.sqrt(18)) / (math.exp(-s * 5) + math.exp(-s * math.sqrt(18))))
    got = contrastive(a, b, s, "euclidean")
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_contrastive_lorentz_2x2_by_hand(c):
    # on a 1-D hyperboloid (a geodesic line) the distance between expmap0(r1) and expmap0(r2) is |r1 - r2|
    a = L.expmap0(torch.tensor([[0.0], [1.0]]), c)
    b = L.expmap0(torch.tensor([[0.5], [-0.3]]), c)
    s = torch.tensor(3.0, requires_grad=True)
    # d = [[0.5, 0.3], [0.5, 1.3]]
    row0 = math.log(1 + math.exp(-3.0 * 0.3) / math.exp(-3.0 * 0.5))
    row1 = math.log(1 + math.exp(-3.0 * 0.5) / math.exp(-3.0 * 1.3))
    got = contrastive(a, b, s, "lorentz", c)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-4)
    got.backward()
    assert torch.isfinite(s.grad)
    # the other direction: rows are b, columns a (d transposed)
    row0 = math.log(1 + math.exp(-3.0 * 0.5) / math.exp(-3.0 * 0.5))
    row1 = math.log(1 + math.exp(-3.0 * 0.3) / math.exp(-3.0 * 1.3))
    assert contrastive(b, a, 3.0, "lorentz", c).item() == pytest.approx((row0 + row1) / 2, rel=1e-4)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_contrastive_against_reference(geometry):
    pts = random_points(geometry, 1.5, n=6, seed=1)
    got = contrastive(pts["I_s"], pts["G_s"], 4.0, geometry, 1.5)
    ref = ref_contrastive(f64(pts["I_s"]), f64(pts["G_s"]), 4.0, geometry, 1.5)
    assert got.item() == pytest.approx(ref, rel=1e-4)


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs the curvature"):
        contrastive(x, x, 1.0, "lorentz")
    with pytest.raises(ValueError, match="geometry must be one of"):
        hca_loss(x, x, x, x, 1.0, "poincare", 1.0)
    with pytest.raises(ValueError, match="form must be one of"):
        hea_loss(x, x, x, x, 1.0, form="summary")
    with pytest.raises(ValueError, match="as many rows"):
        contrastive(x, torch.zeros(3, 3), 1.0, "euclidean")


# -------------------------------------------------------------------------------------------------------------- HCA


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_hca_is_the_average_of_the_four_directed_terms(geometry):
    c, s = 0.8, 5.0
    pts = random_points(geometry, c, seed=2)
    p = {k: f64(v) for k, v in pts.items()}
    four = [("I_s", "G_s"), ("G_s", "I_s"), ("I_n", "G_s"), ("G_n", "I_s")]  # niche -> spot only (§7.3)
    expected = np.mean([ref_contrastive(p[a], p[b], s, geometry, c) for a, b in four])
    got = hca_loss(pts["I_s"], pts["I_n"], pts["G_s"], pts["G_n"], s, geometry, c)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-4)
    # the spot-level-only variant (MERU / CLIP ablations): the two spot terms averaged by ½
    expected_spot = np.mean([ref_contrastive(p[a], p[b], s, geometry, c) for a, b in four[:2]])
    got_spot = hca_loss(pts["I_s"], None, pts["G_s"], None, s, geometry, c, niche=False)
    assert got_spot.item() == pytest.approx(expected_spot, rel=1e-4)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_hca_identical_separated_pairs_near_minimum_and_below_shuffled(geometry):
    c, s = 1.0, 10.0
    v = 3.0 * torch.eye(4)  # four directions far apart
    x = L.expmap0(v, c) if geometry == "lorentz" else v
    best = hca_loss(x, x, x, x, s, geometry, c)
    assert 0 <= best.item() < 1e-6  # the minimum of a cross-entropy is 0
    shuffled = x[[1, 2, 3, 0]]
    assert hca_loss(x, x, shuffled, x, s, geometry, c).item() > 10.0
    assert hca_loss(x, shuffled, x, x, s, geometry, c).item() > 1.0  # a wrong niche image is penalised too
    assert hca_loss(x, x, x, shuffled, s, geometry, c).item() > 1.0  # and a wrong niche gene profile
    assert hca_loss(x, None, shuffled, None, s, geometry, c, niche=False).item() > 10.0


# -------------------------------------------------------------------------------------------------------------- HEA


def line_points(geometry, c):
    """Two samples, every embedding on the e1 axis (signed tangent lengths): each exterior angle is 0 or π."""
    pos = {"I_s": [1.0, 1.0], "I_n": [2.0, -1.0], "G_s": [-1.0, 1.5], "G_n": [-2.0, 0.5]}
    out = {}
    for name, r in pos.items():
        v = torch.zeros(2, 3)
        v[:, 0] = torch.tensor(r)
        out[name] = L.expmap0(v, c) if geometry == "lorentz" else v
    return pos, out


def line_ext(pos):
    """ext(parent, child) on the axis: 0 if the child is beyond the parent on its side of O, else π."""

    def ext(parent, child):
        p, q = np.array(pos[parent]), np.array(pos[child])
        return np.where((np.sign(p) == np.sign(q)) & (np.abs(q) > np.abs(p)), 0.0, math.pi)

    return ext


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_hea_code_and_paper_forms_with_known_terms(geometry):
    c = 1.0
    pos, pts = line_points(geometry, c)
    p = {k: f64(v) for k, v in pts.items()}
    aper = {k: ref_aper(p[k], c, geometry) for k in NAMES}

    def m(x):
        return float(np.mean(np.maximum(0.0, x)))

    pi = math.pi
    # per sample (sample 0 | sample 1), from the positions: I_s +1|+1, I_n +2|-1, G_s -1|+1.5, G_n -2|+0.5
    # ext(I_s,G_s) = π|0, ext(I_n,G_n) = π|π, ext(I_s,I_n) = 0|π, ext(G_s,G_n) = 0|π
    ext = {("I_s", "G_s"): [pi, 0], ("I_n", "G_n"): [pi, pi], ("I_s", "I_n"): [0, pi], ("G_s", "G_n"): [0, pi]}
    terms_code = {
        "spot_image>spot_gene": m(np.array(ext["I_s", "G_s"]) - 0.7 * aper["I_s"]),
        "niche_image>niche_gene": m(np.array(ext["I_n", "G_n"]) - 0.7 * aper["I_n"]),
        "spot_image>niche_image": m(np.array(ext["I_s", "I_n"]) - 1.2 * aper["I_s"]),
        "spot_gene>niche_gene": m(np.array(ext["G_s", "G_n"]) - 1.2 * aper["G_s"]),
    }
    terms_paper = {
        "spot_image>spot_gene": m(np.array(ext["I_s", "G_s"]) - aper["I_s"]),
        "niche_image>niche_gene": m(np.array(ext["I_n", "G_n"]) - aper["I_n"]),
        "spot_image>niche_image": m(np.array(ext["I_s", "I_n"]) - aper["I_s"]),
        "spot_gene>niche_gene": m(np.array(ext["G_s", "G_n"]) - aper["G_s"]),
    }
    assert all(v > 0.5 for v in terms_code.values())  # every term is active, so every factor matters
    args = (pts["I_s"], pts["I_n"], pts["G_s"], pts["G_n"], c)
    for form, expected in [("code", terms_code), ("paper", terms_paper)]:
        got = {k: v.item() for k, v in hea_terms(*args, form=form, geometry=geometry).items()}
        assert got == pytest.approx(expected, abs=2e-3), form
    code = hea_loss(*args, form="code", geometry=geometry)
    paper = hea_loss(*args, form="paper", geometry=geometry)
    assert code.dtype == paper.dtype == torch.float32
    assert code.item() == pytest.approx(0.5 * sum(terms_code.values()), abs=2e-3)
    assert paper.item() == pytest.approx(0.25 * sum(terms_paper.values()), abs=2e-3)
    assert hea_loss(*args, geometry=geometry).item() == code.item()  # code is the default (AMB-18)
    # without the gene-image terms: only the spot->niche terms, with the form's own normaliser
    spot_niche = ("spot_image>niche_image", "spot_gene>niche_gene")
    got = hea_loss(*args, form="code", geometry=geometry, include_gene_image=False).item()
    assert got == pytest.approx(0.5 * sum(terms_code[k] for k in spot_niche), abs=2e-3)
    got = hea_loss(*args, form="paper", geometry=geometry, include_gene_image=False).item()
    assert got == pytest.approx(0.25 * sum(terms_paper[k] for k in spot_niche), abs=2e-3)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
@pytest.mark.parametrize("form", ["code", "paper"])
def test_hea_reverse_swaps_parent_and_child(geometry, form):
    c = 1.0
    pos, pts = line_points(geometry, c)
    p = {k: f64(v) for k, v in pts.items()}
    args = (pts["I_s"], pts["I_n"], pts["G_s"], pts["G_n"], c)
    for include in (True, False):
        forward = ref_hea(p, c, form, geometry, include, reverse=False, ext_fn=line_ext(pos))
        backward = ref_hea(p, c, form, geometry, include, reverse=True, ext_fn=line_ext(pos))
        assert abs(forward - backward) > 0.1  # the directions matter on these points
        got = hea_loss(*args, form=form, geometry=geometry, include_gene_image=include, reverse=True).item()
        assert got == pytest.approx(backward, abs=2e-3)
    # reversing = passing each pair's child as the parent: the spot/niche and image/gene roles swap
    swapped = hea_loss(pts["I_n"], pts["I_s"], pts["G_n"], pts["G_s"], c, form=form, geometry=geometry,
                       include_gene_image=False)
    assert hea_loss(*args, form=form, geometry=geometry, include_gene_image=False, reverse=True).item() == \
        pytest.approx(swapped.item(), abs=1e-6)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
@pytest.mark.parametrize(("form", "include", "reverse"), list(itertools.product(["code", "paper"], [True, False],
                                                                                 [False, True])))
def test_hea_general_position_against_reference(geometry, form, include, reverse):
    c = 0.7
    pts = random_points(geometry, c, n=7, seed=5, scale=0.9)
    p = {k: f64(v) for k, v in pts.items()}
    expected = ref_hea(p, c, form, geometry, include, reverse)
    got = hea_loss(pts["I_s"], pts["I_n"], pts["G_s"], pts["G_n"], c, form=form, geometry=geometry,
                   include_gene_image=include, reverse=reverse)
    assert expected > 0.1
    assert got.item() == pytest.approx(expected, abs=2e-3)


def test_hea_pair_table_is_the_methods_table():
    rows = {(parent, child): (code, paper, gene_image) for _n, parent, child, gene_image, code, paper in HEA_PAIRS}
    assert rows == {(p, ch): (f, 1.0, gi) for p, ch, f, gi in REF_PAIRS}


# ------------------------------------------------------------------------------------ gradients, dtype, autocast


def loss_cases():
    """name -> (geometry, fn(pts, s, c)) for every loss variant."""
    cases = {}
    for geometry in ("lorentz", "euclidean"):
        cases[f"hca_{geometry}"] = (geometry, lambda p, s, c, g=geometry: hca_loss(
            p["I_s"], p["I_n"], p["G_s"], p["G_n"], s, g, c))
        cases[f"hca_spot_{geometry}"] = (geometry, lambda p, s, c, g=geometry: hca_loss(
            p["I_s"], None, p["G_s"], None, s, g, c, niche=False))
        for form, include, reverse in itertools.product(["code", "paper"], [True, False], [False, True]):
            cases[f"hea_{geometry}_{form}_{include}_{reverse}"] = (
                geometry, lambda p, s, c, g=geometry, f=form, i=include, r=reverse: hea_loss(
                    p["I_s"], p["I_n"], p["G_s"], p["G_n"], c, form=f, geometry=g, include_gene_image=i, reverse=r))
    return cases


LOSS_CASES = loss_cases()


def all_losses(pts, s, c):
    return {name: fn(pts, s, c) for name, (_g, fn) in LOSS_CASES.items()}


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
@pytest.mark.parametrize("scale", [0.0, 1e-9])
def test_loss_gradients_are_finite_at_and_near_the_origin(name, scale):
    geometry, fn = LOSS_CASES[name]
    v = {k: torch.full((3, 4), scale, requires_grad=True) for k in NAMES}
    log_c = torch.tensor(0.0, requires_grad=True)
    log_s = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    c = log_c.exp()
    pts = {k: (L.expmap0(x, c) if geometry == "lorentz" else x) for k, x in v.items()}
    loss = fn(pts, log_s.exp(), c)
    assert torch.isfinite(loss)
    loss.backward()
    for k, x in v.items():
        unused = name.startswith("hca_spot") and k in ("I_n", "G_n")
        assert (x.grad is None) if unused else torch.isfinite(x.grad).all(), (k, x.grad)
    for t in (log_c, log_s):
        assert t.grad is None or torch.isfinite(t.grad)


def test_losses_are_float32_under_bfloat16_autocast():
    c, s = 0.9, 7.0
    pts = random_points("lorentz", c, n=6, d=16, seed=7)
    expected = all_losses(pts, s, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32 = all_losses(pts, s, c)
        got16 = all_losses({k: v.bfloat16() for k, v in pts.items()}, s, c)
    ref16 = all_losses({k: v.bfloat16().float() for k, v in pts.items()}, s, c)
    for name in expected:
        assert got32[name].dtype == got16[name].dtype == torch.float32, name
        torch.testing.assert_close(got32[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(got16[name], ref16[name], rtol=1e-6, atol=1e-6, msg=name)
