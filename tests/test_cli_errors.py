"""Every user mistake named in the core issue: one line naming the file or option and the fix,
exit status 2, no traceback, and no partial results."""

import gzip
import subprocess
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import write_her2_layout
from stbench import hookimpl
from stbench import plugins as plugin_loader
from stbench.cli import main
from stbench.method import Method
from stbench.specs import MethodSpec


def _one_line_error(code, err):
    """The whole of stderr is one line starting with "stbench: error:" (whatever its words), status 2."""
    assert code == 2, err
    assert err.strip().count("\n") == 0, f"stderr must be exactly one line, got:\n{err}"
    assert err.startswith("stbench: error: "), err
    assert "Traceback" not in err
    return err.strip()


def _fails(capsys, argv, *fragments, out=None):
    existed = out is not None and out.exists()
    code = main(argv)
    captured = capsys.readouterr()
    line = _one_line_error(code, captured.err)
    assert len(line) < 600, "an error message is one readable line"
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if out is not None:
        assert not (out / "results.csv").exists() and not (out / "run.json").exists()
        if not existed:
            assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.rglob('*'))}"
    return line


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
    line = _one_line_error(proc.returncode, proc.stderr)
    assert "unknown method 'nope'" in line
    assert not (tmp_path / "o").exists()


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


# ---------------------------------------------------------------------------------------------------
# more user mistakes: each exits 2 with one line on stderr, and writes nothing under --out


def _jpeg(path, seed, size=256):
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
    return path


@pytest.fixture
def imaged_layout(tmp_path):
    """The tiny her2st layout with an H&E JPEG for every section, B1's truncated to half its bytes."""
    root = write_her2_layout(tmp_path / "her2st")
    images = {name: _jpeg(root / "ST-imgs" / name[:1] / name / "x.jpg", i) for i, name in enumerate(("A1", "A2", "B1", "C1"))}
    data = images["B1"].read_bytes()
    images["B1"].write_bytes(data[: len(data) // 2])
    return root, images["B1"]


def test_truncated_image_stops_the_run_naming_the_file(imaged_layout, tmp_path, capsys):
    root, bad = imaged_layout
    out = tmp_path / "out"
    _fails(capsys, ["run", "--methods", "ridge", "--dataset", "her2", "--data-dir", str(root), "--out", str(out),
                    "--quiet", "--set", "panel.file=null", "--set", "panel.hvg=3"], str(bad), out=out)


def test_truncated_image_in_data_check_names_the_file(imaged_layout, tmp_path, capsys):
    root, bad = imaged_layout
    code = main(["data", "check", "her2", "--data-dir", str(root), "--out", str(tmp_path / "qc")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.strip().splitlines() if not ln.startswith("stbench: data check: ")]  # progress lines
    assert len(errors) == 1 and errors[0].startswith("stbench: error: ") and str(bad) in errors[0], err
    assert not (tmp_path / "qc" / "B1.png").exists()


def test_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "file.txt"
    out.write_text("keep me\n")
    _fails(capsys, ["run", "--methods", "mean", "--out", str(out), "--quiet"], str(out))
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_out_below_a_file(tmp_path, capsys):
    parent = tmp_path / "file.txt"
    parent.write_text("keep me\n")
    out = parent / "sub"
    _fails(capsys, ["run", "--methods", "mean", "--out", str(out), "--quiet"], str(parent))
    assert parent.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_negative_seed(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["run", "--methods", "mean", "--seed", "-1", "--out", str(out), "--quiet"], "-1", out=out)


def test_prompt_ratio_below_one_spot_on_every_slide(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["run", "--methods", "mean", "--prompt-ratio", "1e-6", "--out", str(out), "--quiet"],
           "--prompt-ratio", out=out)


# --- plugins: a fake installed distribution (entry point) per plugin ----------------------------------


@dataclass
class _NoConfig:
    pass


class _Dist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class _EntryPoint:
    def __init__(self, name, module, dist):
        self.name, self.value, self.dist, self._module = name, f"{module.__name__}", dist, module

    def load(self):
        return self._module


def _method_plugin(module_name, method_name, factory):
    module = types.ModuleType(module_name)

    @hookimpl
    def stbench_register_methods(register):
        register(MethodSpec(name=method_name, factory=factory, config=_NoConfig, description=f"from {module_name}"))

    module.stbench_register_methods = stbench_register_methods
    return module


def _install(monkeypatch, *entry_points):
    """As if these distributions were installed: the loader reads them instead of the real entry points."""
    monkeypatch.setattr(plugin_loader, "_entry_points", lambda: list(entry_points))
    monkeypatch.delenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugin_loader.reset_plugins()


class _Zero(Method):
    def __init__(self, config):
        pass

    def fit(self, train, val, context):
        pass

    def predict(self, slide):
        return np.random.default_rng(0).normal(size=(slide.n_spots, slide.n_genes))


def test_method_module_that_fails_to_import(monkeypatch, tmp_path, capsys):
    module = _method_plugin("stbench_ghost.plugin", "ghost", "stbench_missing_module_xyz.model:M")
    _install(monkeypatch, _EntryPoint("ghostplug", module, _Dist("stbench-ghost", "0.3")))
    out = tmp_path / "o"
    _fails(capsys, ["run", "--methods", "ghost", "--out", str(out), "--quiet"],
           "ghostplug", "stbench-ghost 0.3", out=out)
    assert main(["list"]) == 0  # listing does not import the method
    assert "ghost" in capsys.readouterr().out


def test_two_plugins_one_method_name_break_only_that_name(monkeypatch, tmp_path, capsys):
    _install(monkeypatch,
             _EntryPoint("firstplug", _method_plugin("stbench_first.plugin", "twin", _Zero), _Dist("pkg-first", "1.0")),
             _EntryPoint("secondplug", _method_plugin("stbench_second.plugin", "twin", _Zero), _Dist("pkg-second", "2.0")))
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "firstplug" in listing and "secondplug" in listing
    assert main(["list"]) == 0
    assert "twin" in capsys.readouterr().out
    out = tmp_path / "twin"
    _fails(capsys, ["run", "--methods", "twin", "--out", str(out), "--quiet"], "firstplug", "secondplug", out=out)
    assert main(["run", "--methods", "mean", "--out", str(tmp_path / "mean"), "--quiet",
                 "--set", "dataset_options.spots_per_section=60"]) == 0
    assert (tmp_path / "mean" / "results.csv").exists()
