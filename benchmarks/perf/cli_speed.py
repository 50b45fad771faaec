"""Speed of the everyday commands, as whole commands (interpreter start-up and imports included).

    python benchmarks/perf/cli_speed.py [--data-dir ../shared/data/her2st] [--json out.json]

Targets (issue 7), measured in one run on whatever machine runs this (compare ratios, not seconds):

1. ``stbench run --methods ridge --dataset her2`` into a new ``--out`` with the parse and feature
   caches warm is at least 10x faster than the same command with ``$STBENCH_CACHE`` empty;
2. ``stbench list`` takes under 0.3 s; ``stbench --help`` and a rerun whose units are all done import
   only what they use (the script lists whether pandas, anndata or torch were imported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STBENCH = [sys.executable, "-m", "stbench.cli"]

from report import emit, machine  # benchmarks/perf/report.py, beside this script


def timed(args, env, repeat=1, fresh=None) -> float:
    """Median wall time of a whole command (a fresh interpreter each time). ``fresh(i)``: extra
    arguments for the i-th repeat (e.g. a new --out each time)."""
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        subprocess.run([*STBENCH, *args, *(fresh(i) if fresh else [])], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def heavy_imports(args, env) -> list[str]:
    """Which of the heavy libraries a command imports (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stbench.cli", *args], env=env,
                          capture_output=True, text=True, check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return sorted(names & {"pandas", "anndata", "torch", "scipy", "numpy", "PIL", "h5py", "timm"})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "her2st"))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        # Bytecode as a user's machine has it: some environments (containers, CI) set
        # PYTHONDONTWRITEBYTECODE, which makes every command compile stbench's 50 modules anew (0.1 s).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env |= {"STBENCH_CACHE": str(Path(tmp) / "cache"), "PYTHONWARNINGS": "ignore"}
        run = ["run", "--methods", "ridge", "--dataset", "her2", "--data-dir", args.data_dir, "--quiet"]
        # compiles the bytecode of the whole run path, into a throwaway cache (neither measured command pays it)
        subprocess.run([*STBENCH, *run, "--out", str(Path(tmp) / "compile")], check=True, capture_output=True,
                       env=env | {"STBENCH_CACHE": str(Path(tmp) / "compile-cache")})
        figures["help_s"] = timed(["--help"], env, repeat=5)
        figures["list_s"] = timed(["list"], env, repeat=5)
        figures["list_imports"] = heavy_imports(["list"], env)
        figures["run_empty_cache_s"] = timed([*run, "--out", str(Path(tmp) / "cold")], env)
        figures["run_warm_cache_s"] = timed(run, env, repeat=3, fresh=lambda i: ["--out", str(Path(tmp) / f"warm{i}")])
        figures["run_all_units_done_s"] = timed([*run, "--out", str(Path(tmp) / "warm0")], env, repeat=3)
        figures["warm_run_imports"] = heavy_imports([*run, "--out", str(Path(tmp) / "warm-imports")], env)
        figures["done_run_imports"] = heavy_imports([*run, "--out", str(Path(tmp) / "warm0")], env)
    figures["empty_over_warm"] = figures["run_empty_cache_s"] / figures["run_warm_cache_s"]
    figures["targets_met"] = {"warm_at_least_10x": figures["empty_over_warm"] >= 10, "list_under_0.3s": figures["list_s"] < 0.3}
    emit(figures, args.json)


if __name__ == "__main__":
    main()
