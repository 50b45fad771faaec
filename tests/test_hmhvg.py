"""HyperST's high-mean high-variance gene panel (METHODS.md §1.4) and its place in a run."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stbench.cli import main
from stbench.data.expression import high_mean_high_variance_genes
from stbench.data.model import Section

# per gene: raw counts alternating between two values over the spots
# mean: E 20, A 10, B 10, C 5, D 5, F 2 (ties by name); std: E 20, B 10, C 5, F 1, A 0, D 0
PAIRS = {"A": (10, 10), "B": (0, 20), "C": (0, 10), "D": (5, 5), "E": (0, 40), "F": (1, 3),
         "MT-CO1": (0, 100), "RPL3": (0, 90)}  # excluded by name, however variable


def _section(name="S1", n=40):
    genes = list(PAIRS)
    counts = np.array([[PAIRS[g][i % 2] for g in genes] for i in range(n)])
    return Section(name, "P", np.array([str(i) for i in range(n)]), np.array(genes), sp.csr_matrix(counts),
                   np.zeros((n, 2), int), np.zeros((n, 2)), None)


@pytest.mark.parametrize("n_top,expected", [
    (2, ["B", "E"]),             # top-3 by mean ∩ top-3 by std first holds 2 genes
    (3, ["B", "C", "E"]),
    (4, ["A", "B", "C", "E"]),
    (5, ["A", "B", "C", "E", "F"]),  # n = 6 gives all 6: keep the 5 smallest rank sums (A and C tie at 5)
])
def test_the_deterministic_rule_by_hand(n_top, expected):
    assert high_mean_high_variance_genes([_section()], n_top, per_section_hvg=10) == expected


def test_mitochondrial_and_ribosomal_genes_are_dropped_and_too_many_asked_is_an_error():
    chosen = high_mean_high_variance_genes([_section(), _section("S2")], 6, per_section_hvg=10)
    assert "MT-CO1" not in chosen and "RPL3" not in chosen and len(chosen) == 6
    from stbench.errors import ConfigError

    with pytest.raises(ConfigError, match="panel.hmhvg asks for 7 genes"):
        high_mean_high_variance_genes([_section()], 7, per_section_hvg=10)


def test_a_run_chooses_the_panel_on_each_folds_training_sections(tmp_path, monkeypatch, capsys):
    import stbench.run as run_module

    seen = []
    real = run_module.high_mean_high_variance_genes

    def spy(sections, n_top, **kw):
        seen.append(sorted(s.name for s in sections))
        return real(sections, n_top, **kw)

    monkeypatch.setattr(run_module, "high_mean_high_variance_genes", spy)
    out = tmp_path / "r"
    assert main(["run", "--methods", "prompt_knn", "--out", str(out), "--quiet", "--set", "panel.hmhvg=20",
                 "--set", "normalisation=log2_raw"]) == 0
    split = pd.read_json(out / "split.json", typ="series")["folds"]
    assert seen == [sorted(f["train"] + f["val"]) for f in split]  # training patients only, per fold
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 8 and res["pcc"].notna().all()
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    assert "panel 20 HMHVGs per fold (training sections)" in capsys.readouterr().out.replace("\n", " ")
