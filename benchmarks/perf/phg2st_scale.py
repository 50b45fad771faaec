"""PHG2ST on one very large slide: one training epoch and one prediction, on this machine.

    python benchmarks/perf/phg2st_scale.py [--spots 100000] [--dim 128] [--json out.json]

The slide is generated (square grid, smooth random features standing in for encoder features, 5x5
neighbour features, 785 genes), so no image is decoded; what is timed is the method itself: building the
per-chunk hypergraphs, one epoch over the slide's spatial chunks (``max_spots`` each, as the PH2ST code
does above 2,000 spots) with 30 % training prompts, and predicting every spot with 10 % prompts.
Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def make_slide(n: int, feat_dim: int = 60, genes: int = 785, seed: int = 0):
    from stbench.data.model import Slide

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
    freqs = rng.normal(size=(8, 2)) / side * 6
    waves = np.sin(grid @ freqs.T + rng.uniform(0, 6.28, 8)).astype(np.float32)  # (n, 8) smooth fields
    spot = waves @ rng.normal(size=(8, feat_dim)).astype(np.float32) + 0.3 * rng.normal(size=(n, feat_dim)).astype(np.float32)
    nb = np.repeat(spot[:, None, :], 25, axis=1) + 0.3 * rng.normal(size=(n, 25, feat_dim)).astype(np.float32)
    expr = np.abs(waves @ rng.normal(size=(8, genes)).astype(np.float32)).astype(np.float32)
    return Slide(name="big", patient="P", spot_ids=np.array([f"{x}x{y}" for x, y in grid]),
                 genes=np.array([f"G{i}" for i in range(genes)]), expr=expr, grid=grid, pixel=grid * 200.0, mpp=1.0,
                 features={"spot": spot, "spot_mask": np.ones(n, bool), "neighbour": nb, "neighbour_mask": np.ones((n, 25), bool)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spots", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()

    from stbench.method import FitContext
    from stbench_plugins.phg2st import PHG2STConfig
    from stbench_plugins.phg2st.model import PHG2ST, spatial_chunks

    t = time.perf_counter()
    slide = make_slide(args.spots)
    t_make = time.perf_counter() - t
    method = PHG2ST(PHG2STConfig(dim=args.dim, epochs=1))
    t = time.perf_counter()
    method.fit([slide], [], FitContext(seed=0, genes=slide.genes))
    t_epoch = time.perf_counter() - t
    prompts = np.random.default_rng(1).choice(slide.n_spots, slide.n_spots // 10, replace=False)
    t = time.perf_counter()
    pred = method.predict(slide.masked(np.sort(prompts)))
    t_predict = time.perf_counter() - t
    figures = {"spots": args.spots, "dim": args.dim, "chunks": len(spatial_chunks(slide.positions_um(), method.config.max_spots)),
               "generate_s": t_make, "one_epoch_s_incl_hypergraphs": t_epoch, "predict_s_incl_hypergraphs": t_predict,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "finite": bool(np.isfinite(pred).all())}
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
