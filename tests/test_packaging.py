"""Built wheels carry the core, every built-in plugin and every benchmark definition."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def test_wheel_contains_every_plugin_and_benchmark(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for name in ("stbench", "plugins", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("stbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO / "plugins").as_posix() for p in (REPO / "plugins").rglob("*.py")}
    expected |= {p.relative_to(REPO / "benchmarks").as_posix() for p in (REPO / "benchmarks" / "stbench_benchmarks").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "stbench").rglob("*.py")}
    assert expected - names == set()
    assert any(n.endswith("entry_points.txt") and "stbench.cli:main" in zipfile.ZipFile(wheel).read(n).decode() for n in names)
