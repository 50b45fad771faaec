"""The anndata dataset: .h5ad samples listed in a manifest, built here in tmp_path with anndata."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from stbench.cli import main
from stbench.data.layouts import grid_from_pixels
from stbench_plugins.anndata_files.reader import open_anndata

GENES = ["G1", "G2", "G3", "DUP", "G4", "DUP", "G5", "G6"]
ORIGIN = (40.0, 40.0)


def lattice_spots(lattice: str, rows: int = 6, per_row: int = 6) -> list[tuple[int, int]]:
    """(array_row, array_col): Visium numbering on hex (col + row even), plain on square."""
    if lattice == "hex":
        return [(r, 2 * k + r % 2) for r in range(rows) for k in range(per_row)]
    return [(r, c) for r in range(rows) for c in range(per_row)]


def spot_pixel(row: int, col: int, lattice: str, mpp: float) -> tuple[float, float]:
    if lattice == "hex":
        return ORIGIN[0] + col * 50.0 / mpp, ORIGIN[1] + row * 50.0 * math.sqrt(3) / mpp
    return ORIGIN[0] + col * 200.0 / mpp, ORIGIN[1] + row * 200.0 / mpp


def write_h5ad(path: Path, seed: int = 0, lattice: str = "hex", mpp: float = 2.0, counts_layer: bool = False,
               array: bool = True, in_tissue: bool = True, image: Path | None = None) -> dict:
    """One sample as HEST writes st/<id>.h5ad: raw counts, obsm['spatial'] = (x, y) full-res pixels,
    obs array_row/array_col/in_tissue; optionally counts in layers['counts'] under a normalised X."""
    rng = np.random.default_rng(seed)
    spots = lattice_spots(lattice)
    field = np.array([math.sin(c / 3.0) + math.cos(r / 2.0) + 2.5 for r, c in spots])
    counts = rng.poisson(np.outer(field, np.arange(1, len(GENES) + 1)) * 2).astype(np.float32)
    ids = [f"spot{seed}-{i}" for i in range(len(spots))]
    obs = pd.DataFrame(index=ids)
    if array:
        obs["array_row"] = [r for r, _ in spots]
        obs["array_col"] = [c for _, c in spots]
    if in_tissue:
        obs["in_tissue"] = [0] + [1] * (len(spots) - 1)  # the first spot lies outside the tissue
    pixel = np.array([spot_pixel(r, c, lattice, mpp) for r, c in spots])
    X = sp.csr_matrix(counts)
    layers = {}
    if counts_layer:
        layers["counts"] = X
        X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique")  # DUP, on purpose
        adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES), layers=layers)
        adata.obsm["spatial"] = pixel
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    if image is not None:
        width, height = (pixel.max(axis=0) + ORIGIN).astype(int) + 1
        pixels = rng.integers(120, 230, size=(height, width, 3), dtype=np.uint8)
        pixels[..., 1] //= 2
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(image)
    return {"ids": ids, "counts": counts.astype(np.int64), "spots": spots, "pixel": pixel}


def write_anndata_dataset(root: Path, samples=(("S1", "P1"), ("S2", "P2"), ("S3", "P3")), lattice: str = "",
                          mpp: float = 2.0, **kwargs) -> Path:
    lines = ["sample,patient,h5ad,image,mpp" + (",lattice" if lattice else "")]
    for i, (name, patient) in enumerate(samples):
        write_h5ad(root / "st" / f"{name}.h5ad", seed=i, lattice=lattice or "hex", mpp=mpp,
                   image=root / "wsis" / f"{name}.png", **kwargs)
        lines.append(f"{name},{patient},st/{name}.h5ad,wsis/{name}.png,{mpp}" + (f",{lattice}" if lattice else ""))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def anndata_dir(tmp_path):
    return write_anndata_dataset(tmp_path / "anndata")


def _merged(counts: np.ndarray) -> np.ndarray:
    """The expected gene columns: DUP (columns 3 and 5) summed at its first position."""
    out = counts[:, [0, 1, 2, 3, 4, 6, 7]].copy()
    out[:, 3] += counts[:, 5]
    return out


def test_reads_h5ad_samples(anndata_dir):
    dataset = open_anndata(anndata_dir)
    assert [(s.name, s.patient, s.has_image) for s in dataset.sections()] == [
        ("S1", "P1", True), ("S2", "P2", True), ("S3", "P3", True)]
    s = dataset.load_section("S2")
    truth = write_h5ad(anndata_dir / "scratch.h5ad", seed=1)
    keep = slice(1, None)  # in_tissue drops the first spot
    assert list(s.spot_ids) == truth["ids"][keep] and s.n_spots == 35
    assert list(s.genes) == ["G1", "G2", "G3", "DUP", "G4", "G5", "G6"]
    assert isinstance(s.counts, sp.csr_matrix) and s.counts.dtype.kind == "i"
    np.testing.assert_array_equal(s.counts.toarray(), _merged(truth["counts"])[keep])
    np.testing.assert_array_equal(s.grid, [(c, r) for r, c in truth["spots"][keep]])
    np.testing.assert_allclose(s.pixel, truth["pixel"][keep])
    assert (s.mpp, s.lattice, s.spot_diameter_um, s.spot_pitch_um) == (2.0, "hex", 55.0, 100.0)
    assert s.image_path == anndata_dir / "wsis" / "S2.png"
    assert {p.name for p in s.source_files} == {"manifest.csv", "S2.h5ad", "S2.png"}
    assert dataset.qc["S2"]["counts_from"] == "X" and dataset.qc["S2"]["mpp_measured"] == pytest.approx(2.0)


def test_counts_layer_is_preferred_over_a_normalised_x(tmp_path):
    root = write_anndata_dataset(tmp_path / "a", samples=(("S1", "P1"),), counts_layer=True)
    dataset = open_anndata(root)
    s = dataset.load_section("S1")
    truth = write_h5ad(tmp_path / "scratch.h5ad", seed=0)
    np.testing.assert_array_equal(s.counts.toarray(), _merged(truth["counts"])[1:])
    assert dataset.qc["S1"]["counts_from"] == "layers['counts']"


def test_square_lattice_and_a_grid_derived_from_pixels(tmp_path):
    root = write_anndata_dataset(tmp_path / "sq", samples=(("S1", "P1"),), lattice="square", mpp=4.0, array=False)
    dataset = open_anndata(root)
    s = dataset.load_section("S1")
    assert (s.lattice, s.spot_diameter_um, s.spot_pitch_um) == ("square", 100.0, 200.0)
    np.testing.assert_array_equal(s.grid, [(c, r) for r, c in lattice_spots("square")[1:]])
    assert dataset.qc["S1"]["grid_derived"] is True
    # hex without array coordinates: columns of the derived grid follow Visium's numbering
    hexroot = write_anndata_dataset(tmp_path / "hex", samples=(("S1", "P1"),), array=False)
    grid = open_anndata(hexroot).load_section("S1").grid
    np.testing.assert_array_equal(grid, [(c, r) for r, c in lattice_spots("hex")[1:]])
    # the leftmost spot on an odd row: its derived column is odd too
    spots = [(r, c) for r, c in lattice_spots("hex") if c >= 1]
    pixel = np.array([spot_pixel(r, c, "hex", 2.0) for r, c in spots])
    np.testing.assert_array_equal(grid_from_pixels("anndata", "x.h5ad", pixel, 2.0, "hex"), [(c, r) for r, c in spots])


def test_data_check_and_run(anndata_dir, tmp_path, capsys, one_torch_thread):
    assert main(["data", "check", "anndata", "--data-dir", str(anndata_dir), "--out", str(tmp_path / "qc")]) == 0
    report = capsys.readouterr().out
    assert "dataset anndata: 3 sections, 3 patients, 105 spots, 3 with images" in report
    assert re.search(r"S1 +P1 +35 +7 +yes +2 ", report)
    assert (tmp_path / "qc" / "S3.png").is_file()

    out = tmp_path / "run"
    argv = ["run", "--methods", "ridge,prompt_knn", "--dataset", "anndata", "--data-dir", str(anndata_dir),
            "--out", str(out), "--set", "panel.hvg=4", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    res = pd.read_csv(out / "results.csv")
    assert sorted(res["method"].unique()) == ["prompt_knn", "ridge"]
    assert res["slide"].nunique() == 3 and res["fold"].nunique() == 3
    assert res.groupby("method")["n_spots"].sum().tolist() == [105, 105]


def _error(capsys, data_dir) -> str:
    assert main(["data", "check", "anndata", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress lines: the error, on one line
    assert last.startswith("stbench: error: anndata")
    return last


def test_missing_files_and_columns(anndata_dir, capsys):
    assert "has no manifest.csv" in _error(capsys, anndata_dir / "st")
    (anndata_dir / "wsis" / "S2.png").rename(anndata_dir / "S2.png")
    assert "image of sample 'S2' not found" in _error(capsys, anndata_dir)
    (anndata_dir / "S2.png").rename(anndata_dir / "wsis" / "S2.png")
    (anndata_dir / "st" / "S3.h5ad").unlink()
    assert "h5ad of sample 'S3' not found" in _error(capsys, anndata_dir)
    manifest = anndata_dir / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",mpp", ",um_per_px"))
    assert "missing column(s) mpp" in _error(capsys, anndata_dir)


def test_unknown_pixel_size_and_lattice(anndata_dir, capsys):
    manifest = anndata_dir / "manifest.csv"
    manifest.write_text("sample,patient,h5ad,image,mpp\nS1,P1,st/S1.h5ad,wsis/S1.png,\n")
    assert "unknown pixel size: empty mpp for sample 'S1' (line 2)" in _error(capsys, anndata_dir)
    manifest.write_text("sample,patient,h5ad,image,mpp,lattice\nS1,P1,st/S1.h5ad,wsis/S1.png,2,visium\n")
    assert "unknown lattice 'visium'" in _error(capsys, anndata_dir)


def _rewrite(path: Path, change) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique")
        adata = anndata.read_h5ad(path)
        change(adata)
        adata.write_h5ad(path)


def test_missing_fields_in_the_h5ad(anndata_dir, capsys):
    path = anndata_dir / "st" / "S1.h5ad"
    _rewrite(path, lambda a: a.obs.drop(columns=["array_col"], inplace=True))
    assert "missing column obs['array_col'] beside obs['array_row']" in _error(capsys, anndata_dir)
    _rewrite(path, lambda a: a.obsm.pop("spatial"))
    assert "missing field obsm['spatial']" in _error(capsys, anndata_dir)
    path.write_bytes(b"not an HDF5 file")
    assert "cannot read the .h5ad file" in _error(capsys, anndata_dir)


def test_normalised_counts_are_refused(tmp_path, capsys):
    root = write_anndata_dataset(tmp_path / "n", samples=(("S1", "P1"),), counts_layer=True)
    _rewrite(root / "st" / "S1.h5ad", lambda a: a.layers.pop("counts"))
    err = _error(capsys, root)
    assert "X holds non-integer count" in err and "raw UMI counts" in err


def test_coordinate_outside_the_image(anndata_dir, capsys):
    # coordinates of a 4x downscaled image would still fit; full-res coordinates on a small image do not
    path = anndata_dir / "wsis" / "S1.png"
    with Image.open(path) as im:
        im.resize((im.width // 4, im.height // 4)).save(path)
    err = _error(capsys, anndata_dir)
    assert "spot centre(s) lie outside the" in err and "S1.png" in err and "full-resolution image" in err


def test_grid_cannot_be_derived_from_a_rotated_slide(tmp_path, capsys):
    root = write_anndata_dataset(tmp_path / "rot", samples=(("S1", "P1"),), array=False)
    angle = 0.2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    _rewrite(root / "st" / "S1.h5ad", lambda a: a.obsm.__setitem__("spatial", (a.obsm["spatial"] - 40) @ rot.T + 60))
    err = _error(capsys, root)
    assert "no array coordinates" in err and "add the array coordinates as obs columns array_row and array_col" in err


def test_wrong_mpp_warns(tmp_path):
    root = write_anndata_dataset(tmp_path / "w", samples=(("S1", "P1"),))
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",2.0", ",0.5"))
    with pytest.warns(UserWarning, match="mpp 0.5 of sample 'S1' differs from the 2.0000 µm/px measured"):
        open_anndata(root).load_section("S1")


def test_pyramidal_tiff_and_corrupt_images(anndata_dir, capsys):
    """A whole-slide TIFF is sized through the region readers (OpenSlide); a corrupt image is refused."""
    from hest_samples import write_pyramid_tiff

    with Image.open(anndata_dir / "wsis" / "S1.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    write_pyramid_tiff(anndata_dir / "wsis" / "S1.tif", pixels, levels=2, mpp=2.0)
    manifest = anndata_dir / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("wsis/S1.png", "wsis/S1.tif"))
    s = open_anndata(anndata_dir).load_section("S1")
    assert s.image_path.name == "S1.tif" and s.n_spots == 35
    (anndata_dir / "wsis" / "S2.png").write_bytes(b"not an image")
    assert "cannot be decoded" in _error(capsys, anndata_dir)


def test_samples_without_counts_are_listed_for_prediction(anndata_dir):
    """Spots and an image, no counts (X removed, or no genes at all): has_counts is False, so a run leaves
    them out and stbench predict predicts them."""
    _rewrite(anndata_dir / "st" / "S2.h5ad", lambda a: setattr(a, "X", None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique")
        adata = anndata.read_h5ad(anndata_dir / "st" / "S3.h5ad")
    empty = anndata.AnnData(obs=adata.obs)
    empty.obsm["spatial"] = adata.obsm["spatial"]
    empty.write_h5ad(anndata_dir / "st" / "S3.h5ad")
    dataset = open_anndata(anndata_dir)
    assert [(s.name, s.has_counts) for s in dataset.sections()] == [("S1", True), ("S2", False), ("S3", False)]
    for name in ("S2", "S3"):
        s = dataset.load_section(name)
        assert s.counts is None and not s.has_counts and len(s.genes) == 0 and s.n_spots == 35
        assert s.grid.shape == (35, 2) and dataset.qc[name]["counts_from"] is None


def test_data_dir_from_the_environment(anndata_dir, monkeypatch):
    """Without --data-dir: $STBENCH_DATA/anndata, as her2 uses $STBENCH_DATA/her2st."""
    monkeypatch.setenv("STBENCH_DATA", str(anndata_dir.parent))
    assert [s.name for s in open_anndata(None).sections()] == ["S1", "S2", "S3"]
