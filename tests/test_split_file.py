"""``split: file``: folds read from JSON files (HyperST's published format and a simple one), with the
leakage checks of computed splits."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stbench.cli import main
from stbench.data.model import SectionInfo
from stbench.errors import ConfigError
from stbench.splits import check_folds, file_split

#: the HEST kidney ids of HyperST's published splits; in this fixture one patient per slide, except that
#: NCBI711 and NCBI713 share patient 2
SECTIONS = [SectionInfo(f"NCBI{i}", f"patient{i}") for i in range(692, 711)] + [
    SectionInfo("NCBI711", "patient2"), SectionInfo("NCBI712", "patient12"), SectionInfo("NCBI713", "patient2"),
    SectionInfo("NCBI714", "patient14")]


def hyperst_fold(seed: int) -> dict:
    """A fold as HyperST's split_sample.py writes it (split/<dataset>/flod_5/sample_split_flod_<k>.json)."""
    names = [s.name for s in SECTIONS]
    names = names[seed:] + names[:seed]
    return {"train_sample": names[4:], "val_sample": names[2:4], "test_sample": names[:2]}


def write_json(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))
    return str(path)


def test_hyperst_folder_of_split_files(tmp_path):
    folder = tmp_path / "split" / "kidney" / "flod_5"
    for k in (0, 1, 2, 19):  # natural order: flod_2 before flod_19
        write_json(folder / f"sample_split_flod_{k}.json", hyperst_fold(k))
    # the patient-level variant's extra lists are accepted (patients come from the dataset)
    patient = {**hyperst_fold(3), "train_patient": ["Patient 1"], "val_patient": [], "test_patient": ["Patient 4"]}
    write_json(tmp_path / "patient_flod_5" / "sample_split_flod_0.json", patient)

    folds = file_split(SECTIONS, seed=0, path=str(folder))
    assert [f.name for f in folds] == [f"sample_split_flod_{k}" for k in (0, 1, 2, 19)]
    assert [f.index for f in folds] == [0, 1, 2, 3]
    fold = hyperst_fold(19)
    assert (folds[3].train, folds[3].val, folds[3].test) == tuple(tuple(fold[k]) for k in
                                                                   ("train_sample", "val_sample", "test_sample"))
    # slide-random folds put patient 2 (NCBI711, NCBI713) on both sides in some folds: section level only
    check_folds(folds, SECTIONS, "section", "file")
    leaky = file_split(SECTIONS, 0, path=str(tmp_path / "patient_flod_5"))
    assert leaky[0].test == ("NCBI695", "NCBI696")
    one = [f for f in folds if {"NCBI711", "NCBI713"} & set(f.test) and {"NCBI711", "NCBI713"} & set(f.train + f.val)]
    assert one, "the fixture must hold a fold that splits patient 2"
    with pytest.raises(ConfigError, match="puts patient\\(s\\) patient2 in both train and test"):
        check_folds(one, SECTIONS, "patient", "file")


def test_simple_format(tmp_path):
    path = write_json(tmp_path / "folds.json", {"description": "two folds", "folds": [
        {"name": "first", "train": ["NCBI692", "NCBI693"], "val": ["NCBI694"], "test": ["NCBI695"]},
        {"train": ["NCBI695", "NCBI694"], "test": ["NCBI692"]},  # val is optional
    ]})
    folds = file_split(SECTIONS, 0, path=path)
    assert [(f.name, f.train, f.val, f.test) for f in folds] == [
        ("first", ("NCBI692", "NCBI693"), ("NCBI694",), ("NCBI695",)),
        ("folds fold 1", ("NCBI695", "NCBI694"), (), ("NCBI692",))]
    one = write_json(tmp_path / "one.json", {"train": ["NCBI692"], "test": ["NCBI693"]})
    assert [(f.name, f.train, f.test) for f in file_split(SECTIONS, 0, path=one)] == [("one", ("NCBI692",), ("NCBI693",))]


def test_the_same_leakage_checks_as_computed_splits(tmp_path):
    path = write_json(tmp_path / "leak.json", {"train": ["NCBI692", "NCBI693"], "val": ["NCBI693"], "test": ["NCBI694"]})
    with pytest.raises(ConfigError, match="both training and validation"):
        check_folds(file_split(SECTIONS, 0, path=path), SECTIONS, "section", "file")
    path = write_json(tmp_path / "leak.json", {"train": ["NCBI692", "NCBI694"], "test": ["NCBI694"]})
    with pytest.raises(ConfigError, match="both training and testing"):
        check_folds(file_split(SECTIONS, 0, path=path), SECTIONS, "section", "file")


def test_unknown_ids_are_refused_naming_the_file(tmp_path):
    path = write_json(tmp_path / "s" / "sample_split_flod_0.json",
                      {"train_sample": ["NCBI692", "NCBI999"], "val_sample": [], "test_sample": ["ZEN1"]})
    with pytest.raises(ConfigError) as e:
        file_split(SECTIONS, 0, path=path)
    message = str(e.value)
    assert "\n" not in message and path in message
    assert "names 2 sample id(s) that are not sections of this run: NCBI999, ZEN1" in message


@pytest.mark.parametrize("content, says", [
    ('{"train": ["NCBI692"], "tset": ["NCBI693"]}', "unknown key(s) tset"),
    ('{"train_sample": ["NCBI692"], "val_sample": []}', "has no 'test_sample' list"),
    ('{"train": "NCBI692", "test": ["NCBI693"]}', "'train' must be a list of sample ids"),
    ('{"train": ["NCBI692", "NCBI692"], "test": ["NCBI693"]}', "lists NCBI692 twice in 'train'"),
    ('{"folds": []}', "'folds' must be a non-empty list"),
    ('["NCBI692"]', "is a list, not an object"),
    ('{"train": ["NCBI692"],', "is not valid JSON"),
])
def test_malformed_files(tmp_path, content, says):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        file_split(SECTIONS, 0, path=str(path))
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_path_resolution(tmp_path, monkeypatch):
    definition = tmp_path / "benchmarks" / "kidney"
    write_json(definition / "splits" / "f.json", {"train": ["NCBI692"], "test": ["NCBI693"]})
    write_json(tmp_path / "cwd" / "splits" / "f.json", {"train": ["NCBI694"], "test": ["NCBI695"]})
    monkeypatch.chdir(tmp_path / "cwd")
    # relative: beside the benchmark definition first, then the current directory
    assert file_split(SECTIONS, 0, path="splits/f.json", base_dir=definition)[0].test == ("NCBI693",)
    assert file_split(SECTIONS, 0, path="splits/f.json", base_dir=tmp_path / "other")[0].test == ("NCBI695",)
    assert file_split(SECTIONS, 0, path="splits/f.json")[0].test == ("NCBI695",)
    assert file_split(SECTIONS, 0, path=str(definition / "splits" / "f.json"))[0].test == ("NCBI693",)
    with pytest.raises(ConfigError, match="split file splits/g.json not found \\(looked at .*benchmarks/kidney/splits/g.json, "):
        file_split(SECTIONS, 0, path="splits/g.json", base_dir=definition)
    with pytest.raises(ConfigError, match="split file needs split_params.path"):
        file_split(SECTIONS, 0)
    (tmp_path / "cwd" / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no \\*.json file"):
        file_split(SECTIONS, 0, path="empty")


def test_run_with_a_split_file(tmp_path, capsys):
    """End to end on the synthetic dataset: the run uses the file's folds and records them."""
    folds = [{"name": "a", "train": ["P1S1", "P1S2", "P2S1"], "val": ["P2S2"], "test": ["P3S1", "P3S2"]},
             {"name": "b", "train": ["P3S1", "P3S2", "P4S1"], "val": ["P4S2"], "test": ["P1S1", "P2S1"]}]
    path = write_json(tmp_path / "my_split.json", {"folds": folds})
    out = tmp_path / "run"
    argv = ["run", "--methods", "mean,prompt_knn", "--out", str(out), "--quiet",
            "--set", "split=file", "--set", f"split_params.path={path}"]
    assert main(argv) == 0, capsys.readouterr().err
    split = json.loads((out / "split.json").read_text())
    assert split["split"] == "file"
    assert [(f["name"], f["train"], f["val"], f["test"]) for f in split["folds"]] == [
        (f["name"], f["train"], f["val"], f["test"]) for f in folds]
    res = pd.read_csv(out / "results.csv")
    assert sorted(res[res["method"] == "mean"]["slide"]) == ["P1S1", "P2S1", "P3S1", "P3S2"]

    # a fold that puts a patient on both sides is refused at the benchmark's patient level, in one line
    leaky = write_json(tmp_path / "leaky.json", {"train": ["P1S1"], "test": ["P1S2"]})
    assert main([*argv[:-2], "--set", f"split_params.path={leaky}", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("stbench: error: split file fold 0 puts patient(s) P1 in both train and test; use a patient-level "
                   "split (leave_one_patient_out, patient_kfold), or declare protocol_level: section in the benchmark "
                   "if section-level results are intended")
    unknown = write_json(tmp_path / "unknown.json", {"train": ["P1S1"], "test": ["NCBI692"]})
    assert main([*argv[:-2], "--set", f"split_params.path={unknown}", "--out", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and unknown in err and "NCBI692" in err


def test_listed(capsys):
    assert main(["list", "splits"]) == 0
    assert "file" in capsys.readouterr().out
