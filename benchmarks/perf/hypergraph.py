"""Time and memory of the PHG2ST slide-level spot hypergraph (METHODS.md §8.2 (2)).

    python benchmarks/perf/hypergraph.py [--sizes 1000 10000 100000] [--dim 1024] [--repeat 3] [--json out.json]

PHG2ST builds this graph once per slide, on the whole slide (then restricts it to each slide part,
stbench_plugins.phg2st.chunks), so slides of more than 4,000 spots take the candidate path measured here.

For synthetic slides (square grid of spots; features = a few smooth 2-D fields, sines of random
frequency and phase, mixed into ``dim`` dimensions plus noise, float32) it measures
``spot_hypergraph`` (exact up to 4,000 spots, candidate-based above) and ``dense_spot_hypergraph``
(full N×N matrices; skipped where N² × 4 bytes × 3 exceeds 8 GB).

Every measurement runs in a fresh Python process: peak memory = that process's peak RSS
(``ru_maxrss``) minus the peak RSS of a baseline process that only imports, warms up on a tiny slide
and generates the same data (features are generated in row blocks, so the data's own peak is its final
size). Time = the best of ``--repeat`` runs in that process (other jobs on the cores inflate single
runs several-fold: OpenMP threads wait for descheduled siblings). tracemalloc is not used: it does
not see torch's allocations, where nearly all the memory is.
Where the dense construction runs, the share of hyperedge memberships on which both agree is reported.
Targets: 100,000 spots in under 30 s and under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

DENSE_LIMIT_BYTES = 8e9
TARGET_S, TARGET_BYTES = 30.0, 2e9


def synthetic_slide(n: int, dim: int, seed: int = 0, n_fields: int = 8, noise: float = 0.5):
    """Grid coordinates and spatially smooth float32 features, generated in row blocks."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    y, x = np.divmod(np.arange(n), side)
    coords = np.stack([x, y], 1).astype(np.float64)
    freq = rng.normal(0, 3, (n_fields, 2)) / side  # a few cycles across the slide
    phase = rng.uniform(0, 2 * np.pi, n_fields)
    mix = (rng.standard_normal((n_fields, dim)) / np.sqrt(n_fields)).astype(np.float32)
    features = np.empty((n, dim), np.float32)
    for s in range(0, n, 4096):
        fields = np.sin(2 * np.pi * coords[s:s + 4096] @ freq.T + phase).astype(np.float32)
        features[s:s + 4096] = fields @ mix + noise * rng.standard_normal((len(fields), dim), dtype=np.float32)
    return features, coords


def worker(kind: str, n: int, dim: int, repeat: int):
    """Runs in a fresh process; prints one JSON line."""
    from stbench_plugins.phg2st.hypergraph import dense_spot_hypergraph, spot_hypergraph

    spot_hypergraph(*synthetic_slide(300, 16))  # one-time initialisation (thread pools, BLAS) not timed
    features, coords = synthetic_slide(n, dim)
    result = {}
    if kind != "baseline":
        fn = dense_spot_hypergraph if kind == "dense" else spot_hypergraph
        times = []
        for _run in range(repeat):
            t = time.perf_counter()
            edges, _ = fn(features, coords)
            times.append(time.perf_counter() - t)
        result["seconds"] = min(times)
        if kind == "agreement":  # both constructions: memory and time are not what this one measures
            dense, _ = dense_spot_hypergraph(features, coords)
            a, b = edges[0].reshape(n, -1)[:, 1:], dense[0].reshape(n, -1)[:, 1:]
            result["agreement"] = float(np.mean([len(set(p) & set(q)) for p, q in zip(a, b)]) / a.shape[1])
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(result))


def run_worker(kind: str, n: int, dim: int, repeat: int = 1) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(n), str(dim), str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best time is kept")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], *map(int, args.worker[1:]))

    rows = []
    print(f"{'spots':>8} {'construction':<10} {'seconds':>8} {'peak MB':>8}  note")
    for n in args.sizes:
        base = run_worker("baseline", n, args.dim)["peak_rss_bytes"]
        for kind in ("spot", "dense"):
            need = n * n * 4 * 3
            if kind == "dense" and need > DENSE_LIMIT_BYTES:
                row = {"spots": n, "construction": kind, "skipped": f"needs N² × 4 bytes × ~3 = {need / 1e9:.0f} GB"}
            else:
                r = run_worker(kind, n, args.dim, args.repeat)
                row = {"spots": n, "construction": kind, "seconds": r["seconds"],
                       "peak_bytes": r["peak_rss_bytes"] - base, "baseline_peak_bytes": base}
                if kind == "spot" and n > 4000:
                    row["path"] = "candidates"
                if kind == "spot" and n == max(args.sizes):
                    row["meets_targets"] = row["seconds"] < TARGET_S and row["peak_bytes"] < TARGET_BYTES
            if kind == "dense" and "skipped" not in row and n > 4000:
                row["agreement"] = run_worker("agreement", n, args.dim)["agreement"]
            rows.append(row)
            if "skipped" in row:
                print(f"{n:>8} {kind:<10} {'-':>8} {'-':>8}  skipped: {row['skipped']}")
            else:
                note = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in row.items() if k in ("path", "agreement", "meets_targets"))
                print(f"{n:>8} {kind:<10} {row['seconds']:>8.2f} {row['peak_bytes'] / 1e6:>8.0f}  {note}")
    print(f"targets: {TARGET_S:.0f} s and {TARGET_BYTES / 1e9:.0f} GB for the largest slide (spot_hypergraph)")
    # other jobs on the cores distort the times badly (OpenMP threads wait for descheduled siblings)
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.2f} on {os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dim": args.dim, "load_average": load, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
