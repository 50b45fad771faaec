"""The core issue's acceptance run on the real HER2+ data: all 36 sections, 8 leave-one-patient-out folds."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stbench.cli import main

pytestmark = pytest.mark.slow


def test_her2_mean_and_prompt_knn_end_to_end(her2_dir, tmp_path, capsys):
    out = tmp_path / "her2"
    argv = ["run", "--methods", "mean,prompt_knn", "--dataset", "her2", "--data-dir", str(her2_dir), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| prompt_knn" in printed and "leave_one_patient_out" in printed
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 2 * 36 and res["slide"].nunique() == 36 and res["fold"].nunique() == 8
    assert res.groupby("method")["n_spots"].sum().tolist() == [13_620, 13_620]
    split = json.loads((out / "split.json").read_text())
    assert [f["test_patients"] for f in split["folds"]] == [[p] for p in "ABCDEFGH"]

    # the reported PCC of a slide equals SciPy's on the saved predictions (non-prompt spots)
    row = res[(res["method"] == "prompt_knn") & (res["slide"] == "B3")].iloc[0]
    ad = anndata.read_h5ad(out / "predictions" / "prompt_knn" / "B3.h5ad")
    assert ad.n_vars == 785
    keep = ~ad.obs["is_prompt"].to_numpy()
    pred, truth = ad.X[keep], ad.layers["truth"][keep]
    varying = [g for g in range(ad.n_vars) if np.ptp(truth[:, g]) > 0]
    assert row["pcc_skipped"] == ad.n_vars - len(varying) == 1  # ARF5 is all-zero in B3
    # a gene whose prompts are all equal gets a constant prediction: 0 by the documented policy
    # (SciPy calls it undefined), and counted in pcc_pred_constant
    flat = [g for g in varying if np.ptp(pred[:, g]) == 0]
    r = [0.0 if g in flat else stats.pearsonr(pred[:, g], truth[:, g])[0] for g in varying]
    assert row["pcc"] == pytest.approx(np.mean(r), abs=1e-5)
    assert row.get("pcc_pred_constant", 0) == len(flat)

    # run again: everything is complete, nothing is recomputed or duplicated
    assert main(argv) == 0
    assert "16 method x fold units were already complete" in capsys.readouterr().err
    assert pd.read_csv(out / "results.csv").equals(res)


def test_her2_image_methods_run_section_level_on_patient_c(her2_dir, tmp_path, capsys):
    out = tmp_path / "img"
    argv = ["run", "--methods", "ridge,prompt_knn,mean", "--dataset", "her2", "--data-dir", str(her2_dir), "--out", str(out), "--quiet"]
    with pytest.warns(UserWarning) as record:
        assert main(argv) == 0
    messages = " ".join(str(w.message) for w in record)
    assert "5 of 36 sections" in messages and "not independent" in messages
    split = json.loads((out / "split.json").read_text())
    assert split["split"] == "leave_one_section_out" and split["protocol_level"] == "section"
    assert [f["test"] for f in split["folds"]] == [["C2"], ["C3"], ["C4"], ["C5"], ["C6"]]
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 15
    assert res[res["method"] == "ridge"]["pcc"].mean() > 0.1  # real H&E signal through the offline encoder
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main([*argv[:-1], "--out", str(tmp_path / "again")]) == 0  # features now come from the cache
    assert pd.read_csv(tmp_path / "again" / "results.csv")["pcc"].equals(res["pcc"])
