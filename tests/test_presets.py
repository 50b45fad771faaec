"""The CPU presets: every method section builds, and the synthetic one plans the whole zoo."""

import copy

import pytest

from conftest import REPO
from stbench import config as cfg
from stbench.benchmark import resolve_config
from stbench.plugins import load_plugins
from stbench.run import resolve_plan

PRESETS = {"her2": REPO / "benchmarks/stbench_benchmarks/her2/cpu.yaml",
           "synthetic": REPO / "benchmarks/stbench_benchmarks/synthetic/cpu.yaml"}
ZOO = ["triplex", "phg2st", "hyperst", "stnet", "bleep", "ridge", "prompt_knn", "mean"]


@pytest.mark.parametrize("benchmark", sorted(PRESETS))
def test_every_method_of_a_preset_builds(benchmark):
    conf, _ = resolve_config(benchmark, str(PRESETS[benchmark]))
    plugins = load_plugins(entry_points=False)
    assert conf.preset and conf.preset.startswith("cpu")
    assert {"phg2st", "hyperst", "triplex", "stnet", "bleep"} <= set(conf.methods)
    for name, settings in conf.methods.items():
        spec = plugins.methods.get(name)
        method_config = cfg.build(spec.config, settings, f"methods.{name}")
        plugins.methods.load(name)(copy.deepcopy(method_config))  # no weights needed: random backbones


def test_the_synthetic_preset_plans_the_whole_zoo(tmp_path):
    conf, base = resolve_config("synthetic", str(PRESETS["synthetic"]))
    plan = resolve_plan(conf, ZOO, tmp_path / "run", load_plugins(entry_points=False), base)
    assert list(plan.methods) == ZOO and plan.encoder is not None and plan.patch_requests
