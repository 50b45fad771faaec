"""The README's plugin skeleton installs as written and its method runs (issue 7)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _skeleton():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Adding a method as a plugin"):]
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    plugin = next(b for b in blocks if "stbench_register_methods" in b)
    model = next(b for b in blocks if b.startswith("# stbench_mymethod/model.py"))
    return toml, plugin, model


def test_the_readme_plugin_skeleton_installs_and_runs(tmp_path):
    toml, plugin, model = _skeleton()
    src = tmp_path / "src"
    pkg = src / "stbench_mymethod"
    pkg.mkdir(parents=True)
    (src / "pyproject.toml").write_text(toml)
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(plugin)
    (pkg / "model.py").write_text(model)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(src)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k != "STBENCH_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    listed = subprocess.run([sys.executable, "-m", "stbench.cli", "plugins"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "stbench-mymethod 0.1.0" in listed.stdout, listed.stdout + listed.stderr
    out = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "stbench.cli", "run", "--methods", "mymethod", "--out", str(out),
                          "--quiet"], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (out / "results.csv").read_text().count("mymethod") == 8  # the synthetic dataset's 8 test slides


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
