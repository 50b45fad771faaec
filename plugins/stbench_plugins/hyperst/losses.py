"""HyperST alignment losses: hyperbolic contrastive alignment (HCA) and hyperbolic entailment alignment (HEA).

METHODS.md §7.3, with the geometry of §3 ("Lorentz-model operations", ``lorentz.py``). Inputs are the four aligned
embeddings of a batch, each (B, D):

* geometry "lorentz": the hyperbolic points Î_s, Î_n, Ĝ_s, Ĝ_n as space components (after α-scaling and expmap0,
  §7.2 item 5), with the curvature parameter c;
* geometry "euclidean": the Euclidean features I_s, I_n, G_s, G_n of the "Euclidean counterpart" ablation (no
  expmap; negative Euclidean distance in the contrastive terms; Euclidean entailment cones of Ganea et al. 2018).

All losses are float32 scalars, also under autocast (§3, §7.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lorentz as L

__all__ = ["GEOMETRIES", "HEA_FORMS", "HEA_PAIRS", "contrastive", "hca_loss", "hea_loss", "hea_terms"]

GEOMETRIES = ("lorentz", "euclidean")

# HEA pairs (METHODS.md §7.3; AMB-18). The parent entails the child. Each row:
#   name,                     parent, child, image->gene?, aperture factor in the "code" form, in the "paper" form
HEA_PAIRS = (
    ("spot_image>niche_image", "I_s", "I_n", False, 1.2, 1.0),
    ("spot_gene>niche_gene",   "G_s", "G_n", False, 1.2, 1.0),
    ("spot_image>spot_gene",   "I_s", "G_s", True,  0.7, 1.0),
    ("niche_image>niche_gene", "I_n", "G_n", True,  0.7, 1.0),
)  # fmt: skip

# Normaliser of the sum of the (included) terms per form: code ½ (what produced HyperST's results), paper ¼.
HEA_FORMS = {"code": 0.5, "paper": 0.25}


def _check_geometry(geometry: str, c) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if geometry == "lorentz" and c is None:
        raise ValueError("geometry 'lorentz' needs the curvature parameter c")


def contrastive(a: torch.Tensor, b: torch.Tensor, logit_scale, geometry: str = "lorentz", c=None) -> torch.Tensor:
    """One HCA alignment term L_align(a, b) (METHODS.md §7.3), a float32 scalar.

    L_align(a, b) = mean_i CE(softmax_j(−s·d(a_i, b_j)), target i): a (B, D) are the queries, b (B, D) the keys; the
    matching key of a_i is b_i and the other rows of b are the negatives. d is the pairwise geodesic distance on the
    hyperboloid (geometry "lorentz", needs c) or the pairwise Euclidean distance (geometry "euclidean", c unused).
    ``logit_scale`` is s itself (the caller exponentiates the learnable log and clamps s ≤ 100, §7.3).
    """
    _check_geometry(geometry, c)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"contrastive pairs need as many rows in a as in b, got {a.shape[0]} and {b.shape[0]}")
    with L._no_autocast(a.device):
        a, b = L._f32(a), L._f32(b)
        s = torch.as_tensor(logit_scale, device=a.device).to(torch.float32)
        if geometry == "lorentz":
            d = L.pairwise_dist(a, b, c)
        else:
            d = torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        target = torch.arange(a.shape[0], device=a.device)
        return F.cross_entropy(-s * d, target)


def hca_loss(I_s, I_n, G_s, G_n, logit_scale, geometry: str = "lorentz", c=None, niche: bool = True) -> torch.Tensor:
    """Hyperbolic contrastive alignment, METHODS.md §7.3. A float32 scalar.

    niche=True (HyperST): ¼[L(I_s, G_s) + L(G_s, I_s) + L(I_n, G_s) + L(G_n, I_s)] with L = :func:`contrastive`;
    the niche terms run niche→spot only (a niche is matched against the spot of the other modality).
    niche=False ("spot level only", used by the MERU and CLIP variants): ½[L(I_s, G_s) + L(G_s, I_s)]; I_n and G_n
    are then not used (may be None).
    """
    _check_geometry(geometry, c)
    terms = [(I_s, G_s), (G_s, I_s)]
    if niche:
        terms += [(I_n, G_s), (G_n, I_s)]
    return sum(contrastive(a, b, logit_scale, geometry, c) for a, b in terms) / len(terms)


def hea_terms(I_s, I_n, G_s, G_n, c=None, form: str = "code", geometry: str = "lorentz", reverse: bool = False,
              min_radius: float = L.MIN_RADIUS) -> dict[str, torch.Tensor]:
    """The four HEA terms m(ext(parent, child) − f·aper(parent)), keyed by the pair names of :data:`HEA_PAIRS`.

    m(·) is the batch mean of max(0, ·); f is the pair's aperture factor in ``form`` (code: 1.2 spot→niche,
    0.7 image→gene; paper: 1). ``reverse`` swaps parent and child in every pair (the aperture is then that of the new
    parent; the pair keeps its factor and name). Float32 scalars; see :func:`hea_loss`.
    """
    _check_geometry(geometry, c)
    if form not in HEA_FORMS:
        raise ValueError(f"form must be one of {tuple(HEA_FORMS)}, got {form!r}")
    points = {"I_s": I_s, "I_n": I_n, "G_s": G_s, "G_n": G_n}
    out = {}
    for name, parent, child, _gene_image, code_factor, paper_factor in HEA_PAIRS:
        if reverse:
            parent, child = child, parent
        factor = code_factor if form == "code" else paper_factor
        if geometry == "lorentz":
            v = L.entailment(points[parent], points[child], c, aperture_scale=factor, min_radius=min_radius)
        else:
            v = L.euclidean_entailment(points[parent], points[child], aperture_scale=factor, K=min_radius)
        out[name] = v.mean()  # the per-sample values are already max(0, ·)
    return out


def hea_loss(I_s, I_n, G_s, G_n, c=None, form: str = "code", geometry: str = "lorentz",
             include_gene_image: bool = True, reverse: bool = False, min_radius: float = L.MIN_RADIUS) -> torch.Tensor:
    """Hyperbolic entailment alignment, METHODS.md §7.3 and AMB-18. A float32 scalar.

    The parent entails the child; pairs (:data:`HEA_PAIRS`): spot image ⊒ niche image, spot gene ⊒ niche gene,
    spot image ⊒ spot gene, niche image ⊒ niche gene. With m(·) = batch mean of max(0, ·):

    * form "code" (default; what produced HyperST's results, AMB-18):
      ½[m(ext(I_s,G_s) − 0.7·aper(I_s)) + m(ext(I_n,G_n) − 0.7·aper(I_n))
      + m(ext(I_s,I_n) − 1.2·aper(I_s)) + m(ext(G_s,G_n) − 1.2·aper(G_s))];
    * form "paper" (the summary's seed formula): ¼ Σ over the four pairs of m(ext − aper), no factors.

    Ablations: ``include_gene_image=False`` drops the two image→gene terms and **keeps the form's normaliser**
    (½ or ¼), so the remaining spot→niche terms have the same weight as in the full loss. ``reverse=True`` swaps
    parent and child in every pair ("reversed entailment directions"). ``geometry="euclidean"`` uses Euclidean cones
    (arcsin(K/‖x‖), angle at x between y − x and x; c unused). K = ``min_radius`` = 0.1.
    """
    terms = hea_terms(I_s, I_n, G_s, G_n, c, form=form, geometry=geometry, reverse=reverse, min_radius=min_radius)
    kept = [terms[name] for name, _p, _c, gene_image, _f1, _f2 in HEA_PAIRS if include_gene_image or not gene_image]
    return HEA_FORMS[form] * torch.stack(kept).sum()
