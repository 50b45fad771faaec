"""Pictures of a run (stbench.plots): files written, their panels, the default genes, the errors."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from stbench.cli import main
from stbench.errors import ConfigError
from PIL import Image

from stbench.plots import (BACKGROUND_KEY, MEASURED, add_plot_arguments, cmd_plot, default_genes, pcc_distribution,
                           plot_run, png_text, read_panels, spot_maps)

#: a small generated dataset: 3 patients x 1 section (3 folds of leave-one-patient-out), images on
OPTIONS = ["--set", "dataset_options.n_patients=3", "--set", "dataset_options.sections_per_patient=1",
           "--set", "dataset_options.spots_per_section=120", "--set", "dataset_options.n_genes=12",
           "--set", "dataset_options.mpp=4"]  # coarse images render fast
METHODS = ["mean", "prompt_knn"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
        assert main(["run", "--methods", ",".join(METHODS), "--out", str(out), "--quiet", *OPTIONS]) == 0
    return out


def _plot(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    return cmd_plot(parser.parse_args([str(a) for a in argv]))


def _pearson_by_hand(pred, truth):
    """Per-gene Pearson r with scipy (independent of stbench.metrics); NaN for constant truth."""
    from scipy.stats import pearsonr

    out = []
    for g in range(truth.shape[1]):
        t, p = truth[:, g], pred[:, g]
        if np.ptp(t) == 0:
            out.append(np.nan)
        elif np.ptp(p) == 0:
            out.append(0.0)
        else:
            out.append(pearsonr(p, t)[0])
    return np.array(out)


def test_maps_and_distribution_written_with_one_panel_per_gene_and_label(run_dir, tmp_path):
    assert _plot(run_dir, "--out", tmp_path, "--genes", "SG0001,SG0002,SG0003") == 0
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.stem for p in maps] == ["P1S1", "P2S1", "P3S1"]  # every test slide
    labels = [MEASURED, *sorted(METHODS)]
    expected = [f"{g}|{label}" for g in ("SG0001", "SG0002", "SG0003") for label in labels]
    for png in maps:
        assert read_panels(png) == expected  # 3 genes x (measured + 2 methods) = 9 map panels
        assert png_text(png)[BACKGROUND_KEY] == "H&E"  # the generated sections have images
        with Image.open(png) as im:
            assert im.size[0] > 800 and im.size[1] > 600  # readable, not a thumbnail
    assert read_panels(tmp_path / "pcc_distribution.png") == [f"pcc|{m}" for m in sorted(METHODS)]


def test_default_genes_are_the_best_and_the_worst_by_per_gene_pcc(run_dir, tmp_path):
    import anndata

    pictures = plot_run(run_dir, tmp_path, slides=["P1S1"])
    # by hand: per-gene PCC on non-prompt spots, mean over test slides; 'mean' (constant by design) left out
    per_slide = []
    for path in sorted((run_dir / "predictions" / "prompt_knn").glob("*.h5ad")):
        ad = anndata.read_h5ad(path)
        scored = ~ad.obs["is_prompt"].to_numpy()
        per_slide.append(_pearson_by_hand(np.asarray(ad.X)[scored], np.asarray(ad.layers["truth"])[scored]))
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.array(per_slide), axis=0)
    genes = np.asarray(ad.var_names)
    best, worst = genes[np.nanargmax(mean)], genes[np.nanargmin(mean)]
    assert best != worst
    assert pictures.genes == [best, worst]
    assert read_panels(pictures.maps[0])[:3] == [f"{best}|{MEASURED}", f"{best}|mean", f"{best}|prompt_knn"]
    assert len(read_panels(pictures.maps[0])) == 6


def test_default_genes_rule():
    per_gene = {"a": {"G1": 0.1, "G2": 0.9, "G3": np.nan}, "b": {"G1": 0.3, "G2": 0.5, "G3": -0.2}}
    assert default_genes(per_gene) == ["G2", "G3"]  # means 0.2, 0.7, -0.2 (NaN left out)
    assert default_genes({"a": {"G1": 0.4, "G2": np.nan}}) == ["G1"]


def test_truth_reread_from_the_dataset_when_a_file_has_none(run_dir, tmp_path):
    """A prediction file without its truth layer gets the truth from the dataset, normalised as the run
    did: the pictures are the same pixels."""
    import h5py

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for path in (copy / "predictions").glob("*/P2S1.h5ad"):
        with h5py.File(path, "a") as f:
            del f["layers/truth"]
    kept = plot_run(run_dir, tmp_path / "kept", slides=["P2S1"], genes=["SG0004"]).maps[0]
    reread = plot_run(copy, tmp_path / "reread", slides=["P2S1"], genes=["SG0004"]).maps[0]
    assert np.array_equal(np.asarray(Image.open(kept)), np.asarray(Image.open(reread)))


def test_unknown_gene_slide_or_run_is_one_line(run_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"--genes: NOPE not in the run's gene panel"):
        plot_run(run_dir, tmp_path, genes=["NOPE"])
    with pytest.raises(ConfigError, match=r"--slides: X9 not among the test slides .* P1S1, P2S1, P3S1"):
        plot_run(run_dir, tmp_path, slides=["X9"])
    with pytest.raises(ConfigError, match=r"--methods: ridge has no predictions"):
        plot_run(run_dir, tmp_path, methods=["ridge"])
    with pytest.raises(ConfigError, match="is not a run directory"):
        plot_run(tmp_path, tmp_path)
    assert not (tmp_path / "maps").exists()


def test_maps_without_the_dataset_are_drawn_on_white(tmp_path, monkeypatch):
    """Data moved since the run: a warning, and the spots on their coordinates without the H&E."""
    from tests.conftest import write_her2_layout

    data = write_her2_layout(tmp_path / "her2st", sections=("A1", "B1", "C1"), n_spots=25)
    out = tmp_path / "run"
    assert main(["run", "--methods", "prompt_knn", "--dataset", "her2", "--data-dir", str(data), "--out", str(out),
                 "--quiet", "--set", "split=leave_one_section_out", "--set", "protocol_level=section",
                 "--set", "panel.file=null", "--set", "panel.hvg=3"]) == 0
    shutil.rmtree(data)
    with pytest.warns(UserWarning, match="drawn without the H&E: dataset her2 cannot be opened"):
        pictures = plot_run(out, tmp_path / "pics")
    assert len(pictures.maps) == 3
    assert all(len(read_panels(p)) == 4 and png_text(p)[BACKGROUND_KEY] == "white" for p in pictures.maps)


def test_spot_maps_on_the_grid_without_pixels(tmp_path):
    from stbench.data.model import Section

    grid = np.array([(x, y) for y in range(6) for x in range(7)])
    section = Section(name="S", patient="P", spot_ids=np.array([f"{x}x{y}" for x, y in grid]), genes=np.array(["A", "B"]),
                      counts=None, grid=grid, pixel=None, mpp=None)
    values = {"measured": np.c_[grid[:, 0], grid[:, 1]].astype(float), "m": np.ones((len(grid), 2))}
    path = spot_maps(section, values, ["B"], tmp_path / "m.png", title="t", panel_genes=["A", "B"],
                     prompt_mask=np.arange(len(grid)) % 5 == 0, pcc={"m": {"B": float("nan")}})
    assert read_panels(path) == ["B|measured", "B|m"] and png_text(path)[BACKGROUND_KEY] == "white"
    with pytest.raises(ValueError, match="shape"):
        spot_maps(section, {"m": np.ones((3, 2))}, ["A"], tmp_path / "x.png", title="t", panel_genes=["A", "B"])


def test_pcc_distribution_marks_undefined_methods(tmp_path):
    path = pcc_distribution({"a": np.linspace(-0.2, 0.8, 50), "mean": np.zeros(50), "b": {"G": 0.3}},
                            tmp_path / "d.png", title="t", undefined=["mean"])
    assert read_panels(path) == ["pcc|a", "pcc|mean", "pcc|b"]
    assert Path(path).stat().st_size > 5000
