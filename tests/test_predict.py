"""stbench predict (issue 11): sections without counts, prompts from a file, scoring a measured slide
like the run, a plain image with a spot lattice, and the one-line errors."""

from __future__ import annotations

import json
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest

from stbench import models
from stbench.cli import main
from stbench.data.model import Section, Slide
from stbench.errors import DataError
from stbench.lattice import lattice_positions, otsu_threshold, spots_on_tissue, tissue_mask
from stbench.images.geometry import lattice_neighbours
from stbench.plugins import load_plugins
from stbench.predict import read_prompts

from conftest import write_her2_layout

HVG = ["--set", "panel.file=null", "--set", "panel.hvg=3"]


def _run(out, methods, *extra):
    return main(["run", "--methods", methods, "--out", str(out), "--quiet", "--save-models", *extra])


@pytest.fixture
def her2_runs(tmp_path):
    """A tiny her2-layout dataset, a mean + prompt_knn run with saved models, and a copy of the data
    without its counts (spot files only)."""
    data = write_her2_layout(tmp_path / "her2")
    out = tmp_path / "run"
    assert _run(out, "mean,prompt_knn", "--dataset", "her2", "--data-dir", str(data), *HVG) == 0
    bare = tmp_path / "bare"
    shutil.copytree(data / "ST-spotfiles", bare / "ST-spotfiles")
    return data, out, bare


def test_a_section_without_counts_is_listed_loaded_and_left_out_of_runs(her2_runs, tmp_path, capsys):
    _, _, bare = her2_runs
    dataset = load_plugins(entry_points=False).datasets.load("her2")(bare, None)
    infos = dataset.sections()
    assert [i.name for i in infos] == ["A1", "A2", "B1", "C1"] and not any(i.has_counts for i in infos)
    section = dataset.load_section("A1")
    assert section.counts is None and not section.has_counts and section.n_spots == 30 and section.mpp is not None
    slide = Slide.unmeasured(section, ["G1", "G2"])
    assert slide.expr is None and slide.is_masked and slide.prompt_mask().sum() == 0 and slide.n_genes == 2
    # a run cannot train or score on it, and says so in one line
    code = main(["run", "--methods", "mean", "--dataset", "her2", "--data-dir", str(bare), "--out", str(tmp_path / "x"),
                 "--quiet", *HVG])
    err = capsys.readouterr().err
    assert code == 2 and "no section of dataset her2 has measured counts" in err and "stbench predict" in err


def test_predict_without_counts_equals_the_run(her2_runs, tmp_path):
    _, out, bare = her2_runs
    split = json.loads((out / "split.json").read_text())
    test = split["folds"][0]["test"]
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(out / "models" / "mean" / "fold0"), "--dataset", "her2", "--data-dir",
                 str(bare), "--slides", ",".join(test), "--out", str(pred), "--quiet"]) == 0
    for name in test:
        ran, again = anndata.read_h5ad(out / "predictions" / "mean" / f"{name}.h5ad"), anndata.read_h5ad(pred / f"{name}.h5ad")
        assert np.array_equal(ran.X, again.X) and list(ran.obs_names) == list(again.obs_names)
        assert "truth" not in again.layers and not again.obs["is_prompt"].any()
        provenance = again.uns["stbench"]
        assert provenance["model_sha256"] == models.file_sha256(out / "models" / "mean" / "fold0" / models.WEIGHTS_FILE)
        assert provenance["prompts"] == "none" and provenance["model_scope"] == "fold"
    assert not (pred / "metrics.csv").exists()  # nothing measured, nothing scored


def test_prompt_methods_need_prompts_and_take_them_from_a_file(her2_runs, tmp_path, capsys):
    data, out, bare = her2_runs
    model = out / "models" / "prompt_knn" / "fold0"
    name = json.loads((out / "split.json").read_text())["folds"][0]["test"][0]
    args = ["predict", "--model", str(model), "--dataset", "her2", "--data-dir", str(bare), "--slides", name, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method prompt_knn predicts a slide from its prompt spots" in err
    assert "--prompts FILE" in err and "'spot' column" in err

    # the run's prompt spots, as raw counts over all genes: predict normalises them as the run did
    prompt_ids = json.loads((out / "prompts.json").read_text())["slides"][name]
    section = load_plugins(entry_points=False).datasets.load("her2")(data, None).load_section(name)
    rows = [list(section.spot_ids).index(s) for s in prompt_ids]
    table = pd.DataFrame(section.counts.toarray()[rows], columns=list(section.genes))
    table.insert(0, "spot", prompt_ids)
    table.sample(frac=1.0, random_state=0).to_csv(tmp_path / "prompts.csv", index=False)  # any row order
    assert main([*args, "--out", str(tmp_path / "p"), "--prompts", str(tmp_path / "prompts.csv")]) == 0
    ran = anndata.read_h5ad(out / "predictions" / "prompt_knn" / f"{name}.h5ad")
    again = anndata.read_h5ad(tmp_path / "p" / f"{name}.h5ad")
    assert np.array_equal(ran.X, again.X)
    assert np.array_equal(ran.obs["is_prompt"].to_numpy(), again.obs["is_prompt"].to_numpy())
    assert again.uns["stbench"]["prompts"].startswith("file ")


def test_a_measured_slide_is_scored_like_the_run(her2_runs, tmp_path):
    data, out, _ = her2_runs
    test = json.loads((out / "split.json").read_text())["folds"][1]["test"]
    assert main(["predict", "--model", str(out / "models" / "prompt_knn" / "fold1"), "--dataset", "her2", "--data-dir",
                 str(data), "--slides", ",".join(test), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    scored = pd.read_csv(tmp_path / "p" / "metrics.csv").set_index("slide")
    results = pd.read_csv(out / "results.csv")
    ran = results[(results["method"] == "prompt_knn") & (results["fold"] == 1)].set_index("slide")
    assert sorted(scored.index) == sorted(test)
    for column in ("n_spots", "n_prompt", "n_scored", "pcc", "pcc_all", "mae", "mse", "ccc"):
        assert np.allclose(scored.loc[test, column], ran.loc[test, column], equal_nan=True), column
    again = anndata.read_h5ad(tmp_path / "p" / f"{test[0]}.h5ad")
    assert "truth" in again.layers


@pytest.mark.parametrize("text,fragments", [
    ("spot,G1\n", ["lacks 4 of the model's 5 panel genes"]),
    ("id,G1,G2,G3,G4,G5\n5x5,1,1,1,1,1\n", ["no 'spot' column"]),
    ("spot,G1,G2,G3,G4,G5\n5x5,1,-1,1,1,1\n", ["gene G2 of spot '5x5' (line 2)", "not a raw count"]),
    ("spot,G1,G2,G3,G4,G5\n99x99,1,1,1,1,1\n", ["not spots of that slide", "99x99"]),
    ("spot,G1,G2,G3,G4,G5\n5x5,1,1,1,1,1\n5x5,1,1,1,1,1\n", ["listed twice"]),
])
def test_a_malformed_prompts_file_is_one_line(tmp_path, text, fragments):
    section = Section("A1", "A", np.array(["5x5", "6x5"]), np.array([]), None, np.array([[5, 5], [6, 5]]),
                      np.zeros((2, 2)), 1.0)
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    with pytest.raises(DataError) as excinfo:
        read_prompts(path, {"A1": section}, ["G1", "G2", "G3", "G4", "G5"], "cpm_log1p")
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("args,fragment", [
    (["--dataset", "synthetic", "--image", "x.jpg", "--mpp", "0.5"], "either --dataset NAME"),
    (["--image", "x.jpg"], "--image needs --mpp"),
    (["--dataset", "synthetic", "--mpp", "0.5"], "--mpp and --lattice go with --image"),
])
def test_contradictory_predict_options_are_one_line(tmp_path, capsys, args, fragment):
    assert main(["predict", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# a plain image


def test_otsu_splits_two_populations():
    low = 0.05 + np.random.default_rng(0).normal(0, 0.01, 900)
    high = 0.6 + np.random.default_rng(1).normal(0, 0.01, 100)
    threshold = otsu_threshold(np.clip(np.r_[low, high], 0, 1))
    assert low.max() < threshold < high.min() and 0.2 < threshold < 0.45  # the middle of the gap


@pytest.mark.parametrize("lattice,neighbours", [("square", 8), ("hex", 6)])
def test_lattice_positions_follow_the_grid_conventions(lattice, neighbours):
    grid, pixel = lattice_positions(2000, 1500, 100.0, lattice)
    assert len(grid) == len({tuple(g) for g in grid.tolist()})
    assert (pixel[:, 0] < 2000).all() and (pixel[:, 1] < 1500).all() and (pixel > 0).all()
    near = lattice_neighbours(grid, lattice)
    inner = max(range(len(grid)), key=lambda i: len(near[i]))
    assert len(near[inner]) == neighbours
    distances = np.linalg.norm(pixel[near[inner]] - pixel[inner], axis=1)
    if lattice == "hex":  # every hex neighbour one pitch away
        assert np.allclose(distances, 100.0)
    else:  # the 3x3 block: 4 at one pitch, 4 at the diagonal
        assert sorted(np.round(distances, 6)) == [100.0] * 4 + [round(100 * np.sqrt(2), 6)] * 4


def _blob_image(path, width=3000, height=2000, centre=(1400, 1000), radii=(700, 450)):
    """A white slide with one stained (purple, textured) ellipse of tissue."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= 1
    image = np.full((height, width, 3), 242, np.uint8) + rng.integers(0, 6, (height, width, 3), dtype=np.uint8)
    tissue = np.array([150, 90, 170]) + rng.integers(-30, 30, (inside.sum(), 3))
    image[inside] = np.clip(tissue, 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=92)
    return inside


def test_a_lattice_is_laid_over_the_tissue_only(tmp_path):
    inside = _blob_image(tmp_path / "slide.jpg")
    section = spots_on_tissue(tmp_path / "slide.jpg", mpp=1.0, pitch_um=100.0, diameter_um=55.0, lattice="hex")
    assert section.counts is None and section.lattice == "hex" and section.spot_pitch_um == 100.0
    x, y = np.round(section.pixel).astype(int).T
    assert inside[y, x].all()  # every spot centre on tissue
    area = np.pi * 700 * 450
    expected = area / (100.0 ** 2 * np.sqrt(3) / 2)  # one hex cell per spot
    assert 0.8 * expected < section.n_spots < 1.1 * expected
    rgb = np.zeros((200, 300, 3), np.uint8) + 240
    assert not tissue_mask(rgb).any()  # a blank slide has no tissue


def test_predict_on_a_plain_image(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, "ridge", "--set", "dataset_options.spots_per_section=60", "--set", "dataset_options.n_patients=3") == 0
    _blob_image(tmp_path / "slide.jpg", width=2400, height=1600, centre=(1200, 800), radii=(700, 450))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "models" / "ridge" / "fold0"), "--image", str(tmp_path / "slide.jpg"),
                 "--mpp", "1.0", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "slide: " in printed
    ad = anndata.read_h5ad(out / "slide.h5ad")
    record = json.loads((run / "models" / "ridge" / "fold0" / "model.json").read_text())
    assert list(ad.var_names) == record["genes"] and np.isfinite(ad.X).all() and ad.n_obs > 20
    provenance = ad.uns["stbench"]
    assert "square lattice 200 µm apart" in provenance["spots"] and provenance["source"].endswith("slide.jpg")
    assert (out / "slide.png").exists()
    # a model that predicts from prompts cannot predict an image without them: one line
    assert _run(tmp_path / "knn", "prompt_knn", "--set", "dataset_options.spots_per_section=60") == 0
    assert main(["predict", "--model", str(tmp_path / "knn" / "models" / "prompt_knn" / "fold0"), "--image",
                 str(tmp_path / "slide.jpg"), "--mpp", "1.0", "--out", str(tmp_path / "p2"), "--quiet"]) == 2
    assert "predicts a slide from its prompt spots" in capsys.readouterr().err


def test_a_lattice_over_a_pyramidal_whole_slide_tiff_reads_it_through_openslide(tmp_path):
    from hest_samples import write_pyramid_tiff
    from PIL import Image

    from stbench.lattice import read_thumbnail

    inside = _blob_image(tmp_path / "slide.png")
    with Image.open(tmp_path / "slide.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    write_pyramid_tiff(tmp_path / "slide.tif", pixels, levels=4)
    rgb, scale, size = read_thumbnail(tmp_path / "slide.tif", max_side=400)
    assert size == (3000, 2000) and max(rgb.shape[:2]) <= 400 and scale == pytest.approx(rgb.shape[1] / 3000, rel=0.02)
    section = spots_on_tissue(tmp_path / "slide.tif", mpp=1.0, pitch_um=100.0, diameter_um=55.0, lattice="hex")
    x, y = np.round(section.pixel).astype(int).T
    assert section.n_spots > 50 and inside[y, x].all()
