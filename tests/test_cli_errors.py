"""Every user mistake named in the core issue: one line naming the file or option and the fix,
exit status 2, no traceback, and no partial results."""

import gzip
import subprocess
import sys

import pytest

from conftest import write_her2_layout
from stbench.cli import main


def _fails(capsys, argv, *fragments, out=None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("stbench: error: "), err
    assert len(lines[0]) < 600, "an error message is one readable line"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if out is not None:
        assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    return lines[0]


@pytest.fixture
def layout(tmp_path):
    return write_her2_layout(tmp_path / "her2st")


def _run_her2(layout, out, *extra):
    return ["run", "--methods", "mean,prompt_knn", "--dataset", "her2", "--data-dir", str(layout),
            "--out", str(out), "--quiet", "--set", "panel.file=null", "--set", "panel.hvg=3", *extra]


def test_fake_layout_runs(layout, tmp_path):
    assert main(_run_her2(layout, tmp_path / "ok")) == 0
    assert (tmp_path / "ok" / "results.csv").exists()


def test_data_directory_missing(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, ["run", "--methods", "mean", "--dataset", "her2", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)],
           str(tmp_path / "nowhere"), "--data-dir", out=out)


def test_truncated_count_file(layout, tmp_path, capsys):
    path = layout / "ST-cnts" / "B1.tsv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out), "B1.tsv.gz", out=out)


def test_count_file_not_tab_separated(layout, tmp_path, capsys):
    path = layout / "ST-cnts" / "A2.tsv.gz"
    with gzip.open(path, "rt") as fh:
        text = fh.read().replace("\t", ",")
    with gzip.open(path, "wt") as fh:
        fh.write(text)
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out), "A2.tsv.gz", out=out)


def test_spot_file_without_expected_columns(layout, tmp_path, capsys):
    path = layout / "ST-spotfiles" / "C1_selection.tsv"
    path.write_text(path.read_text().replace("pixel_x", "px"))
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out), "C1_selection.tsv", "pixel_x", out=out)


def test_spot_ids_that_do_not_join(layout, tmp_path, capsys):
    path = layout / "ST-spotfiles" / "A1_selection.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + [ln.replace("5\t", "50\t", 1) for ln in lines[1:4]] + lines[4:]) + "\n")
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out), "A1", "join", out=out)


@pytest.mark.parametrize("bad", ["nan", "-3"])
def test_nan_or_negative_counts(layout, tmp_path, capsys, bad):
    path = layout / "ST-cnts" / "C1.tsv.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    cells = lines[3].split("\t")
    cells[2] = bad
    lines[3] = "\t".join(cells)
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out), "C1.tsv.gz", out=out)


def test_gene_panel_with_absent_genes(layout, tmp_path, capsys):
    panel = tmp_path / "panel.txt"
    panel.write_text("G1\nG2\nERBB2\n")
    out = tmp_path / "out"
    _fails(capsys, _run_her2(layout, out, "--set", "panel.hvg=null", "--set", f"panel.file={panel}"),
           "panel.txt", "ERBB2", out=out)


def test_unknown_method(tmp_path, capsys):
    _fails(capsys, ["run", "--methods", "prompt_kn", "--out", str(tmp_path / "o")], "prompt_kn", "did you mean 'prompt_knn'")


def test_unknown_dataset(tmp_path, capsys):
    _fails(capsys, ["run", "--methods", "mean", "--dataset", "syntetic", "--out", str(tmp_path / "o")],
           "unknown dataset 'syntetic'", "did you mean 'synthetic'")


def test_unknown_config_key(tmp_path, capsys):
    _fails(capsys, ["run", "--methods", "mean", "--set", "prompt.ration=0.2", "--out", str(tmp_path / "o")],
           "prompt.ration", "did you mean 'ratio'")


def test_bad_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt:\n  ratio: [0.1\n")
    _fails(capsys, ["run", "--methods", "mean", "--config", str(bad), "--out", str(tmp_path / "o")], "bad.yaml", "line")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_prompt_ratio_outside_unit_interval(tmp_path, capsys, ratio):
    out = tmp_path / "o"
    _fails(capsys, ["run", "--methods", "mean", "--prompt-ratio", ratio, "--out", str(out)],
           "prompt ratio must be in (0, 1)", "--prompt-ratio", out=out)
    assert not out.exists()


def test_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stbench.cli", "run", "--methods", "nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("stbench: error: unknown method 'nope'")
    assert "Traceback" not in proc.stderr


def test_bad_method_setting_or_normalisation_stops_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["run", "--methods", "ridge", "--set", "methods.ridge.select_by=r2", "--out", str(out)], "methods.ridge.select_by")
    assert not out.exists()
    _fails(capsys, ["run", "--methods", "mean", "--set", "normalisation=cpm_log1", "--out", str(out)], "normalisation")
    assert not out.exists()


def test_resume_over_other_sections_is_refused(layout, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_run_her2(layout, out)) == 0
    write_her2_layout(layout, sections=("D1",), seed=3)  # the data folder gained a patient
    capsys.readouterr()
    _fails(capsys, _run_her2(layout, out), "other sections")
