"""One training epoch's time per method preset, and peak memory, on the real HER2+ imaged sections.

    python benchmarks/perf/epochs.py [--data-dir ../shared/data/her2st] [--json out.json]

For each preset (the CPU preset benchmarks/stbench_benchmarks/her2/cpu.yaml, and HyperST's frozen-feature
variant of it), fits the method on fold 0's training sections (her2 imaged sections: C2-C6, one held
out) with 1 and with 2 epochs; the difference is one epoch (setup, patch reading and feature caches
excluded: both fits find them warm). Peak resident memory is the process's maximum after each preset.
Compare ratios across machines, not seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PRESETS = {
    "hyperst (cpu)": ("hyperst", {}),
    "hyperst (cpu, backbone=frozen)": ("hyperst", {"backbone": "frozen"}),
    "phg2st (cpu)": ("phg2st", {}),
    "stnet (cpu)": ("stnet", {}),
    "stnet (cpu, backbone=frozen)": ("stnet", {"backbone": "frozen"}),
    "bleep (cpu)": ("bleep", {}),
    "bleep (cpu, backbone=frozen)": ("bleep", {"backbone": "frozen"}),
}

from report import emit, machine  # benchmarks/perf/report.py, beside this script


def _fit_seconds(method_name, plan, store, fold, epochs, overrides):
    from stbench.method import FitContext

    genes = store.panel(fold)
    train = [store.slide(s, genes) for s in fold.train]
    val = [store.slide(s, genes) for s in fold.val]
    config = dataclasses.replace(plan.methods[method_name], epochs=epochs, **overrides)
    method = plan.plugins.methods.load(method_name)(config)
    t = time.perf_counter()
    method.fit(train, val, FitContext(seed=0, genes=np.asarray(genes), device="cpu"))
    return time.perf_counter() - t, len(train), sum(s.n_spots for s in train)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from stbench.benchmark import resolve_config
    from stbench.plugins import get_plugins
    from stbench.run import SlideStore, resolve_plan

    figures = {"machine": machine(), "presets": {}}
    for label, (method, overrides) in PRESETS.items():
        conf, base = resolve_config("her2_images", str(REPO / "benchmarks/stbench_benchmarks/her2/cpu.yaml"),
                                    [f"methods.{method}.{k}={v}" for k, v in overrides.items()],
                                    {"data_dir": args.data_dir})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = resolve_plan(conf, [method], Path("/tmp/stbench-epochs"), get_plugins(), base)
            store = SlideStore(plan)
            store.prepare_features()
            store.prepare_patches()
            fold = plan.folds[0]
            _fit_seconds(method, plan, store, fold, 1, {})  # warm-up
            one, n_slides, n_spots = _fit_seconds(method, plan, store, fold, 1, {})
            three, _, _ = _fit_seconds(method, plan, store, fold, 3, {})
        figures["presets"][label] = {
            "training_slides": n_slides, "training_spots": n_spots,
            "fit_1_epoch_s": round(one, 2), "fit_3_epochs_s": round(three, 2), "epoch_s": round((three - one) / 2, 2),
            "peak_rss_mib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        print(label, figures["presets"][label], file=sys.stderr, flush=True)
    emit(figures, args.json)


if __name__ == "__main__":
    main()
