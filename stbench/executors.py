"""Where a run's units compute: one after another in this process (the default), ``--jobs N`` at a time
in processes on this machine, or as Ray tasks on a cluster (``--executor ray``).

The driver (:func:`stbench.run.execute`) does everything but the units, whichever executor runs them:
it resolves the plan, checks the data, chooses the prompts, prepares the feature and patch caches,
writes the provenance, holds the run directory's lock, writes each unit's parts as its result arrives
and merges the tables. A unit (:class:`stbench.run.Unit`, one method on one fold) is computed by
:func:`stbench.run.compute_unit` in every executor; it returns its rows, predictions and (with
``--save-models``) its fitted state, and writes nothing into the run directory.

A worker process (``--jobs``, Ray) receives a small :class:`WorkerJob`, never the data: it loads the
driver's plugins by module, resolves the same plan from the driver's resolved config, and reads the
sections and the prepared caches from the paths the driver used (``--data-dir``, ``$STBENCH_CACHE``),
which on a cluster must be paths every node shares. It keeps them for the job's next unit.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from stbench.errors import ConfigError, DataError
from stbench.paths import CACHE_ENV, cache_dir
from stbench.plugins import Plugins
from stbench.run import SlideStore, Unit, UnitFailure, UnitSession, fold_record, resolve_plan, run_unit

EXECUTORS = ("local", "ray")
RAY_INSTALL = 'pip install "stbench[ray]"'

#: called with each unit's result (stbench.run.UnitResult) or failure (stbench.run.UnitFailure)
Done = Callable[[Unit, Any], None]


def make_executor(name: str = "local", jobs: Optional[int] = None, ray_address: Optional[str] = None):
    """The executor the command line asks for (``--executor``, ``--jobs``, ``--ray-address``)."""
    if name == "local":
        if ray_address is not None:
            raise ConfigError("--ray-address is an option of --executor ray; add --executor ray or leave it out")
        return LocalExecutor(1 if jobs is None else jobs)
    if name == "ray":
        if jobs is not None:
            raise ConfigError("--jobs is an option of --executor local; with --executor ray each unit is a Ray task "
                              "that asks for the CPUs its method declares")
        return RayExecutor(ray_address)
    raise ConfigError(f"unknown executor {name!r} (option --executor); choose one of {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------
# local


class LocalExecutor:
    """Units on this machine: one after another in this process (``jobs=1``, the default), or ``jobs`` at
    a time in worker processes. Workers are spawned (a fresh interpreter each), never forked from a
    driver that holds threads and open files."""

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be a whole number of at least 1, got {jobs!r}")
        self.jobs = jobs

    def describe(self) -> str:
        return "in this process" if self.jobs == 1 else f"{self.jobs} local processes"

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, session: UnitSession, units: list, done: Done, started: Optional[Callable[[Unit], None]] = None):
        if not units:
            return
        if self.jobs == 1:
            for unit in units:
                if started is not None:
                    started(unit)
                done(unit, run_unit(session, unit))
            return
        # only --jobs needs process pools (10 ms of imports an everyday run skips)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        job = WorkerJob.of(session, session.device)
        pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(units)), mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(work, job, unit): unit for unit in units}
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as exc:  # the worker process died (BrokenProcessPool), or its result would not unpickle
                    outcome = UnitFailure.of(futures[future], exc)
                done(futures[future], outcome)
        except BaseException:
            # interrupted (or the driver failed to write): stop the workers now, not after their units
            # the workers' table (no public API lists them); the pool's manager thread shares it and may still
            # start a worker after a first look, so look until none is alive
            workers = getattr(pool, "_processes", None) or {}
            pool.shutdown(wait=False, cancel_futures=True)
            for _ in range(5):
                processes = [p for p in list(workers.values()) if p.is_alive()]
                if not processes:
                    break
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.join(timeout=10)
            raise
        pool.shutdown()


# ------------------------------------------------------------------------------------------------
# Ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    return ray


class RayExecutor:
    """Every unit a Ray task, asking for its method's declared resources (``MethodSpec.resources``).

    ``address``: the cluster to join (``auto``: the one started with ``ray start`` on this machine;
    ``HOST:PORT``: its head node); None starts a private Ray instance on this machine (or joins
    ``$RAY_ADDRESS``). A Ray session that already runs in this process (``ray.init`` by the caller) is
    used as it is and left running."""

    #: Ray runs a task again if its worker process or node dies (a lost node of a cluster), once; a
    #: unit that raises is reported instead (stbench.run.run_unit), never retried
    MAX_RETRIES = 1

    def __init__(self, address: Optional[str] = None):
        self.ray = import_ray()
        self.address = address
        self._owned = False  # this executor started (or joined) Ray and leaves it when done
        self._entered = False  # within 'with': stay connected until the block ends

    def describe(self) -> str:
        return f"as Ray tasks (cluster {self.address})" if self.address else "as Ray tasks"

    def __enter__(self) -> "RayExecutor":
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self._leave()

    def _leave(self) -> None:
        if self._owned:
            self.ray.shutdown()
            self._owned = False

    def connect(self) -> None:
        """Join (or start) the Ray cluster, on the first units to run (a resumed run with nothing left to
        do never waits for Ray), unless this process already is in one."""
        if self.ray.is_initialized():
            return
        try:
            # no dashboard: it is an optional Ray component and slows the start of a private instance
            self.ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--ray-address {self.address}: no Ray cluster found ({reason}); start one with "
                              "'ray start --head', or leave --ray-address out for a Ray instance on this machine") from None
        self._owned = True

    def task_options(self, session: UnitSession, unit: Unit, cluster: dict, largest_node_cpus: float) -> dict:
        """What the unit asks Ray for: its method's CPUs (at most what the largest node has: the unit
        still runs its declared number of torch threads), and a GPU when it wants one and the cluster
        has any, or when ``--device cuda`` asks for one."""
        resources = session.plan.plugins.methods.get(unit.method).resources
        device = session.plan.config.device
        if device and device.startswith("cuda"):
            if device != "cuda":
                raise ConfigError(f"--device {device}: with --executor ray give --device cuda (Ray chooses the GPU of each task)")
            if not cluster.get("GPU"):
                raise ConfigError("--device cuda: the Ray cluster has no GPU; leave --device out or add GPU nodes")
            gpu = True
        else:
            gpu = resources.gpu and device is None and bool(cluster.get("GPU"))
        cpus = min(resources.cpus, largest_node_cpus) if largest_node_cpus else resources.cpus
        return {"num_cpus": cpus, "num_gpus": 1 if gpu else 0, "max_retries": self.MAX_RETRIES, "name": unit.name}

    def run(self, session: UnitSession, units: list, done: Done, started: Optional[Callable[[Unit], None]] = None):
        if not units:
            return
        ray = self.ray
        self.connect()
        pending: dict = {}
        try:
            cluster = ray.cluster_resources()
            largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
            for method in sorted({u.method for u in units}):
                declared = session.plan.plugins.methods.get(method).resources.cpus
                if largest and declared > largest:
                    warnings.warn(f"method {method} declares {declared} CPUs and the largest Ray node has {largest:g}: "
                                  f"its units ask Ray for {largest:g} and still run {declared} torch threads", stacklevel=2)
            # the device is chosen where each task runs: Ray shows a task only the GPU it gave it
            job = ray.put(WorkerJob.of(session, session.plan.config.device))
            task = ray.remote(work)
            for unit in units:
                pending[task.options(**self.task_options(session, unit, cluster, largest)).remote(job, unit)] = unit
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                try:
                    outcome = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # the worker or its node died, or the task was cancelled
                    outcome = UnitFailure.of(unit, exc)
                done(unit, outcome)
        finally:
            for ref in pending:  # interrupted: the rest of the run's tasks are not wanted any more
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - a task that finished meanwhile cannot be cancelled
                    pass
            if not self._entered:
                self._leave()


# ------------------------------------------------------------------------------------------------
# workers


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to compute a run's units, and nothing heavy: the data and caches are
    read from the paths the driver used."""

    #: identifies the run invocation: a worker keeps the plan of the job it served last
    key: str
    config: Any  # the driver's resolved stbench.config.RunConfig
    methods: tuple
    out_dir: str
    base_dir: Optional[str]
    save_models: bool
    fit_all: bool
    #: the driver's plugins as (name, module or entry point value, package), loaded again by module
    plugins: tuple
    #: the driver's STBENCH_* settings, with $STBENCH_CACHE set to the cache the driver prepared
    env: dict
    #: the driver's working directory: relative paths in the config mean the same in a worker
    cwd: str
    prompts: dict  # slide -> ratio -> prompt spot indices
    device: Optional[str]
    #: the driver's folds and data fingerprints: a worker that sees other data refuses to compute
    folds: list
    data: dict

    @classmethod
    def of(cls, session: UnitSession, device: Optional[str]) -> "WorkerJob":
        plan = session.plan
        config = copy.deepcopy(plan.config)
        if config.data_dir:
            config.data_dir = str(Path(config.data_dir).expanduser().absolute())
        env = {k: v for k, v in os.environ.items() if k.startswith("STBENCH_")}
        env[CACHE_ENV] = str(cache_dir().absolute())
        return cls(key=uuid.uuid4().hex, config=config, methods=tuple(plan.methods), out_dir=str(plan.out_dir.absolute()),
                   base_dir=str(Path(plan.base_dir).absolute()) if plan.base_dir else None,
                   save_models=plan.save_models, fit_all=plan.fit_all,
                   plugins=tuple((i.name, i.module, i.package) for i in plan.plugins.infos.values() if i.ok),
                   env=env, cwd=os.getcwd(), prompts=session.prompts, device=device, folds=fold_record(plan),
                   data=session.store.fingerprints())


def load_plugins_by_module(modules) -> Plugins:
    """The driver's plugins, imported by module path (``pkg.mod`` or an entry point's ``pkg.mod:obj``),
    so a worker registers exactly what the driver did."""
    plugins = Plugins()
    for name, path, package in modules:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                module = getattr(module, part)
        except Exception as exc:
            raise RuntimeError(f"plugin {name} ({package}, {path}) cannot be imported on {socket.gethostname()} "
                               f"({type(exc).__name__}: {exc}); install the same packages on every node") from exc
        plugins.add_module(name, module, package, path)
    plugins.collect()
    return plugins


#: the job this worker process served last and its session (plan and loaded data)
_current: Optional[tuple] = None


def worker_session(job: WorkerJob) -> UnitSession:
    """The plan and data of ``job`` in this worker process, resolved on its first unit."""
    global _current
    if _current is not None and _current[0] == job.key:
        return _current[1]
    _current = None  # let the previous job's data go before loading this one's
    host = socket.gethostname()
    os.environ.update(job.env)
    if os.path.isdir(job.cwd):
        os.chdir(job.cwd)
    plugins = load_plugins_by_module(job.plugins)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings were the driver's to show
        plan = resolve_plan(copy.deepcopy(job.config), list(job.methods), Path(job.out_dir), plugins,
                            Path(job.base_dir) if job.base_dir else None, save_models=job.save_models,
                            fit_all=job.fit_all)
    store = SlideStore(plan)
    if fold_record(plan) != job.folds or store.fingerprints() != job.data:
        raise DataError(f"the worker on {host} reads other data than the driver at {job.config.data_dir or 'the default data path'} "
                        "(other sections or files); give every node the same data at the same path (--data-dir)")
    store.prepare_features()
    store.prepare_patches()
    computed = getattr(store, "feature_counts", (0, 0))[0] + getattr(store, "patch_counts", (0, 0))[0]
    if computed:
        raise DataError(f"the worker on {host} did not find the image features or patches the driver prepared under "
                        f"{cache_dir()} and computed {computed} itself; set STBENCH_CACHE to a folder every node shares")
    _current = (job.key, UnitSession(plan, store, job.prompts, job.device))
    return _current[1]


def work(job: WorkerJob, unit: Unit):
    """A worker's task: one unit of ``job``; returns its stbench.run.UnitResult or UnitFailure."""
    try:
        session = worker_session(job)
    except Exception as exc:  # reported as this unit's failure, with the reason
        return UnitFailure.of(unit, exc)
    return run_unit(session, unit)
