"""The visium dataset: Space Ranger output folders listed in a manifest, built here in tmp_path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from stbench.cli import main
from stbench.errors import DataError
from stbench_plugins.visium.reader import open_visium

#: gene symbols with their feature types: DUP names two loci, ADT is an antibody capture
FEATURES = [("G1", "Gene Expression"), ("G2", "Gene Expression"), ("DUP", "Gene Expression"),
            ("G3", "Gene Expression"), ("DUP", "Gene Expression"), ("G4", "Gene Expression"),
            ("G5", "Gene Expression"), ("G6", "Gene Expression"), ("ADT", "Antibody Capture")]
MPP = 2.0
ORIGIN = (40.0, 40.0)  # pixel centre of array (0, 0)


def hex_spots(rows: int, per_row: int) -> list[tuple[int, int]]:
    """(array_row, array_col) of a hex block in Visium numbering (col + row even)."""
    return [(r, 2 * k + r % 2) for r in range(rows) for k in range(per_row)]


def spot_pixel(row: int, col: int, mpp: float = MPP) -> tuple[float, float]:
    """(x, y) full-resolution pixel centre of an array position: columns 50 µm, rows 86.6 µm apart."""
    return ORIGIN[0] + col * 50.0 / mpp, ORIGIN[1] + row * 50.0 * math.sqrt(3) / mpp


def write_h5(path: Path, barcodes, counts: np.ndarray, features=FEATURES) -> None:
    """A 10x HDF5 feature-barcode matrix: CSC of (features, barcodes) = CSR of (barcodes, features)."""
    csr = sp.csr_matrix(counts.astype(np.int32))
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"], m["indices"], m["indptr"] = csr.data, csr.indices.astype(np.int64), csr.indptr.astype(np.int64)
        m["shape"] = np.array([len(features), len(barcodes)], dtype=np.int32)
        g = m.create_group("features")
        g["name"] = np.array([n for n, _ in features], dtype="S")
        g["id"] = np.array([f"ENSG{i:011d}" for i in range(len(features))], dtype="S")
        g["feature_type"] = np.array([t for _, t in features], dtype="S")
        g["genome"] = np.array(["GRCh38"] * len(features), dtype="S")


def write_visium_sample(folder: Path, seed: int = 0, rows: int = 6, per_row: int = 6, old: bool = False,
                        image: Path | None = None, mpp: float = MPP) -> dict:
    """A Space Ranger outs/ folder: the filtered matrix, positions (new or old style), scale factors,
    and a full-resolution image (returned paths and truth arrays for the checks)."""
    rng = np.random.default_rng(seed)
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    spots = hex_spots(rows, per_row)
    barcodes = [f"AAAC{seed:02d}{i:04d}-1" for i in range(len(spots))]
    # the first spot is out of tissue: in the positions file, not in the filtered matrix
    in_tissue = [0] + [1] * (len(spots) - 1)
    field = np.array([math.sin(c / 3.0) + math.cos(r / 2.0) + 2.5 for r, c in spots])
    counts = rng.poisson(np.outer(field, np.arange(1, len(FEATURES) + 1)) * 2)
    matrix_rows = [i for i, t in enumerate(in_tissue) if t]
    write_h5(folder / "filtered_feature_bc_matrix.h5", [barcodes[i] for i in matrix_rows], counts[matrix_rows])
    table = pd.DataFrame({
        "barcode": barcodes, "in_tissue": in_tissue, "array_row": [r for r, _ in spots],
        "array_col": [c for _, c in spots],
        "pxl_row_in_fullres": [spot_pixel(r, c, mpp)[1] for r, c in spots],
        "pxl_col_in_fullres": [spot_pixel(r, c, mpp)[0] for r, c in spots],
    })
    if old:  # Space Ranger 1.x: no header line
        table.to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        table.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    # Space Ranger >= 1.3: the pixel diameter of a 65 µm spot
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 65.0 / mpp, "tissue_hires_scalef": 0.17, "fiducial_diameter_fullres": 104.9 / mpp,
         "tissue_lowres_scalef": 0.05}))
    if image is not None:
        width = int(ORIGIN[0] * 2 + (2 * per_row) * 50.0 / mpp)
        height = int(ORIGIN[1] * 2 + rows * 50.0 * math.sqrt(3) / mpp)
        pixels = rng.integers(120, 230, size=(height, width, 3), dtype=np.uint8)
        pixels[..., 1] //= 2  # pinkish, H&E-like
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(image)
    return {"barcodes": [barcodes[i] for i in matrix_rows], "counts": counts[matrix_rows],
            "spots": [spots[i] for i in matrix_rows]}


def write_visium_dataset(root: Path, samples=(("S1", "P1"), ("S2", "P2"), ("S3", "P3")), old=()) -> Path:
    """A manifest of Space Ranger folders, with relative paths; returns the data directory."""
    lines = ["sample,patient,folder,image"]
    for i, (name, patient) in enumerate(samples):
        write_visium_sample(root / "runs" / name / "outs", seed=i, old=name in old, image=root / "images" / f"{name}.png")
        lines.append(f"{name},{patient},runs/{name},images/{name}.png")  # the run folder: outs/ is found inside
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def visium_dir(tmp_path):
    return write_visium_dataset(tmp_path / "visium")


def test_reads_a_space_ranger_folder(visium_dir):
    dataset = open_visium(visium_dir)
    assert [(s.name, s.patient, s.has_image) for s in dataset.sections()] == [
        ("S1", "P1", True), ("S2", "P2", True), ("S3", "P3", True)]
    s = dataset.load_section("S1")
    truth = write_visium_sample(visium_dir / "again", seed=0)  # same seed: the same counts
    assert list(s.spot_ids) == truth["barcodes"] and s.n_spots == 35
    # Gene Expression only, the two DUP loci summed in place of the first
    assert list(s.genes) == ["G1", "G2", "DUP", "G3", "G4", "G5", "G6"]
    expected = truth["counts"][:, [0, 1, 2, 3, 5, 6, 7]].copy()
    expected[:, 2] += truth["counts"][:, 4]
    assert s.counts.dtype.kind == "i" and isinstance(s.counts, sp.csr_matrix)
    np.testing.assert_array_equal(s.counts.toarray(), expected)
    # grid = (array_col, array_row), pixel = (pxl_col, pxl_row); the scale from the 100 µm pitch
    np.testing.assert_array_equal(s.grid, [(c, r) for r, c in truth["spots"]])
    np.testing.assert_allclose(s.pixel, [spot_pixel(r, c) for r, c in truth["spots"]])
    assert s.mpp == pytest.approx(MPP, rel=1e-9)
    assert (s.lattice, s.spot_diameter_um, s.spot_pitch_um) == ("hex", 55.0, 100.0)
    assert s.image_path == visium_dir / "images" / "S1.png"
    assert {p.name for p in s.source_files} == {"manifest.csv", "filtered_feature_bc_matrix.h5",
                                                "tissue_positions.csv", "scalefactors_json.json", "S1.png"}
    qc = dataset.qc["S1"]
    assert qc["n_merged_symbols"] == 1 and qc["n_spotfile_rows_without_counts"] == 0
    assert qc["spot_diameter_implied_um"] == pytest.approx(65.0)


def test_old_headerless_positions_give_the_same_section(tmp_path):
    new = write_visium_dataset(tmp_path / "new", samples=(("S1", "P1"),))
    old = write_visium_dataset(tmp_path / "old", samples=(("S1", "P1"),), old=("S1",))
    assert (old / "runs/S1/outs/spatial/tissue_positions_list.csv").read_text().startswith("AAAC")
    a, b = open_visium(new).load_section("S1"), open_visium(old).load_section("S1")
    for field in ("spot_ids", "genes", "grid", "pixel"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.counts != b.counts).nnz == 0 and a.mpp == b.mpp


def test_scale_is_measured_on_a_rotated_image(tmp_path):
    """The pitch fit does not assume the array is aligned with the image."""
    from stbench.data.layouts import grid_um, mpp_from_lattice

    grid = np.array([(c, r) for r, c in hex_spots(5, 5)])
    angle = 0.3
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pixel = grid_um(grid, "hex") @ rot.T / 0.5 + 1000.0
    pixel[:, 1] *= -1  # and flipped
    assert mpp_from_lattice(grid, pixel, "hex") == pytest.approx(0.5)
    assert mpp_from_lattice(grid[:2], pixel[:2], "hex") is None


def test_data_check_and_run(visium_dir, tmp_path, capsys, one_torch_thread):
    assert main(["data", "check", "visium", "--data-dir", str(visium_dir), "--out", str(tmp_path / "qc")]) == 0
    report = capsys.readouterr().out
    assert "dataset visium: 3 sections, 3 patients, 105 spots, 3 with images" in report
    assert re.search(r"S1 +P1 +35 +7 +yes +2 ", report)  # spots, genes, image, µm/px
    assert (tmp_path / "qc" / "S1.png").is_file()

    out = tmp_path / "run"
    argv = ["run", "--methods", "ridge,prompt_knn", "--dataset", "visium", "--data-dir", str(visium_dir),
            "--out", str(out), "--set", "panel.hvg=4", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    res = pd.read_csv(out / "results.csv")
    assert sorted(res["method"].unique()) == ["prompt_knn", "ridge"]
    assert res["slide"].nunique() == 3 and res["fold"].nunique() == 3
    assert res.groupby("method")["n_spots"].sum().tolist() == [105, 105]


def _error(capsys, data_dir) -> str:
    assert main(["data", "check", "visium", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress lines: the error, on one line
    assert last.startswith("stbench: error: visium")
    return last


def test_missing_manifest(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no manifest.csv" in _error(capsys, tmp_path / "empty")
    assert "not found" in _error(capsys, tmp_path / "nowhere")


def test_missing_manifest_column(visium_dir, capsys):
    manifest = visium_dir / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("folder", "dir"))
    assert "missing column(s) folder" in _error(capsys, visium_dir)


@pytest.mark.parametrize("remove, says", [
    ("runs/S2/outs/filtered_feature_bc_matrix.h5", "count matrix of sample 'S2' not found"),
    ("runs/S2/outs/spatial/tissue_positions.csv", "spot positions of sample 'S2' not found"),
    ("images/S2.png", "image of sample 'S2' not found"),
])
def test_missing_file(visium_dir, capsys, remove, says):
    (visium_dir / remove).unlink()
    err = _error(capsys, visium_dir)
    assert says in err and str(visium_dir / remove) in err


def test_missing_positions_column(visium_dir, capsys):
    path = visium_dir / "runs/S1/outs/spatial/tissue_positions.csv"
    pd.read_csv(path).drop(columns=["array_col"]).to_csv(path, index=False)
    err = _error(capsys, visium_dir)
    assert "tissue_positions.csv" in err and "missing column(s) array_col" in err


def test_coordinate_outside_the_image(visium_dir, capsys):
    # a downscaled copy in place of the full-resolution image: every spot falls outside
    path = visium_dir / "images" / "S1.png"
    with Image.open(path) as im:
        im.resize((im.width // 4, im.height // 4)).save(path)
    err = _error(capsys, visium_dir)
    assert "lie outside the" in err and "S1.png" in err and "not tissue_hires_image.png" in err


def test_barcodes_that_do_not_join(visium_dir, capsys):
    path = visium_dir / "runs/S1/outs/spatial/tissue_positions.csv"
    table = pd.read_csv(path)
    table["barcode"] = table["barcode"].str.replace("-1", "-2")
    table.to_csv(path, index=False)
    err = _error(capsys, visium_dir)
    assert "barcodes do not join: 35 of 35" in err and "AAAC000001-1" in err


def test_unknown_pixel_size(tmp_path, capsys):
    root = tmp_path / "one_row"
    write_visium_sample(root / "S1", rows=1, per_row=6)  # every spot on one line: no 2-D pitch to measure
    (root / "manifest.csv").write_text("sample,patient,folder,image\nS1,P1,S1,\n")
    err = _error(capsys, root)
    assert "unknown pixel size" in err and "add an mpp column" in err
    # the manifest's mpp column settles it
    (root / "manifest.csv").write_text("sample,patient,folder,image,mpp\nS1,P1,S1,,2.0\n")
    assert open_visium(root).load_section("S1").mpp == 2.0
    (root / "manifest.csv").write_text("sample,patient,folder,image,mpp\nS1,P1,S1,,zero\n")
    assert "column mpp of sample 'S1' (line 2) is 'zero', not a positive number" in _error(capsys, root)


def test_visium_hd_and_other_feature_types_are_refused(visium_dir, capsys):
    spatial = visium_dir / "runs/S1/outs/spatial"
    (spatial / "tissue_positions.csv").rename(spatial / "tissue_positions.parquet")
    assert "Visium HD binned output" in _error(capsys, visium_dir)
    (spatial / "tissue_positions.parquet").rename(spatial / "tissue_positions.csv")
    truth = write_visium_sample(visium_dir / "scratch", seed=0)
    write_h5(visium_dir / "runs/S1/outs/filtered_feature_bc_matrix.h5", truth["barcodes"],
             truth["counts"][:, :1], features=[("ADT", "Antibody Capture")])
    assert "no 'Gene Expression' feature" in _error(capsys, visium_dir)


def test_normalised_matrix_and_manifest_mistakes(visium_dir, capsys):
    path = visium_dir / "runs/S1/outs/filtered_feature_bc_matrix.h5"
    with h5py.File(path, "r+") as f:
        data = f["matrix/data"][()].astype(np.float32) / 3
        del f["matrix/data"]
        f["matrix/data"] = data
    assert "non-integer count" in _error(capsys, visium_dir)
    manifest = visium_dir / "manifest.csv"
    manifest.write_text("sample,patient,folder,image\nS1,P1,runs/S1,\nS1,P2,runs/S2,\n")
    assert "sample 'S1' is listed twice (lines 2 and 3)" in _error(capsys, visium_dir)
    manifest.write_text("sample,patient,folder,image\nS1,,runs/S1,\n")
    assert "empty patient on line 2" in _error(capsys, visium_dir)


def test_data_dir_from_the_environment(visium_dir, tmp_path, monkeypatch):
    """Without --data-dir: $STBENCH_DATA/visium, as her2 uses $STBENCH_DATA/her2st."""
    monkeypatch.setenv("STBENCH_DATA", str(visium_dir.parent))
    assert [s.name for s in open_visium(None).sections()] == ["S1", "S2", "S3"]
    assert open_visium(visium_dir / "manifest.csv").manifest == visium_dir / "manifest.csv"
    with pytest.raises(DataError, match=r"\$STBENCH_DATA/visium"):
        monkeypatch.setenv("STBENCH_DATA", str(tmp_path / "elsewhere"))
        open_visium(None)


def test_mismatched_scale_factors_warn(visium_dir):
    path = visium_dir / "runs/S1/outs/spatial/scalefactors_json.json"
    path.write_text(json.dumps({"spot_diameter_fullres": 9.0}))
    with pytest.warns(UserWarning, match="spot_diameter_fullres 9 px is a 18 µm spot"):
        open_visium(visium_dir).load_section("S1")


def test_only_in_tissue_spots_are_read(visium_dir):
    path = visium_dir / "runs/S1/outs/spatial/tissue_positions.csv"
    table = pd.read_csv(path)
    table.loc[5, "in_tissue"] = 0  # a counted barcode outside the tissue: dropped
    table.loc[len(table)] = ["AAAC99-1", 1, 20, 20, 9.0, 9.0]  # an in-tissue row without counts: counted
    table.to_csv(path, index=False)
    dataset = open_visium(visium_dir)
    s = dataset.load_section("S1")
    assert s.n_spots == 34 and table.loc[5, "barcode"] not in set(s.spot_ids)
    assert dataset.qc["S1"]["n_out_of_tissue"] == 1 and dataset.qc["S1"]["n_spotfile_rows_without_counts"] == 1
