"""The synthetic dataset: determinism, geometry, the deliberate edge cases, spatial and image signal."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from stbench.errors import ConfigError, DataError
from stbench_plugins.synthetic import SyntheticOptions, stbench_register_datasets
from stbench_plugins.synthetic.generate import SyntheticDataset, open_synthetic


def _log_norm(counts) -> np.ndarray:
    """ln(1 + CPM) over all genes, spots with no counts dropped."""
    x = np.asarray(counts.toarray(), dtype=float)
    lib = x.sum(axis=1, keepdims=True)
    keep = lib[:, 0] > 0
    return np.log1p(x[keep] / lib[keep] * 1e6), keep


def test_registers_lazy_spec():
    specs = []
    stbench_register_datasets(specs.append)
    (spec,) = specs
    assert spec.name == "synthetic" and spec.needs_data_dir is False and spec.options is SyntheticOptions
    module, _, attr = spec.factory.partition(":")
    assert (module, attr) == ("stbench_plugins.synthetic.generate", "open_synthetic")


def test_sections_genes_and_panel():
    ds = open_synthetic(None, None)
    assert isinstance(ds, SyntheticDataset)
    infos = ds.sections()
    assert [i.name for i in infos] == ["P1S1", "P1S2", "P2S1", "P2S2", "P3S1", "P3S2", "P4S1", "P4S2"]
    assert [i.patient for i in infos] == ["P1", "P1", "P2", "P2", "P3", "P3", "P4", "P4"]
    assert all(i.has_image for i in infos)
    panel = ds.default_panel()
    assert panel[:2] == ["SG0001", "SG0002"] and len(panel) == 60
    sec = ds.load_section("P2S1")
    assert sec.patient == "P2" and sec.n_spots == 300
    assert list(sec.genes) == panel + [f"XG{i:04d}" for i in range(1, 41)]
    assert sp.isspmatrix_csr(sec.counts) and np.issubdtype(sec.counts.dtype, np.integer)
    assert sec.counts.shape == (300, 100) and sec.counts.min() >= 0
    assert len(set(sec.spot_ids)) == 300
    assert list(sec.spot_ids) == [f"{x}x{y}" for x, y in sec.grid]
    # Median UMIs in the documented range; extra genes carry most UMIs.
    lib = np.asarray(sec.counts.sum(axis=1)).ravel()
    assert 300 < np.median(lib) < 8000
    assert sec.counts[:, 60:].sum() > sec.counts[:, :60].sum()


def test_unknown_section_names_the_valid_ones():
    with pytest.raises(DataError, match="P1S1.*P4S2"):
        open_synthetic(None, None).load_section("A1")


@pytest.mark.parametrize(
    "bad", [dict(lattice="triangle"), dict(n_genes=0), dict(mpp=0.0), dict(spot_pitch_um=-1.0), dict(seed=-1)]
)
def test_bad_options_raise_config_error(bad):
    with pytest.raises(ConfigError):
        open_synthetic(None, SyntheticOptions(**bad))


def test_deterministic_and_seeded():
    a = open_synthetic(None, SyntheticOptions()).load_section("P3S2")
    b = open_synthetic(None, SyntheticOptions()).load_section("P3S2")
    assert a.counts.data.tobytes() == b.counts.data.tobytes()
    assert a.counts.indices.tobytes() == b.counts.indices.tobytes()
    assert np.array_equal(a.pixel, b.pixel) and np.array_equal(a.spot_ids, b.spot_ids)
    c = open_synthetic(None, SyntheticOptions(seed=1)).load_section("P3S2")
    assert (a.counts != c.counts).nnz > 0
    other = open_synthetic(None, SyntheticOptions()).load_section("P3S1")
    assert (a.counts != other.counts).nnz > 0


@pytest.mark.parametrize("mpp", [1.0, 0.5])
@pytest.mark.parametrize("outline", [True, False])
def test_square_lattice_geometry(mpp, outline):
    sec = open_synthetic(None, SyntheticOptions(mpp=mpp, outline=outline)).load_section("P1S2")
    assert sec.lattice == "square" and sec.spot_pitch_um == 200.0 and sec.mpp == mpp
    origin = sec.pixel - sec.grid * (200.0 / mpp)  # pixel = margin + grid * pitch_px
    assert np.allclose(origin, origin[0])
    assert np.array_equal(sec.grid.min(axis=0), [0, 0])
    if not outline:  # a rectangular grid of ceil(sqrt(n)) columns
        assert sec.grid[:, 0].max() == math.ceil(math.sqrt(300)) - 1


def test_hex_lattice_geometry():
    sec = open_synthetic(None, SyntheticOptions(lattice="hex", mpp=0.5)).load_section("P1S1")
    pitch_px = 100.0 / 0.5
    assert sec.lattice == "hex" and sec.spot_pitch_um == 100.0 and sec.spot_diameter_um == pytest.approx(55.0)
    x, y = sec.grid.T
    assert np.all((x - y) % 2 == 0)  # Visium array convention
    origin = sec.pixel - np.stack([x * pitch_px / 2, y * pitch_px * math.sqrt(3) / 2], axis=1)
    assert np.allclose(origin, origin[0])
    # Interior spots (all six lattice neighbours present) have six neighbours at one pitch in pixels.
    present = set(map(tuple, sec.grid.tolist()))
    steps = [(2, 0), (-2, 0), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    grid = sec.grid.tolist()
    interior = [i for i, (a, b) in enumerate(grid) if all((a + u, b + v) in present for u, v in steps)]
    assert len(interior) > 150
    dist, _ = cKDTree(sec.pixel).query(sec.pixel[interior], k=8)
    assert np.allclose(dist[:, 1:7], pitch_px, rtol=1e-6)
    assert np.all(dist[:, 7] > 1.5 * pitch_px)


def test_pitch_override():
    sec = open_synthetic(None, SyntheticOptions(lattice="hex", spot_pitch_um=150.0)).load_section("P1S1")
    assert sec.spot_pitch_um == 150.0


def test_constant_gene_and_zero_spot():
    ds = open_synthetic(None, None)
    first = ds.load_section("P1S1").counts.toarray()
    assert np.all(first[:, 59] == 0)  # the last panel gene
    assert np.sum(first.sum(axis=1) == 0) == 1
    later = ds.load_section("P1S2").counts.toarray()
    assert later[:, 59].sum() > 0 and np.all(later.sum(axis=1) > 0)
    off = open_synthetic(None, SyntheticOptions(constant_gene=False, zero_spot=False)).load_section("P1S1")
    off = off.counts.toarray()
    assert off[:, :60].sum(axis=0).min() > 0 and off.sum(axis=1).min() > 0


def test_expression_is_spatially_structured():
    """Neighbouring spots' log-normalised panel expression correlates (a Moran's-I-like statistic)."""
    ds = open_synthetic(None, None)
    rng = np.random.default_rng(0)

    def neighbour_corr(values, pairs):
        per_gene = [np.corrcoef(v[pairs[:, 0]], v[pairs[:, 1]])[0, 1] for v in values.T if v.std() > 0]
        return np.mean(per_gene)

    observed = []
    for info in ds.sections():
        sec = ds.load_section(info.name)
        x, keep = _log_norm(sec.counts)
        x = x[:, :60]
        pairs = cKDTree(sec.grid[keep]).query_pairs(1.01, output_type="ndarray")  # square neighbours
        observed.append(neighbour_corr(x, pairs))
        shuffled = neighbour_corr(x[rng.permutation(len(x))], pairs)
        assert abs(shuffled) < 0.05
        assert observed[-1] > 0.1, info.name
    assert np.mean(observed) > 0.2


def test_factors_are_ground_truth():
    ds = open_synthetic(None, None)
    f = ds.factors("P1S2")
    assert f.shape == (300, 4) and f.min() >= 0 and f.max() <= 1
    assert ds.loadings.shape == (4, 100) and ds.loadings.min() >= 0


@pytest.mark.parametrize("lattice", ["square", "hex"])
def test_image_predicts_expression(lattice):
    ds = open_synthetic(None, SyntheticOptions(lattice=lattice))
    sec = ds.load_section("P1S2")
    image = sec.read_image()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    H, W = image.shape[:2]
    assert np.all((sec.pixel >= 0) & (sec.pixel < [W, H]))
    assert sec.read_image() is image and not image.flags.writeable  # cached, shared read-only

    # Darkness of a one-pitch patch around each spot follows the factor-0 marker gene.
    half = int(sec.spot_pitch_um / sec.mpp / 2)
    cx, cy = np.round(sec.pixel).astype(int).T
    patches = [image[y - half : y + half, x - half : x + half] for x, y in zip(cx, cy)]
    darkness = 255 - np.array([patch.mean() for patch in patches])
    load = ds.loadings[:, :60]
    gene = int(np.argmax(load[0] - load[1:].sum(axis=0)))  # the most factor-0-specific panel gene
    x, keep = _log_norm(sec.counts)
    rho = spearmanr(darkness[keep], x[:, gene]).statistic
    assert rho > 0.3


def test_background_is_near_white():
    image = open_synthetic(None, None).load_section("P4S1").read_image()
    corner = image[:20, :20].astype(float)
    assert np.all(np.abs(corner.mean(axis=(0, 1)) - 240) < 5)


def test_large_section_without_image():
    options = SyntheticOptions(n_patients=1, sections_per_patient=1, spots_per_section=100_000, images=False)
    ds = open_synthetic(None, options)
    assert ds.sections()[0].has_image is False
    sec = ds.load_section("P1S1")
    assert sec.n_spots == 100_000 and sec.counts.shape == (100_000, 100)
    assert not sec.has_image and sec.image_loader is None
    assert len(np.unique(sec.spot_ids)) == 100_000
