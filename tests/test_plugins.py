"""Plugins: built-ins, third-party entry points (faked distributions), failures, clashes, names."""

import importlib.metadata
import inspect
import subprocess
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from stbench import hookimpl, hookspecs
from stbench import plugins as plugin_loader
from stbench.cli import main
from stbench.errors import ConfigError, PluginError
from stbench.method import Method
from stbench.plugins import load_plugins
from stbench.specs import MethodSpec


@dataclass
class ZeroConfig:
    value: float = 0.0


class ZeroMethod(Method):
    def __init__(self, config):
        self.config = config

    def fit(self, train, val, context):
        pass

    def predict(self, slide):
        rng = np.random.default_rng(0)
        return rng.normal(self.config.value, 1.0, size=(slide.n_spots, slide.n_genes))


def _plugin_module(name, method_name):
    module = types.ModuleType(name)

    @hookimpl
    def stbench_register_methods(register):
        register(MethodSpec(name=method_name, factory=ZeroMethod, config=ZeroConfig, description="third-party test method"))

    module.stbench_register_methods = stbench_register_methods
    return module


class FakeDist:
    def __init__(self, name, version="1.2.3"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for an installed distribution's ``[project.entry-points.stbench]`` entry."""

    def __init__(self, name, loader, dist):
        self.name, self.value, self.dist, self._loader = name, f"{dist.name}.plugin", dist, loader

    def load(self):
        return self._loader()


def _fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(plugin_loader, "_entry_points", lambda: list(eps))
    monkeypatch.delenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def test_builtins_register_everything_with_provenance():
    p = load_plugins(entry_points=False)
    assert {"mean", "prompt_knn"} <= set(p.methods.names())
    assert {"her2", "synthetic"} <= set(p.datasets.names())
    assert set(p.prompts.names()) == {"random", "poisson_disc", "sparse_square", "dense_square"}
    assert {"leave_one_patient_out", "patient_kfold", "leave_one_section_out", "random_slide"} <= set(p.splits.names())
    entry = p.methods.entry("prompt_knn")
    assert entry.plugin == "prompt_knn" and entry.package.startswith("stbench ")


def test_third_party_method_from_entry_point(monkeypatch):
    ep = FakeEntryPoint("zero", lambda: _plugin_module("stbench_zero.plugin", "zero"), FakeDist("stbench-zero"))
    _fake_entry_points(monkeypatch, ep)
    p = load_plugins()
    entry = p.methods.entry("zero")
    assert entry.plugin == "zero" and entry.package == "stbench-zero 1.2.3"


def test_third_party_method_runs(monkeypatch, tmp_path, capsys):
    ep = FakeEntryPoint("zero", lambda: _plugin_module("stbench_zero.plugin", "zero"), FakeDist("stbench-zero"))
    _fake_entry_points(monkeypatch, ep)
    assert main(["run", "--methods", "zero", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "| zero" in capsys.readouterr().out


def test_broken_plugin_warns_and_breaks_only_runs_that_need_it(monkeypatch, tmp_path, capsys):
    def broken():
        raise ImportError("No module named 'torch_scatter'")

    _fake_entry_points(monkeypatch, FakeEntryPoint("broken", broken, FakeDist("stbench-broken", "0.1")))
    with pytest.warns(UserWarning, match="plugin 'broken'.*failed to load.*torch_scatter"):
        p = load_plugins()
    assert not p.infos["broken"].ok
    # a run of built-in methods still works
    with pytest.warns(UserWarning):
        assert main(["run", "--methods", "mean", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    # asking for something the broken plugin may provide names it
    with pytest.raises(ConfigError, match="broken.*torch_scatter"):
        p.methods.get("scatter_method")
    plugin_loader.reset_plugins()
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "FAILED" in out and "torch_scatter" in out


def test_two_plugins_registering_one_name_break_only_that_name(monkeypatch):
    _fake_entry_points(
        monkeypatch,
        FakeEntryPoint("first", lambda: _plugin_module("first", "dup"), FakeDist("pkg-one")),
        FakeEntryPoint("second", lambda: _plugin_module("second", "dup"), FakeDist("pkg-two")),
    )
    p = load_plugins()  # loading does not fail: every other name stays usable
    assert "mean" in p.methods and "dup" not in p.methods
    assert [e.plugin for e in p.methods.conflicts["dup"]] == ["first", "second"]
    with pytest.raises(PluginError, match=r"method 'dup' is registered by plugin 'first' \(pkg-one 1.2.3\) and plugin 'second' \(pkg-two 1.2.3\)"):
        p.methods.get("dup")


def test_third_party_cannot_shadow_a_builtin(monkeypatch):
    _fake_entry_points(monkeypatch, FakeEntryPoint("evil", lambda: _plugin_module("evil", "mean"), FakeDist("pkg-evil")))
    p = load_plugins()
    with pytest.raises(PluginError, match="'mean' is registered by plugin 'mean' .*stbench.*'evil' .*pkg-evil"):
        p.methods.get("mean")


def test_lazy_factory_that_fails_to_import_names_plugin_and_package(monkeypatch):
    import types

    from stbench import hookimpl
    from stbench.specs import MethodSpec

    mod = types.ModuleType("broken_plugin")

    @hookimpl
    def stbench_register_methods(register):
        register(MethodSpec("broken", "stbench_no_such_module_xyz.model:M", config=object))

    mod.stbench_register_methods = stbench_register_methods
    _fake_entry_points(monkeypatch, FakeEntryPoint("brk", lambda: mod, FakeDist("pkg-brk")))
    p = load_plugins()
    with pytest.raises(PluginError, match=r"method 'broken' from plugin 'brk' \(pkg-brk 1.2.3\) failed to import.*stbench_no_such_module_xyz"):
        p.methods.load("broken")


def test_blocked_plugin_is_skipped(monkeypatch):
    _fake_entry_points(monkeypatch, FakeEntryPoint("zero", lambda: _plugin_module("z", "zero"), FakeDist("pkg")))
    monkeypatch.setenv("STBENCH_BLOCK_PLUGINS", "zero,prompt_knn")
    p = load_plugins()
    assert "zero" not in p.methods and "prompt_knn" not in p.methods and "mean" in p.methods


def test_unknown_name_suggests():
    p = load_plugins(entry_points=False)
    with pytest.raises(ConfigError, match="did you mean 'prompt_knn'"):
        p.methods.get("prompt_nn")
    with pytest.raises(ConfigError, match="unknown dataset 'her3'.*did you mean 'her2'"):
        p.datasets.get("her3")


def test_every_hook_is_documented_and_prefixed():
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("stbench_")]
    assert set(hooks) == set(plugin_loader.KINDS)
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc and "register" in doc, name


def test_import_stbench_is_light():
    code = "import sys, stbench, stbench.plugins; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_listing_loads_no_method_model():
    code = ("import sys; from stbench.cli import main; main(['list']); "
            "print('MODELS', [m for m in sys.modules if m.startswith('stbench_plugins') and m.endswith('.model')], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "MODELS [] False" in out


def test_real_entry_point_group_is_read(monkeypatch):
    # the loader asks importlib.metadata for the 'stbench' group (no fake involved)
    seen = {}
    real = importlib.metadata.entry_points

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", spy)
    monkeypatch.delenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    load_plugins()
    assert seen == {"group": "stbench"}
