"""The core's checks of every section a dataset plugin returns (stbench/data/checks.py)."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from stbench.cli import main
from stbench.data.checks import check_section
from stbench.data.model import Section
from stbench.errors import DataError


def _section(grid, n_genes=3):
    grid = np.asarray(grid)
    n = len(grid)
    return Section(name="S1", patient="P1", spot_ids=np.array([f"s{i}" for i in range(n)]),
                   genes=np.array([f"g{j}" for j in range(n_genes)]),
                   counts=sp.csr_matrix(np.ones((n, n_genes), dtype=np.int64)), grid=grid,
                   pixel=grid * 10.0, mpp=1.0)


def test_a_clean_section_passes():
    s = _section([[0, 0], [1, 0], [0, 1]])
    assert check_section(s) is s


def test_two_spots_in_one_grid_cell_are_refused_with_the_cell_and_section():
    with pytest.raises(DataError, match=r"dataset toy, section S1: 1 grid cell\(s\) hold more than one spot: \(1, 0\)"):
        check_section(_section([[0, 0], [1, 0], [1, 0]]), "toy")


def test_misaligned_arrays_are_refused():
    s = _section([[0, 0], [1, 0]])
    with pytest.raises(DataError, match="pixel has shape"):
        check_section(dataclasses.replace(s, pixel=np.zeros((3, 2))))
    with pytest.raises(DataError, match="counts have shape"):
        check_section(dataclasses.replace(s, counts=sp.csr_matrix(np.ones((2, 4)))))


def test_a_section_without_counts_is_checked_on_geometry_only():
    s = dataclasses.replace(_section([[0, 0], [1, 0]]), counts=None)
    assert check_section(s) is s


def test_a_run_refuses_a_duplicated_grid_cell_in_one_line(tmp_path, monkeypatch, capsys):
    from stbench_plugins.synthetic import generate

    original = generate.SyntheticDataset.load_section

    def load_with_duplicate(self, name):
        s = original(self, name)
        grid = np.array(s.grid, copy=True)
        grid[1] = grid[0]
        return dataclasses.replace(s, grid=grid)

    monkeypatch.setattr(generate.SyntheticDataset, "load_section", load_with_duplicate)
    code = main(["run", "--methods", "mean", "--dataset", "synthetic", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "grid cell(s) hold more than one spot" in err and "section" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_data_check_lists_a_section_without_counts(tmp_path, monkeypatch, capsys):
    from stbench_plugins.synthetic import generate

    original = generate.SyntheticDataset.load_section

    def without_counts(self, name):
        s = original(self, name)
        return dataclasses.replace(s, counts=None) if name == "P1S1" else s

    monkeypatch.setattr(generate.SyntheticDataset, "load_section", without_counts)
    assert main(["data", "check", "synthetic", "--out", str(tmp_path / "qc")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("P1S1"))
    assert "no counts" in line
