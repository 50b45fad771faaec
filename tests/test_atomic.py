"""Atomic, durable writes (stbench.atomic) under simulated crashes, and a run that resumes after one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest

from stbench import atomic
from stbench.cli import main


def _litter(directory):
    return sorted(p.name for p in directory.rglob(f"{atomic.TMP_PREFIX}*"))


def test_an_exception_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(atomic.TMP_PREFIX)
            tmp.write_text("new, half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert _litter(tmp_path) == []
    atomic.write_text(target, "new\n")  # and a write that succeeds replaces it
    assert target.read_text() == "new\n" and _litter(tmp_path) == []


def test_a_failing_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old\n")

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic.write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert _litter(tmp_path) == []


KILLED_WRITER = """
import os, sys
from stbench import atomic
with atomic.atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of the new content")
    os._exit(9)  # killed mid-write: no exception handler, no finally
"""


def test_a_killed_writer_leaves_the_old_file_and_litter_that_is_removed(tmp_path):
    target = tmp_path / "sub" / "fold0.fold.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert target.read_text() == "old\n"
    litter = _litter(tmp_path)
    assert len(litter) == 1 and litter[0].startswith(f"{atomic.TMP_PREFIX}fold0.fold.csv.")
    (tmp_path / f"{atomic.TMP_PREFIX}by-hand").write_text("x")
    keep = tmp_path / "tmp-not-ours.txt"  # only the prefix marks litter
    keep.write_text("keep")
    assert atomic.remove_leftovers(tmp_path) == 2
    assert _litter(tmp_path) == [] and target.read_text() == "old\n" and keep.exists()


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_new_files_get_the_permissions_of_an_ordinary_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        target = tmp_path / "new.txt"
        atomic.write_text(target, "x")
        ordinary = tmp_path / "ordinary.txt"
        with open(ordinary, "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode == 0o666 & ~mask == stat.S_IMODE(ordinary.stat().st_mode), oct(mode)


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []  # (kind, inode) of every fsync, in order
    real = os.fsync

    def counting(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    target = tmp_path / "a.txt"
    atomic.write_text(target, "x")
    # the data (the renamed file keeps its inode) before the rename, then the directory that holds it
    assert ("file", target.stat().st_ino) in synced, synced
    assert ("dir", tmp_path.stat().st_ino) in synced, synced
    assert synced.index(("file", target.stat().st_ino)) < synced.index(("dir", tmp_path.stat().st_ino))


# --- a run resumed after a crash --------------------------------------------------------------------

RUN = ["run", "--methods", "mean", "--quiet", "--set", "dataset_options.spots_per_section=40",
       "--set", "dataset_options.n_patients=3"]


def test_a_part_truncated_by_a_crash_is_recomputed_and_litter_removed(tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    before = pd.read_csv(out / "results.csv")
    folds = sorted(before["fold"].unique())
    assert len(folds) == 3

    (out / "parts" / "mean" / "fold0.fold.csv").write_bytes(b"")  # what an OS crash can leave
    (out / f"{atomic.TMP_PREFIX}xyz").write_text("left by a killed run")
    (out / "parts" / "mean" / f"{atomic.TMP_PREFIX}fold1.slides.csv.abc").write_text("half")
    assert main([*RUN, "--out", str(out)]) == 0

    after = pd.read_csv(out / "results.csv")
    assert not after.duplicated(["method", "fold", "slide"]).any()
    pd.testing.assert_frame_equal(after, before)
    assert pd.read_csv(out / "parts" / "mean" / "fold0.fold.csv").shape[0] == 1
    # only fold 0 was run again
    invocations = json.loads((out / "versions.json").read_text())["invocations"]
    assert invocations[-1]["units"] == ["mean/fold0"]
    assert _litter(out) == []
