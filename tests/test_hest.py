"""The hest dataset: HEST-1k samples built in code (pyramidal TIFF, .h5ad, metadata JSON); data check and a
run through the CLI; sample selection; technology to lattice; each one-line error."""

import json
import shutil

import numpy as np
import pytest
from hest_samples import toy_image, write_hest_sample, write_toy_hest

from stbench.cli import main
from stbench.errors import ConfigError, DataError
from stbench_plugins.hest import HestOptions
from stbench_plugins.hest.reader import open_hest


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Four legacy-ST samples of three patients, with images (read-only: copy before changing it)."""
    return write_toy_hest(tmp_path_factory.mktemp("hest") / "hest")


@pytest.fixture
def copy(toy, tmp_path):
    root = tmp_path / "hest"
    shutil.copytree(toy, root)
    return root


def _one_line(exc_info, *words):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def _meta(root, sample, **changes):
    path = root / "metadata" / f"{sample}.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_sections_are_what_was_written(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson(3, (6, 4))
    grid = np.array([(x, y) for y in (4, 5) for x in (7, 8, 9)])
    pixel = grid * 100.0 + [[12.5, 40.25]]
    write_hest_sample(tmp_path, "A1", counts, ["g1", "g2", "g3", "g4"], grid, pixel, toy_image(700, 1000),
                      metadata={"pixel_size_um_estimated": 2.0, "patient": "Patient 7"})
    ds = open_hest(tmp_path)
    (info,) = ds.sections()
    assert (info.name, info.patient, info.has_image) == ("A1", "Patient 7", True)
    sec = ds.load_section("A1")
    assert sec.counts.dtype.kind == "i" and (sec.counts.toarray() == counts).all()
    assert sec.genes.tolist() == ["g1", "g2", "g3", "g4"] and sec.spot_ids.tolist() == [f"{x}x{y}" for x, y in grid]
    np.testing.assert_array_equal(sec.grid, grid)  # (x = array_col, y = array_row)
    np.testing.assert_array_equal(sec.pixel, pixel)  # (x = pxl_col_in_fullres, y = pxl_row_in_fullres)
    assert sec.mpp == 2.0 and sec.lattice == "square" and (sec.spot_diameter_um, sec.spot_pitch_um) == (100.0, 200.0)
    assert sec.image_path == tmp_path / "wsis" / "A1.tif"
    assert [p.name for p in sec.source_files] == ["A1.h5ad", "A1.json", "A1.tif"]


def test_data_check_and_a_run_through_the_cli(toy, tmp_path, capsys):
    assert main(["data", "check", "hest", "--data-dir", str(toy), "--out", str(tmp_path / "qc")]) == 0
    out = capsys.readouterr().out
    assert "dataset hest: 4 sections, 3 patients, 144 spots, 4 with images" in out
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["S1.png", "S2.png", "S3.png", "S4.png"]
    code = main(["run", "--methods", "ridge,prompt_knn", "--dataset", "hest", "--data-dir", str(toy),
                 "--out", str(tmp_path / "run"), "--set", "panel.hvg=4", "--quiet"])
    assert code == 0
    results = (tmp_path / "run" / "results.csv").read_text()
    for method in ("ridge", "prompt_knn"):
        for sample in ("S1", "S2", "S3", "S4"):
            assert f"{method}," in results and sample in results


def test_data_check_takes_a_selection_and_benchmark_names(toy, tmp_path, capsys):
    assert main(["data", "check", "hest", "--data-dir", str(toy), "--out", str(tmp_path / "qc"),
                 "--set", "dataset_options.ids=[S1,S3]"]) == 0
    out = capsys.readouterr().out
    assert "dataset hest: 2 sections" in out and "S3" in out and "S2 " not in out
    # a benchmark definition names its dataset, samples and panel: cscc_hest asks for NCBI ids the toy lacks
    assert main(["data", "check", "cscc_hest", "--data-dir", str(toy), "--out", str(tmp_path / "qc2")]) == 2
    assert "NCBI759" in capsys.readouterr().err


def test_the_environment_variable_and_a_parent_folder(toy, monkeypatch):
    monkeypatch.setenv("STBENCH_DATA", str(toy.parent))  # $STBENCH_DATA/hest
    assert len(open_hest(None).sections()) == 4
    assert len(open_hest(toy.parent).sections()) == 4  # the folder that holds hest/
    monkeypatch.setenv("STBENCH_DATA", str(toy.parent / "elsewhere"))
    with pytest.raises(DataError) as info:
        open_hest(None)
    _one_line(info, "hest data directory not found", "$STBENCH_DATA", "elsewhere")


@pytest.mark.parametrize("options, expected", [
    (dict(ids=["S3", "S1"]), ["S3", "S1"]),
    (dict(ids="S2, S4"), ["S2", "S4"]),
    (dict(where={"organ": "skin"}), ["S1", "S3"]),  # case-insensitive
    (dict(where={"organ": ["Breast", "Lung"]}), ["S2", "S4"]),
    (dict(ids=["S1", "S2"], where={"organ": "Breast"}), ["S2"]),
    (dict(where={"patient": "P1", "organ": "Skin"}), ["S1"]),
])
def test_selecting_samples(toy, options, expected):
    assert [s.name for s in open_hest(toy, HestOptions(**options)).sections()] == expected


def test_selection_mistakes(toy, capsys):
    with pytest.raises(DataError) as info:
        open_hest(toy, HestOptions(ids=["S1", "S9"]))
    _one_line(info, "S9.h5ad", "not found", "S1, S2, S3, S4")
    with pytest.raises(DataError) as info:
        open_hest(toy, HestOptions(where={"organn": "Skin"}))
    _one_line(info, "where.organn", "organ")
    with pytest.raises(DataError) as info:
        open_hest(toy, HestOptions(where={"organ": "Brain"}))
    _one_line(info, "organ='Brain'")
    for bad in (dict(ids=[["S1"]]), dict(where={"organ": None}), dict(where={"organ": {"a": 1}})):
        with pytest.raises(ConfigError):
            HestOptions(**bad)
    # through the config layer: a typo in the option's name, refused before anything runs
    assert main(["run", "--methods", "mean", "--dataset", "hest", "--data-dir", str(toy), "--set",
                 "dataset_options.idz=[S1]"]) == 2
    assert "did you mean 'ids'" in capsys.readouterr().err


def test_visium_is_a_hex_lattice(tmp_path):
    root = write_toy_hest(tmp_path / "hest", samples=("V1", "V2"), patients=("P1", "P2"), technology="Visium", mpp=1.0)
    sec = open_hest(root).load_section("V1")
    assert sec.lattice == "hex" and (sec.spot_diameter_um, sec.spot_pitch_um) == (55.0, 100.0)
    assert ((sec.grid[:, 0] + sec.grid[:, 1]) % 2 == 0).all()  # Visium's doubled columns, kept as they are
    from stbench.images.geometry import lattice_neighbours

    assert max(len(n) for n in lattice_neighbours(sec.grid, "hex")) == 6


@pytest.mark.parametrize("technology", ["Xenium", "Visium HD", "Slide-seq"])
def test_other_technologies_are_refused_by_name(copy, technology):
    _meta(copy, "S2", st_technology=technology)
    with pytest.raises(DataError) as info:
        open_hest(copy)
    _one_line(info, "S2.json", f"sample 'S2' is {technology} data", "Spatial Transcriptomics", "Visium")
    # and the others stay usable by selecting around it
    assert [s.name for s in open_hest(copy, HestOptions(where={"st_technology": "Spatial Transcriptomics"})).sections()] \
        == ["S1", "S3", "S4"]


def test_cli_refuses_in_one_line_with_exit_2(copy, tmp_path, capsys):
    _meta(copy, "S1", st_technology="Xenium")
    assert main(["data", "check", "hest", "--data-dir", str(copy), "--out", str(tmp_path / "qc")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("stbench: data check: ")]
    assert len(err) == 1 and "Xenium" in err[0] and "Traceback" not in err[0]


def test_missing_files(copy):
    (copy / "metadata" / "S3.json").unlink()
    with pytest.raises(DataError) as info:
        open_hest(copy)
    _one_line(info, "S3.json", "metadata of sample 'S3' not found")
    (copy / "metadata" / "S3.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        open_hest(copy)
    _one_line(info, "S3.json", "cannot read the JSON")
    shutil.rmtree(copy / "metadata")
    with pytest.raises(DataError) as info:
        open_hest(copy)
    _one_line(info, "hest data directory incomplete", "metadata/<id>.json")


def test_a_sample_without_its_image_has_none(copy):
    (copy / "wsis" / "S4.tif").unlink()
    ds = open_hest(copy)
    assert [s.has_image for s in ds.sections()] == [True, True, True, False]
    sec = ds.load_section("S4")
    assert sec.image_path is None and not sec.has_image and len(sec.source_files) == 2


def _rewrite_st(root, sample, **kwargs):
    """Sample S<k> of the toy again, with changes (write_hest_sample keywords)."""
    import anndata

    adata = anndata.read_h5ad(root / "st" / f"{sample}.h5ad")
    grid = np.column_stack([adata.obs["array_col"], adata.obs["array_row"]])
    pixel = np.column_stack([adata.obs["pxl_col_in_fullres"], adata.obs["pxl_row_in_fullres"]])
    args = dict(counts=adata.X.toarray(), genes=list(adata.var_names), grid=grid, pixel=pixel, spot_ids=adata.obs_names)
    args.update(kwargs)
    meta = json.loads((root / "metadata" / f"{sample}.json").read_text())
    write_hest_sample(root, sample, args.pop("counts"), args.pop("genes"), args.pop("grid"), args.pop("pixel"),
                      image=None, metadata=meta, **args)


@pytest.mark.parametrize("column", ["array_row", "array_col", "pxl_col_in_fullres"])
def test_a_missing_obs_column(copy, column):
    _rewrite_st(copy, "S2", drop_obs=(column,))
    ds = open_hest(copy)
    if column == "pxl_col_in_fullres":  # HEST keeps the centres in obsm["spatial"] too: that is used
        assert ds.load_section("S2").n_spots == 36
        import anndata

        adata = anndata.read_h5ad(copy / "st" / "S2.h5ad")
        del adata.obsm["spatial"]
        adata.write_h5ad(copy / "st" / "S2.h5ad")
    with pytest.raises(DataError) as info:
        ds.load_section("S2")
    _one_line(info, "S2.h5ad", "missing obs column(s)", column)


def test_without_array_columns_the_grid_comes_from_the_centres(copy):
    before = open_hest(copy).load_section("S3")
    _rewrite_st(copy, "S3", drop_obs=("array_row", "array_col"))
    ds = open_hest(copy)
    sec = ds.load_section("S3")
    np.testing.assert_array_equal(sec.grid - sec.grid.min(0), before.grid - before.grid.min(0))
    assert ds.qc["S3"]["grid_derived"] is True


def test_obs_values_are_checked(copy):
    _rewrite_st(copy, "S1", obs_extra={"array_row": np.r_[np.full(35, 3.0), 3.5]})
    with pytest.raises(DataError) as info:
        open_hest(copy).load_section("S1")
    _one_line(info, "S1.h5ad", "array_row", "3.5", "integers")


def test_spots_outside_tissue_are_dropped(copy):
    _rewrite_st(copy, "S1", obs_extra={"in_tissue": np.r_[np.ones(30, int), np.zeros(6, int)]})
    ds = open_hest(copy)
    sec = ds.load_section("S1")
    assert sec.n_spots == 30 and ds.qc["S1"]["n_out_of_tissue"] == 6 and sec.counts.shape[0] == 30


def test_a_coordinate_outside_the_image(copy):
    import anndata

    adata = anndata.read_h5ad(copy / "st" / "S1.h5ad")
    pixel = np.column_stack([adata.obs["pxl_col_in_fullres"], adata.obs["pxl_row_in_fullres"]]) * 4  # a downscaled frame
    _rewrite_st(copy, "S1", pixel=pixel)
    with pytest.raises(DataError) as info:
        open_hest(copy).load_section("S1")
    _one_line(info, "S1.h5ad", "outside the 650 x 650 px image", "full resolution")


def test_counts_must_be_raw(copy):
    _rewrite_st(copy, "S1", counts=np.full((36, 5), 0.25))
    with pytest.raises(DataError) as info:
        open_hest(copy).load_section("S1")
    _one_line(info, "S1.h5ad", "non-integer count", "raw UMI counts")
    (copy / "st" / "S2.h5ad").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError) as info:
        open_hest(copy).load_section("S2")
    _one_line(info, "S2.h5ad", "cannot read the .h5ad")


def test_pixel_size(copy):
    _meta(copy, "S1", pixel_size_um_estimated=None, pixel_size_um_embedded=None)
    with pytest.raises(DataError) as info:
        open_hest(copy).load_section("S1")
    _one_line(info, "S1.json", "unknown pixel size", "pixel_size_um_estimated")
    _meta(copy, "S1", pixel_size_um_estimated="n/a", pixel_size_um_embedded=2.0)  # estimated unusable: embedded
    assert open_hest(copy).load_section("S1").mpp == 2.0
    _meta(copy, "S1", pixel_size_um_estimated=2.0, pixel_size_um_embedded=2.5)
    with pytest.warns(UserWarning, match="disagree by 25%"):
        assert open_hest(copy).load_section("S1").mpp == 2.0  # HEST's own choice: estimated
    with pytest.warns(UserWarning) as record:  # and 2.5 is not what the spot pitch says either
        assert open_hest(copy, HestOptions(pixel_size_key="pixel_size_um_embedded")).load_section("S1").mpp == 2.5
    assert ["disagree by 25%" in str(w.message) for w in record] == [True, False]
    assert "measured from its 200 µm spot pitch" in str(record[1].message)
    with pytest.raises(DataError, match="no positive my_mpp"):
        open_hest(copy, HestOptions(pixel_size_key="my_mpp")).load_section("S1")
    # a pixel size that the spots' own 200 µm pitch contradicts (S1's spots are 100 px apart at 2 µm/px)
    _meta(copy, "S1", pixel_size_um_estimated=1.5, pixel_size_um_embedded=None)
    with pytest.warns(UserWarning, match=r"differs from the 2 µm/px measured from its 200 µm spot pitch"):
        ds = open_hest(copy)
        assert ds.load_section("S1").mpp == 1.5
    assert ds.qc["S1"]["mpp_measured"] == pytest.approx(2.0)


def test_duplicated_gene_symbols_are_summed(copy):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique")
        _rewrite_st(copy, "S1", genes=["G1", "G2", "G1", "G4", "G5"])
    ds = open_hest(copy)
    sec, before = ds.load_section("S1"), open_hest(copy).load_section("S2")
    assert sec.genes.tolist() == ["G1", "G2", "G4", "G5"] and ds.qc["S1"]["n_merged_symbols"] == 1
    assert sec.counts.shape == (36, 4) and before.counts.shape == (36, 5)


def test_patients_fall_back_to_the_sample_and_studies_are_kept_apart(copy):
    _meta(copy, "S4", patient="   ")  # HEST leaves some blank
    with pytest.warns(UserWarning, match=r"1 sample\(s\) \('S4'\); each is taken as its own patient"):
        ds = open_hest(copy)
    assert [s.patient for s in ds.sections()] == ["P1", "P1", "P2", "S4"]
    _meta(copy, "S1", dataset_title="Study A")
    _meta(copy, "S2", dataset_title="Study B")  # both say "P1": two people
    with pytest.warns(UserWarning, match="own patient"):
        ds = open_hest(copy)
    assert [s.patient for s in ds.sections()] == ["Study A / P1", "Study B / P1", "unnamed study / P2", "S4"]


# --- benchmark definitions on HEST-1k -----------------------------------------------------------------

CSCC_PATIENTS = {759: "Patient 10", 760: "Patient 10", 761: "Patient 10", 762: "Patient 9", 763: "Patient 9",
                 764: "Patient 9", 765: "Patient 5", 766: "Patient 5", 767: "Patient 5", 768: "Patient 2",
                 769: "Patient 2", 770: "Patient 2"}  # HEST-1k metadata (TRIPLEX input/ST/andrew/ids.csv)


def test_benchmark_definitions():
    from conftest import REPO

    from stbench import benchmark
    from stbench.data.expression import read_panel_file

    cscc, base = benchmark.resolve_config("cscc_hest")
    assert cscc.dataset == "hest" and cscc.split == "leave_one_patient_out" and cscc.protocol_level == "patient"
    assert cscc.dataset_options["ids"] == [f"NCBI{i}" for i in range(759, 771)]
    panel = read_panel_file(benchmark.panel_path(cscc.panel.file, base))
    assert len(panel) == 171 and panel[:3] == ["PPP1R12A", "S100P", "IMP4"]
    shared = REPO.parent / "shared" / "data" / "gene-panels" / "cscc_171.npy"
    if shared.exists():  # the published file, in its order
        assert panel == [str(g) for g in np.load(shared, allow_pickle=True)]
    her2, base2 = benchmark.resolve_config("her2_hest")
    assert her2.dataset_options["ids"] == [f"SPA{i}" for i in range(119, 155)]
    her2_own, base3 = benchmark.resolve_config("her2")
    assert read_panel_file(benchmark.panel_path(her2.panel.file, base2)) == read_panel_file(
        benchmark.panel_path(her2_own.panel.file, base3))
    assert (her2.normalisation, her2.prompt, her2.split_params) == (her2_own.normalisation, her2_own.prompt,
                                                                    her2_own.split_params)
    HestOptions(**her2.dataset_options)  # the options the definitions set are valid


def test_cscc_hest_runs_leave_one_patient_out_on_its_samples(tmp_path):
    from conftest import REPO

    from stbench.data.expression import read_panel_file

    genes = read_panel_file(REPO / "benchmarks" / "stbench_benchmarks" / "cscc_hest" / "cscc_171.txt") + ["XG1", "XG2"]
    samples = [f"NCBI{i}" for i in range(759, 771)]
    root = write_toy_hest(tmp_path / "hest", samples=samples + ["NCBI771"], patients=[CSCC_PATIENTS[i] for i in range(759, 771)]
                          + ["Patient 1"], genes=genes, image=False, side=4)
    out = tmp_path / "run"
    assert main(["run", "--methods", "mean,prompt_knn", "--dataset", "cscc_hest", "--data-dir", str(root),
                 "--out", str(out), "--quiet"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["folds"]) == 4  # NCBI771, not in the definition, is left out
    assert {tuple(sorted(f["test"])) for f in split["folds"]} == {
        tuple(sorted(f"NCBI{i}" for i, p in CSCC_PATIENTS.items() if p == patient))
        for patient in ("Patient 2", "Patient 5", "Patient 9", "Patient 10")}
    assert "NCBI771" not in (out / "results.csv").read_text()


def test_a_transposed_square_grid_is_oriented_to_the_image(copy):
    """HEST's her2st samples have array_row from the spot name's x (align_her2): swapped back."""
    import anndata

    before = open_hest(copy).load_section("S1")
    adata = anndata.read_h5ad(copy / "st" / "S1.h5ad")
    grid = np.column_stack([adata.obs["array_row"], adata.obs["array_col"]])  # (y, x): the transpose
    _rewrite_st(copy, "S1", grid=grid)
    ds = open_hest(copy)
    np.testing.assert_array_equal(ds.load_section("S1").grid, before.grid)
    ds.load_section("S2")
    assert ds.qc["S1"]["grid_transposed"] is True and ds.qc["S2"]["grid_transposed"] is False
    # a hexagonal (Visium) grid is never swapped: its doubled columns would break
    root = write_toy_hest(copy.parent / "visium", samples=("V1",), patients=("P1",), technology="Visium", mpp=1.0)
    ds = open_hest(root)
    ds.load_section("V1")
    assert ds.qc["V1"]["grid_transposed"] is False
