"""Executors (issue 13): a run's units computed in this process, in --jobs processes or as Ray tasks give
the same results; a failing unit is reported while the others finish and a rerun runs only it; an
interrupted Ray run resumes; each unit runs its method's declared CPUs as torch threads."""

import json
import os
import sys
import textwrap
from types import SimpleNamespace

import anndata
import numpy as np
import pandas as pd
import pytest

from stbench import plugins as plugin_loader
from stbench.cli import main
from stbench.executors import RayExecutor, make_executor
from stbench.results import RunDir

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install "stbench[ray]"')

#: a small synthetic dataset: 3 patients x 2 sections of 40 spots, so 3 folds
SMALL = ["--set", "dataset_options.spots_per_section=40", "--set", "dataset_options.n_patients=3"]
#: the baselines and one tiny torch method (its contract-test settings)
METHODS = "ridge,prompt_knn,mean,bleep"

#: a third-party plugin that workers import by module: ``flaky`` (the mean baseline, failing on fold 1
#: while a file exists) and ``threads`` (records its torch thread count; declares 3 CPUs)
PLUGIN = '''
from dataclasses import dataclass
from pathlib import Path

from stbench import hookimpl
from stbench.method import Method
from stbench.specs import MethodSpec, Resources


@dataclass
class FlakyConfig:
    fail_while: str = ""  # while this file exists, fold 1 raises


class Flaky(Method):
    def __init__(self, config):
        from stbench_plugins.mean import MeanConfig
        from stbench_plugins.mean.model import MeanBaseline

        self.config, self.inner = config, MeanBaseline(MeanConfig())

    def fit(self, train, val, context):
        if context.fold == 1 and self.config.fail_while and Path(self.config.fail_while).exists():
            raise RuntimeError("flaky fails on fold 1")
        self.inner.fit(train, val, context)

    def predict(self, slide):
        return self.inner.predict(slide)


@dataclass
class ThreadsConfig:
    pass


class Threads(Flaky):
    def __init__(self, config):
        import torch  # noqa: F401  (a torch method imports torch when built)

        super().__init__(FlakyConfig())

    def fit(self, train, val, context):
        import warnings

        import torch

        self.threads = torch.get_num_threads()
        warnings.warn("threads: a warning of every unit")
        super().fit(train, val, context)

    def summary(self):
        return {"torch_threads": self.threads}


@hookimpl
def stbench_register_methods(register):
    register(MethodSpec("flaky", Flaky, FlakyConfig, constant_predictor=True))
    register(MethodSpec("threads", Threads, ThreadsConfig, constant_predictor=True, resources=Resources(cpus=3)))
'''


def _torch_method_settings() -> list:
    spec = plugin_loader.load_plugins(entry_points=False).methods.get("bleep")
    return [a for k, v in spec.test_settings.items() for a in ("--set", f"methods.bleep.{k}={v}")]


def _run(out, *extra, methods=METHODS) -> int:
    return main(["run", "--methods", methods, "--out", str(out), "--quiet", *SMALL, *extra])


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The test plugin's folder on the import path of this process, of spawned processes and (through
    PYTHONPATH, which a Ray instance started here passes on) of Ray workers."""
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "stbench_test_executors.py").write_text(textwrap.dedent(PLUGIN))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        yield folder


@pytest.fixture(scope="module")
def ray_cluster(plugin_dir):
    """One local Ray instance for the module (about 5 s to start here)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def with_test_plugin(plugin_dir, monkeypatch):
    """The driver's plugins: the built-ins and the test plugin (workers load the same by module)."""
    loaded = plugin_loader.load_plugins(builtins=(*plugin_loader.BUILTIN_PLUGINS, "stbench_test_executors"),
                                        entry_points=False)
    monkeypatch.setattr(plugin_loader, "_LOADED", loaded)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same command with the default executor (one unit after another, here)."""
    os.environ["STBENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugin_loader.reset_plugins()
    out = tmp_path_factory.mktemp("runs") / "local"
    assert _run(out, *_torch_method_settings()) == 0
    return out


def _same_run(out, reference) -> None:
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()
    for name in ("bleep/P2S1.h5ad", "ridge/P3S2.h5ad"):
        a, b = (anndata.read_h5ad(run / "predictions" / name) for run in (out, reference))
        np.testing.assert_array_equal(a.X, b.X)
        assert (a.obs["is_prompt"] == b.obs["is_prompt"]).all()


def test_a_ray_run_equals_the_local_run(ray_cluster, local_run, tmp_path):
    out = tmp_path / "ray"
    assert _run(out, "--executor", "ray", *_torch_method_settings()) == 0
    _same_run(out, local_run)
    units = json.loads((out / "versions.json").read_text())["units"]
    assert len(units) == 12 and "bleep/fold2" in units


def test_jobs_run_units_in_processes_and_equal_the_local_run(local_run, tmp_path):
    out = tmp_path / "jobs"
    assert _run(out, "--jobs", "2", *_torch_method_settings()) == 0
    _same_run(out, local_run)


def test_a_failing_unit_is_reported_while_the_others_finish_and_a_rerun_runs_only_it(
        ray_cluster, with_test_plugin, tmp_path, capsys):
    flag = tmp_path / "fail"
    flag.touch()
    out = tmp_path / "run"
    command = ["--executor", "ray", "--set", f"methods.flaky.fail_while={flag}"]
    assert _run(out, *command, methods="mean,flaky") == 1
    err = capsys.readouterr().err
    assert "1 of 6 units failed" in err and "flaky/fold1: RuntimeError: flaky fails on fold 1" in err
    traceback = (out / "errors" / "flaky" / "fold1.txt").read_text()
    assert "Traceback" in traceback and "raise RuntimeError" in traceback
    run = RunDir(out)
    assert [run.is_done(m, k) for m in ("mean", "flaky") for k in range(3)] == [True] * 4 + [False, True]
    assert not (out / "results.csv").exists()  # merged only when every unit is done

    flag.unlink()
    assert _run(out, *command, methods="mean,flaky") == 0
    assert "5 method x fold units were already complete" in capsys.readouterr().err
    assert json.loads((out / "versions.json").read_text())["units"] == ["flaky/fold1"]
    assert not (out / "errors" / "flaky" / "fold1.txt").exists()
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 12 and not res.duplicated(["method", "slide"]).any()
    flaky, mean = (res[res["method"] == m].set_index("slide")["mae"] for m in ("flaky", "mean"))
    pd.testing.assert_series_equal(flaky, mean, check_names=False)  # the same baseline, all folds


def test_an_interrupted_ray_run_resumes(ray_cluster, local_run, tmp_path, monkeypatch):
    out = tmp_path / "ray"
    write_unit = RunDir.write_unit

    def interrupted_after_the_first_unit(self, *args, **kwargs):
        write_unit(self, *args, **kwargs)
        raise KeyboardInterrupt  # the driver is stopped while the other tasks run

    monkeypatch.setattr(RunDir, "write_unit", interrupted_after_the_first_unit)
    assert _run(out, "--executor", "ray", *_torch_method_settings()) == 130
    assert len(list((out / "parts").glob("*/fold*.fold.csv"))) == 1
    monkeypatch.setattr(RunDir, "write_unit", write_unit)
    assert _run(out, "--executor", "ray", *_torch_method_settings()) == 0
    assert len(json.loads((out / "versions.json").read_text())["units"]) == 11
    _same_run(out, local_run)


def test_an_interrupted_jobs_run_stops_its_processes_and_resumes(tmp_path, monkeypatch):
    import multiprocessing

    out = tmp_path / "jobs"
    write_unit = RunDir.write_unit

    def interrupted_after_the_first_unit(self, *args, **kwargs):
        write_unit(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write_unit", interrupted_after_the_first_unit)
    assert _run(out, "--jobs", "2", methods="ridge,mean") == 130
    assert len(list((out / "parts").glob("*/fold*.fold.csv"))) == 1
    assert not multiprocessing.active_children()  # the workers were stopped, not left computing
    monkeypatch.setattr(RunDir, "write_unit", write_unit)
    assert _run(out, "--jobs", "2", methods="ridge,mean") == 0
    assert len(json.loads((out / "versions.json").read_text())["units"]) == 5
    assert len(pd.read_csv(out / "results.csv")) == 12


def test_models_fitted_in_worker_processes_are_saved_by_the_driver(tmp_path):
    """--save-models --fit-all: a worker returns the fitted state, the driver saves it as a local run does."""
    saved = {}
    for name, extra in (("local", []), ("jobs", ["--jobs", "2"])):
        out = tmp_path / name
        assert _run(out, "--save-models", "--fit-all", *extra, methods="ridge,mean") == 0
        records = sorted((out / "models").glob("*/*/model.json"))
        saved[name] = {str(r.relative_to(out)): json.loads(r.read_text())["weights"]["sha256"] for r in records}
    assert len(saved["local"]) == 8 and "models/ridge/all/model.json" in saved["local"]  # 3 folds + all, 2 methods
    assert saved["jobs"] == saved["local"]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_unit_runs_its_declared_cpus_as_torch_threads(executor, ray_cluster, with_test_plugin, tmp_path,
                                                        one_torch_thread):
    import torch

    before = torch.get_num_threads()  # 1: the unit's 3 threads are set for it, and only for it
    out = tmp_path / executor
    with pytest.warns(UserWarning) as shown:
        assert _run(out, "--executor", executor, methods="threads") == 0
    summaries = pd.read_csv(out / "fold_results.csv")["fit_summary"].map(json.loads)
    assert [s["torch_threads"] for s in summaries] == [3, 3, 3]
    # a warning a unit shows reaches the driver, wherever the unit ran, once per run (as Python shows one)
    assert [str(w.message) for w in shown if "every unit" in str(w.message)] == ["threads: a warning of every unit"]
    if executor == "ray":  # the Ray instance has 2 CPUs: the task asks for 2, and Ray alone would run 2 threads
        assert any("declares 3 CPUs and the largest Ray node has 2: its units ask Ray for 2" in str(w.message) for w in shown)
    assert torch.get_num_threads() == before  # the driver's own setting is back after each unit


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["run", "--methods", "mean", "--executor", "ray", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "stbench[ray]"' in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, fragment", [
    (["--executor", "ray", "--jobs", "2"], "--jobs is an option of --executor local"),
    (["--ray-address", "auto"], "--ray-address is an option of --executor ray"),
    (["--jobs", "0"], "--jobs must be a whole number of at least 1"),
])
def test_executor_options_that_do_not_fit_are_one_line(flags, fragment, tmp_path, capsys):
    assert main(["run", "--methods", "mean", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def _session(cpus: int, gpu: bool, device):
    """A session whose plan holds one method ``m`` declaring ``cpus`` and ``gpu``."""
    from stbench.run import UnitSession
    from stbench.specs import MethodSpec, Resources

    spec = MethodSpec("m", "x:y", object, resources=Resources(cpus=cpus, gpu=gpu))
    plan = SimpleNamespace(config=SimpleNamespace(device=device), plugins=SimpleNamespace(methods=SimpleNamespace(get=lambda name: spec)))
    return UnitSession(plan, None, {}, None)


@pytest.mark.parametrize("cpus, gpu, device, cluster_gpus, expected", [
    (1, False, None, 1, (1, 0)),
    (4, True, None, 1, (2, 1)),  # at most the largest node's CPUs; a GPU when the cluster has one
    (1, True, None, 0, (1, 0)),  # no GPU in the cluster: it runs on a CPU, as it would locally
    (1, True, "cpu", 1, (1, 0)),  # --device cpu wins
    (1, False, "cuda", 1, (1, 1)),  # --device cuda: every unit gets a GPU
])
def test_a_unit_asks_ray_for_its_methods_declared_resources(cpus, gpu, device, cluster_gpus, expected):
    from stbench.run import Unit

    options = RayExecutor().task_options(_session(cpus, gpu, device), Unit("m", 0), {"CPU": 2, "GPU": cluster_gpus}, 2)
    assert (options["num_cpus"], options["num_gpus"]) == expected and options["name"] == "m/fold0"


def test_a_ray_run_refuses_cuda_without_gpus():
    from stbench.errors import ConfigError
    from stbench.run import Unit

    with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        RayExecutor().task_options(_session(1, False, "cuda"), Unit("m", 0), {"CPU": 2}, 2)


def test_the_default_executor_is_local_and_one_unit_at_a_time():
    executor = make_executor()
    assert executor.jobs == 1 and executor.describe() == "in this process"
