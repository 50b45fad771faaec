"""Published numbers beside reproduced ones (stbench/published.py, leaderboard --published)."""

import json

import pytest

from stbench import published as pub
from stbench.errors import ConfigError
from stbench.leaderboard import render, summary_rows
from stbench.plugins import load_plugins


def test_the_her2_file_holds_table_1_of_the_phg2st_paper():
    p = pub.for_benchmark("her2")
    assert p.kind == "paper" and "Table 1" in p.source
    rows = {r["method"]: r for r in p.rows}
    assert len(rows) == 7
    # spot checks against ../shared/papers/phg2st-paper.txt, Table 1, HER2+ columns
    assert (rows["PHG2ST"]["pcc:mean"], rows["PHG2ST"]["pcc:std"]) == (0.338, 0.139)
    assert (rows["TRIPLEX"]["mae:mean"], rows["BLEEP"]["ccc:std"]) == (0.543, 0.010)
    assert {"normalisation", "split", "selection", "scored_spots"} <= set(p.protocol)


def _run(root):
    root.mkdir()
    (root / "results.csv").write_text(
        "method,fold,slide,patient,n_spots,n_prompt,n_scored,pcc,pcc_skipped,mae\n"
        "ours,0,s0,p0,10,1,9,0.2,0,1.5\nours,1,s1,p1,10,1,9,0.3,0,1.6\n"
        "other,0,s0,p0,10,1,9,0.1,0,1.7\nother,1,s1,p1,10,1,9,0.2,0,1.8\n")
    (root / "fold_results.csv").write_text("method,fold\nours,0\nours,1\nother,0\nother,1\n")
    (root / "run.json").write_text(json.dumps({"protocol": {"benchmark": "her2", "normalisation": "cpm_log1p",
                                                            "split": "leave_one_patient_out", "prompt": {"ratio": 0.1}},
                                               "methods": {"ours": {}, "other": {}}, "folds": [0, 1]}))
    return root


def test_published_rows_are_labelled_after_ours_and_never_the_best(tmp_path):
    rows, meta = summary_rows([_run(tmp_path / "r")])
    text = render(rows, meta, load_plugins(entry_points=False), "md", significance={"metric": "pcc"},
                  published=pub.for_benchmark("her2"))
    main_table = text.split("\n\n")[1]  # header line, blank line, the table
    table = [line for line in main_table.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table[1:]]
    assert names[:2] == ["ours", "other"] and names[2:] == [f"{m} [published]" for m in
                                                             ["ST-Net", "HisToGene", "Hist2ST", "HGGEP", "BLEEP", "TRIPLEX", "PHG2ST"]]
    assert "0.338 ± 0.139" in table[-1] and "| -" in table[-1]  # no folds/slides: not ours
    assert "best = ours" in text  # PHG2ST's published 0.338 is not compared as a row of this run
    assert "never averaged with the rows above" in text
    assert "- normalisation: paper: CPM" in text and "→ here: cpm_log1p" in text
    csv_text = render(rows, meta, load_plugins(entry_points=False), "csv", published=pub.for_benchmark("her2"))
    assert csv_text.count(",True") == 7 and "PHG2ST [published]" in csv_text


def test_a_malformed_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "published.yaml"
    bad.write_text("source: x\nkind: blog\nprotocol: {}\nmetrics: {PCC: pcc}\nrows: []\n")
    with pytest.raises(ConfigError, match="kind 'blog' is not one of paper, third-party summary"):
        pub.load(bad)
    bad.write_text("source: x\nkind: paper\nprotocol: {}\nmetrics: {PCC: pcc}\nrows: [{method: A, R2: 0.1}]\n")
    with pytest.raises(ConfigError, match=r"rows\[0\]: column\(s\) R2 are not in 'metrics'"):
        pub.load(bad)
    bad.write_text("source: x\nkind: paper\nprotocol: {}\nmetrics: {PCC: pcc}\nrows: [{method: A, PCC: [0.1, 0.2, 0.3]}]\n")
    with pytest.raises(ConfigError, match="expected a number or"):
        pub.load(bad)


def test_the_leaderboard_command_adds_published_rows_and_post_hoc_columns_they_report(tmp_path, capsys):
    from stbench.cli import main

    run = _run(tmp_path / "r")
    assert main(["leaderboard", str(run), "--published", "--all-columns"]) == 0
    out = capsys.readouterr().out
    assert "PHG2ST [published]" in out and "Protocol differences" in out
    # a benchmark whose published numbers include a column the defaults leave out gets that column
    text = (run / "run.json").read_text().replace('"benchmark": "her2"', '"benchmark": "hest_lung"')
    (run / "run.json").write_text(text)
    assert main(["leaderboard", str(run), "--published", "--output", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "PCC@200 (post hoc)" in table and "HyperST [published, via a third-party summary]" in table
    assert "0.459" in table
    (run / "run.json").write_text(text.replace('"benchmark": "hest_lung"', '"benchmark": "synthetic"'))
    assert main(["leaderboard", str(run), "--published"]) == 2
    assert "ships no published.yaml" in capsys.readouterr().err
