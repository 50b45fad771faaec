"""The h5py writer of prediction files against anndata's own reader."""

import anndata
import numpy as np
import pandas as pd

from stbench.h5ad import write_h5ad


def test_every_element_reads_back_with_anndata(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 3)).astype(np.float32)
    truth = rng.normal(size=(5, 3)).astype(np.float32)
    obs = {"spot_id": np.array([f"{i}x{i}" for i in range(5)]), "grid_x": np.arange(5), "pixel_x": np.linspace(0, 1, 5),
           "is_prompt": np.array([True, False, False, True, False]), "fold": np.full(5, 2)}
    path = tmp_path / "p.h5ad"
    write_h5ad(path, X, obs["spot_id"], obs, np.array(["G1", "Gène2", "G3"]), layers={"truth": truth},
               obsm={"spatial": rng.normal(size=(5, 2))}, uns={"stbench": {"method": "m", "fold": 2, "mpp": 0.5}},
               obs_index_name="spot", var_index_name="gene")
    ad = anndata.read_h5ad(path)
    np.testing.assert_array_equal(ad.X, X)
    np.testing.assert_array_equal(ad.layers["truth"], truth)
    assert ad.obs_names.tolist() == obs["spot_id"].tolist() and ad.obs.index.name == "spot"
    assert ad.var_names.tolist() == ["G1", "Gène2", "G3"] and ad.var.index.name == "gene"
    assert list(ad.obs.columns) == list(obs)
    assert ad.obs["is_prompt"].dtype == bool and ad.obs["is_prompt"].tolist() == obs["is_prompt"].tolist()
    assert pd.api.types.is_integer_dtype(ad.obs["fold"]) and (ad.obs["fold"] == 2).all()
    np.testing.assert_allclose(ad.obs["pixel_x"], obs["pixel_x"])
    assert ad.obsm["spatial"].shape == (5, 2)
    assert ad.uns["stbench"] == {"method": "m", "fold": 2, "mpp": 0.5}
