"""Time and memory of BLEEP's retrieval (METHODS.md §5 inference; stbench_plugins.bleep.retrieval).

    python benchmarks/perf/retrieval.py [--reference 100000] [--queries 10000] [--dim 512] [--genes 250]
                                        [--k 50] [--threads N] [--repeat 1] [--json out.json]

Random data (float32 normal embeddings and expression; the search's cost does not depend on the
values): a ReferenceSet of ``--reference`` spots is built (unit vectors and lengths), then
``--queries`` query embeddings are predicted with ``average`` and with ``weighted_average`` (top ``k``
by cosine similarity, chunked matrix products and torch.topk).

Every measurement runs in a fresh Python process: peak memory = that process's peak RSS
(``ru_maxrss``) minus the peak RSS of a baseline process that only imports and generates the same data.
Time = the best of ``--repeat`` runs (other jobs on the cores inflate single runs). ``--threads`` sets
torch's intra-op threads (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from report import emit, machine  # benchmarks/perf/report.py, beside this script


def _data(n_ref: int, n_query: int, dim: int, genes: int):
    import torch

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n_ref, dim, generator=g)
    expr = torch.randn(n_ref, genes, generator=g)
    queries = torch.randn(n_query, dim, generator=g)
    return emb, expr, queries


def worker(kind: str, n_ref: int, n_query: int, dim: int, genes: int, k: int, repeat: int, threads: int):
    """Runs in a fresh process; prints one JSON line."""
    import torch

    from stbench_plugins.bleep.retrieval import ReferenceSet

    if threads > 0:
        torch.set_num_threads(threads)
    emb, expr, queries = _data(n_ref, n_query, dim, genes)
    result = {"threads": torch.get_num_threads()}
    if kind == "retrieval":
        small = ReferenceSet(emb[:100], expr[:100])  # one-time initialisation (thread pools), not timed
        small.predict(queries[:10], k=k)
        timings = {"build_s": [], "average_s": [], "weighted_average_s": []}
        for _ in range(repeat):
            t = time.perf_counter()
            ref = ReferenceSet(emb, expr)
            timings["build_s"].append(time.perf_counter() - t)
            for how in ("average", "weighted_average"):
                t = time.perf_counter()
                pred = ref.predict(queries, k=k, aggregate=how)
                timings[f"{how}_s"].append(time.perf_counter() - t)
                assert pred.shape == (n_query, genes) and bool(torch.isfinite(pred).all())
            del ref
        result.update({key: round(min(v), 3) for key, v in timings.items()})
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(result))


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(args.reference), str(args.queries), str(args.dim),
           str(args.genes), str(args.k), str(args.repeat), str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *numbers = sys.argv[2:]
        worker(kind, *map(int, numbers))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    base = run_worker("baseline", args)
    res = run_worker("retrieval", args)
    figures = {
        "machine": machine(),
        "setting": {"reference_spots": args.reference, "queries": args.queries, "dim": args.dim,
                    "genes": args.genes, "k": args.k, "threads": res["threads"]},
        "build_s": res["build_s"], "predict_average_s": res["average_s"],
        "predict_weighted_average_s": res["weighted_average_s"],
        "queries_per_s_average": round(args.queries / max(res["average_s"], 1e-9)),
        "peak_mib_above_data": round((res["peak_rss_bytes"] - base["peak_rss_bytes"]) / 2**20, 1),
        "data_mib": round(4 * (args.reference * (args.dim + args.genes) + args.queries * args.dim) / 2**20, 1),
    }
    emit(figures, args.json)


if __name__ == "__main__":
    main()
