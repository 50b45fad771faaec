"""Split protocols: patient disjointness, inner validation, seeding, refusal of leaking splits."""

import json
from dataclasses import replace

import pytest

from stbench.cli import main
from stbench.data.model import SectionInfo
from stbench.errors import ConfigError
from stbench.splits import (builtin_split_specs, check_folds, leave_one_patient_out, leave_one_section_out,
                            patient_kfold, random_slide)

SECTIONS = [SectionInfo(f"{p}{i}", p) for p in "ABCDEFGH" for i in range(1, 4 if p in "EFGH" else 7)]
PATIENT = {s.name: s.patient for s in SECTIONS}


def _patients(names):
    return {PATIENT[n] for n in names}


def test_leave_one_patient_out_is_a_patient_partition_with_inner_validation():
    folds = leave_one_patient_out(SECTIONS, seed=0)
    assert len(folds) == 8
    assert sorted(s for f in folds for s in f.test) == sorted(PATIENT)
    for f in folds:
        assert len(_patients(f.test)) == 1
        assert not _patients(f.test) & _patients(f.train + f.val)
        assert len(_patients(f.val)) == 1 and not _patients(f.val) & _patients(f.train)
        assert set(f.train) | set(f.val) | set(f.test) == set(PATIENT)
    check_folds(folds, SECTIONS, "patient", "leave_one_patient_out")


def test_inner_validation_can_be_switched_off():
    assert all(not f.val for f in leave_one_patient_out(SECTIONS, seed=0, inner_val=False))


#: 8 patients x 3 sections: enough choices that two seeds cannot give the same split by chance
SEEDED = [SectionInfo(f"{p}{i}", p) for p in "ABCDEFGH" for i in range(1, 4)]
#: every built-in protocol with its default parameters (inner validation on where it has one)
SEEDED_SPECS = {spec.name: spec for spec in builtin_split_specs()}


@pytest.mark.parametrize("name", sorted(SEEDED_SPECS))
def test_every_split_protocol_is_seeded(name):
    spec = SEEDED_SPECS[name]
    params = vars(spec.params()) if spec.params else {}
    assert params.get("inner_val", True), "the protocols are compared with inner validation on"

    def folds(seed):
        return [(f.index, f.train, f.val, f.test) for f in spec.func(SEEDED, seed, **params)]

    assert folds(0) == folds(0) and folds(1) == folds(1), f"{name}: the same seed must give the same folds"
    assert folds(0) != folds(1), f"{name}: seeds 0 and 1 gave identical folds"
    assert len(folds(0)) == len(folds(1))


def test_patient_kfold_groups_patients():
    folds = patient_kfold(SECTIONS, seed=0, k=4)
    assert len(folds) == 4
    tested = [p for f in folds for p in _patients(f.test)]
    assert sorted(tested) == sorted(set(PATIENT.values()))
    check_folds(folds, SECTIONS, "patient", "patient_kfold")
    with pytest.raises(ConfigError, match="k must be between 2 and the number of patients"):
        patient_kfold(SECTIONS, seed=0, k=9)


def test_leave_one_section_out_leaks_patients_and_is_refused_at_patient_level():
    folds = leave_one_section_out(SECTIONS, seed=0)
    assert len(folds) == len(SECTIONS)
    with pytest.raises(ConfigError, match="puts patient.*in both train and test.*protocol_level: section"):
        check_folds(folds, SECTIONS, "patient", "leave_one_section_out")
    check_folds(folds, SECTIONS, "section", "leave_one_section_out")  # declared: allowed


def test_random_slide_follows_hyperst():
    folds = random_slide(SECTIONS, seed=42)
    n = len(SECTIONS)
    assert len(folds) == 5
    for f in folds:
        assert len(f.test) == max(round(0.1 * n), 1) == len(f.val)
        assert len(f.train) == n - 2 * len(f.test)
        assert not set(f.test) & set(f.train + f.val)


def test_check_folds_refuses_a_section_in_two_roles():
    bad = leave_one_patient_out(SECTIONS, 0)[0]
    leaked = replace(bad, train=bad.train + bad.test[:1])
    with pytest.raises(ConfigError, match="both training and testing"):
        check_folds([leaked], SECTIONS, "section", "x")


def test_check_folds_refuses_a_section_in_train_and_val():
    fold = leave_one_patient_out(SECTIONS, 0)[0]
    assert fold.val and not set(fold.val) & set(fold.train)
    check_folds([fold], SECTIONS, "section", "x")  # the fold itself is fine
    leaked = replace(fold, train=fold.train + fold.val[:1])
    with pytest.raises(ConfigError, match=fold.val[0]):
        check_folds([leaked], SECTIONS, "section", "x")
    with pytest.raises(ConfigError):  # at patient level too
        check_folds([leaked], SECTIONS, "patient", "x")


def test_run_writes_split_file_and_refuses_leaking_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--methods", "mean", "--out", str(out), "--quiet"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["split"] == "leave_one_patient_out" and len(split["folds"]) == 4
    for fold in split["folds"]:
        assert not set(fold["test_patients"]) & set(fold["train_patients"] + fold["val_patients"])
    capsys.readouterr()
    code = main(["run", "--methods", "mean", "--out", str(tmp_path / "leak"), "--set", "split=leave_one_section_out"])
    err = capsys.readouterr().err
    assert code == 2 and "in both train and test" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "leak").exists()
    assert main(["run", "--methods", "mean", "--out", str(tmp_path / "declared"), "--quiet",
                 "--set", "split=leave_one_section_out", "--set", "protocol_level=section"]) == 0
