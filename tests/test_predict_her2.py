"""Issue 11's done-when checks on the real HER2+ data: a ridge run with --save-models, then stbench predict
with a fold's model on a copy of that fold's test section without its counts gives the run's own
predictions; and stbench predict --image on a her2 H&E image puts its spots on the tissue."""

import json

import anndata
import numpy as np
import pytest
from scipy.spatial import cKDTree

from stbench.cli import main
from stbench.lattice import read_thumbnail, saturation
from stbench.plugins import load_plugins

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def her2_ridge(tmp_path_factory):
    from conftest import SHARED_HER2

    if not (SHARED_HER2 / "ST-cnts").is_dir():
        pytest.skip(f"real HER2+ data not found at {SHARED_HER2}")
    out = tmp_path_factory.mktemp("her2") / "run"
    with pytest.warns(UserWarning) as record:  # the imaged sections C2-C6, section-level folds
        assert main(["run", "--methods", "ridge", "--dataset", "her2", "--data-dir", str(SHARED_HER2), "--out",
                     str(out), "--save-models", "--quiet"]) == 0
    assert "5 of 36 sections" in " ".join(str(w.message) for w in record)
    return SHARED_HER2, out


def test_predict_on_a_test_section_without_counts_equals_the_run(her2_ridge, tmp_path):
    data, out = her2_ridge
    fold = json.loads((out / "split.json").read_text())["folds"][1]
    [name] = fold["test"]
    # the section as a user with a new slide has it: its spot file and its image, no counts
    bare = tmp_path / "bare"
    (bare / "ST-spotfiles").mkdir(parents=True)
    (bare / "ST-spotfiles" / f"{name}_selection.tsv").write_bytes(
        (data / "ST-spotfiles" / f"{name}_selection.tsv").read_bytes())
    image = next((data / "ST-imgs" / name[0] / name).glob("*.jpg"))
    (bare / "ST-imgs" / name[0] / name).mkdir(parents=True)
    (bare / "ST-imgs" / name[0] / name / image.name).symlink_to(image)

    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(out / "models" / "ridge" / "fold1"), "--dataset", "her2", "--data-dir",
                 str(bare), "--out", str(pred), "--quiet"]) == 0
    ran = anndata.read_h5ad(out / "predictions" / "ridge" / f"{name}.h5ad")
    again = anndata.read_h5ad(pred / f"{name}.h5ad")
    assert ran.n_vars == again.n_vars == 785 and list(ran.var_names) == list(again.var_names)
    # the spot file may list spots that have no counts (the run drops them): compare the spots of the run
    assert set(ran.obs_names) <= set(again.obs_names)
    assert np.array_equal(again[ran.obs_names].X, ran.X)
    assert "truth" not in again.layers and again.uns["stbench"]["model_fold"] == 1
    assert (pred / f"{name}.png").exists()  # and its spot maps


def test_predict_image_puts_spots_on_the_tissue(her2_ridge, tmp_path):
    data, out = her2_ridge
    section = load_plugins(entry_points=False).datasets.load("her2")(data, None).load_section("C2")
    pred = tmp_path / "img"
    assert main(["predict", "--model", str(out / "models" / "ridge" / "fold0"), "--image", str(section.image_path),
                 "--mpp", f"{section.mpp:.4f}", "--out", str(pred), "--quiet"]) == 0
    ad = anndata.read_h5ad(pred / f"{section.image_path.stem}.h5ad")
    lattice = ad.obsm["spatial"]
    # about as many spots as the ST array had under the tissue (187 measured spots of C2)
    assert 0.8 * section.n_spots < ad.n_obs < 1.25 * section.n_spots
    # every lattice spot lies among the measured spots (which the ST pipeline selected as under tissue)
    distance, _ = cKDTree(section.pixel).query(lattice)
    assert (distance < 1.5 * section.spot_pitch_um / section.mpp).all()
    # and none on the white background: under each spot's disc the H&E is darker and more coloured than
    # the glass (the top and bottom rows of the image)
    rgb, scale, _ = read_thumbnail(section.image_path)
    brightness, colour = rgb.max(axis=2).astype(float), saturation(rgb)
    glass = np.r_[0:20, -20:0]
    x, y = np.round(lattice * scale).astype(int).T
    r = int(section.spot_diameter_um / section.mpp * scale / 2)
    disc = lambda a: np.array([a[j - r:j + r + 1, i - r:i + r + 1].mean() for i, j in zip(x, y)])  # noqa: E731
    assert disc(brightness).max() < np.median(brightness[glass]) - 20
    assert disc(colour).min() > 3 * np.median(colour[glass])
    assert np.isfinite(ad.X).all() and (pred / f"{section.image_path.stem}.png").exists()
