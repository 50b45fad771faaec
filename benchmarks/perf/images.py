"""Speed of the image pipeline on this machine (issue 3 targets).

    python benchmarks/perf/images.py --data-dir ../shared/data/her2st [--section C2] [--json out.json]

Measures, in one process on whatever machine runs it (ratios are what to compare, not seconds):

1. patches per second of the default encoder (hefeat) on 64 px patches (target: >= 300/s on 2 cores);
2. extraction of one section's spot and 5x5 neighbour patches (decode, cut, resize; encoding excluded)
   against the floor of decoding its image at full resolution and slicing the same boxes out of the
   array (target: within 1.5x of the floor); and the same extraction with encoding included;
3. a cold run of ``stbench run --methods ridge --dataset her2`` (empty cache: counts parsed, features
   extracted) against a warm one (same cache, new output directory) (target: warm >= 10x faster), as
   whole commands and inside one process (without interpreter start-up and imports).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import best_of, emit, machine  # benchmarks/perf/report.py, beside this script


def encoder_rate(n=4096):
    from stbench_plugins.hefeat.features import HEFeatures

    enc = HEFeatures()
    patches = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    enc.encode(patches[:512])  # warm-up
    return n / best_of(lambda: enc.encode(patches))


class NullEncoder:
    """Cuts and resizes like hefeat (64 px) but does not encode: isolates extraction."""

    name, input_size, dim, weights_id, batch_size = "null", 64, 1, "none", 1024

    def encode(self, patches):
        return np.zeros((len(patches), 1), np.float32)

    def describe(self):
        return {"name": self.name}


def extraction(data_dir: Path, section_name: str):
    from PIL import Image

    from stbench.images.features import FeatureStore
    from stbench.images.geometry import PatchSpec, patch_boxes
    from stbench_plugins.hefeat.features import HEFeatures
    from stbench_plugins.her2.reader import open_her2

    section = open_her2(data_dir).load_section(section_name)
    specs = [PatchSpec("spot", 112.0), PatchSpec("neighbour", 112.0, 5)]
    n_patches = section.n_spots * sum(s.n_sub for s in specs)

    def floor():
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(section.image_path) as im:
            array = np.asarray(im.convert("RGB"))
        h, w = array.shape[:2]
        for spec in specs:
            for x0, y0, x1, y1 in patch_boxes(section.pixel, spec, section.mpp).reshape(-1, 4).astype(int):
                array[max(0, y0):min(h, y1), max(0, x0):min(w, x1)].copy()

    def ours(encoder):
        with tempfile.TemporaryDirectory() as tmp:
            FeatureStore(encoder, encoder.name, "bench", Path(tmp)).get(section, specs)

    t_floor = best_of(floor)
    t_cut = best_of(lambda: ours(NullEncoder()))
    t_full = best_of(lambda: ours(HEFeatures()))
    return {"section": section_name, "spots": section.n_spots, "patches": n_patches,
            "floor_decode_and_slice_s": t_floor, "extract_cut_resize_s": t_cut, "extract_ratio_to_floor": t_cut / t_floor,
            "extract_and_encode_hefeat_s": t_full}


def cold_vs_warm_in_process(data_dir: Path):
    """The same, inside one process: what the caches save, without interpreter start-up and imports."""
    from stbench.benchmark import resolve_config
    from stbench.plugins import load_plugins
    from stbench.run import execute, resolve_plan

    plugins = load_plugins()
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("STBENCH_CACHE")
        os.environ["STBENCH_CACHE"] = str(Path(tmp) / "cache")
        try:
            for label in ("cold", "warm"):
                conf, base = resolve_config("her2", shorthands={"data_dir": str(data_dir)})
                t = time.perf_counter()
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    execute(resolve_plan(conf, ["ridge"], Path(tmp) / label, plugins, base), verbose=False)
                times[label] = time.perf_counter() - t
        finally:
            if old is None:
                os.environ.pop("STBENCH_CACHE")
            else:
                os.environ["STBENCH_CACHE"] = old
    return {"cold_run_s": times["cold"], "warm_run_s": times["warm"], "cold_over_warm": times["cold"] / times["warm"]}


def cold_vs_warm(data_dir: Path):
    cmd = [sys.executable, "-m", "stbench.cli", "run", "--methods", "ridge", "--dataset", "her2",
           "--data-dir", str(data_dir), "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "STBENCH_CACHE": str(Path(tmp) / "cache"), "PYTHONWARNINGS": "ignore"}
        times = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            subprocess.run([*cmd, "--out", str(Path(tmp) / label)], env=env, check=True, capture_output=True)
            times[label] = time.perf_counter() - t
    return {"cold_run_s": times["cold"], "warm_run_s": times["warm"], "cold_over_warm": times["cold"] / times["warm"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "her2st"))
    parser.add_argument("--section", default="C2")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    figures = {"machine": machine()}
    figures["hefeat_patches_per_s"] = encoder_rate()
    figures["extraction"] = extraction(data_dir, args.section)
    figures["run_subprocess"] = cold_vs_warm(data_dir)
    figures["run_in_process"] = cold_vs_warm_in_process(data_dir)
    emit(figures, args.json)


if __name__ == "__main__":
    main()
