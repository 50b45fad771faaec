"""Speed of the patch store on this machine: reading cached patches against decoding and cutting them.

    python benchmarks/perf/patches.py --data-dir ../shared/data/her2st [--section C2] [--json out.json]

Measures, in one process (ratios are what to compare, not seconds), for one section's spot patches of
112 µm at 224 px (what a fine-tuned encoder reads):

1. cold: ``PatchStore.get`` on an empty cache: decode the JPEG, cut and resize every patch, write the
   ``.npy`` (and, for reference, the decode alone);
2. warm: ``PatchStore.get`` on the filled cache (validate the sidecar, map the file) plus reading every
   patch into memory in batches of 128, with the file in the page cache, and again after evicting the
   file's pages (``posix_fadvise(DONTNEED)``: a read from disk, where the OS honours it);
3. patches per second of each, and the warm read's speed-up over decoding and cutting.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from report import best_of, emit, machine  # benchmarks/perf/report.py, beside this script

BATCH = 128


def _evict(path: Path) -> bool:
    """Drop the file's pages from the page cache, if the OS lets us (clean pages only)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def measure(data_dir: Path, section_name: str, size_um: float, out_px: int, repeat: int):
    from stbench.images.features import _open_image
    from stbench.images.patches import PatchRequest, PatchStore
    from stbench_plugins.her2.reader import open_her2

    section = open_her2(data_dir).load_section(section_name)
    request = PatchRequest("spot", size_um, out_px)

    def decode_only():
        image, _ = _open_image(section, request.target_mpp)
        image.close()

    def cold():
        with tempfile.TemporaryDirectory() as tmp:
            PatchStore(tmp, "bench").get(section, [request])

    with tempfile.TemporaryDirectory() as tmp:
        store = PatchStore(tmp, "bench")
        ps = store.get(section, [request])[request.name]  # fill the cache
        n = len(ps) * ps.n_sub

        def warm():
            got = PatchStore(tmp, "bench").get(section, [request])[request.name]
            total = 0
            for start in range(0, len(got), BATCH):
                total += np.array(got.patches[start : start + BATCH]).nbytes  # a copy in memory
            return total

        warm()
        t_warm = best_of(warm, repeat)
        evicted = []

        def disk():
            evicted.append(_evict(ps.path))
            warm()

        t_disk = best_of(disk, repeat)
        file_mb = ps.path.stat().st_size / 2**20

    t_decode = best_of(decode_only, repeat)
    t_cold = best_of(cold, repeat)
    return {
        "section": section_name, "spots": section.n_spots, "patches": n, "request": request.name,
        "mpp": section.mpp, "file_mb": round(file_mb, 1),
        "decode_only_s": t_decode,
        "cold_decode_cut_write_s": t_cold, "cold_patches_per_s": n / t_cold,
        "warm_read_s": t_warm, "warm_patches_per_s": n / t_warm,
        "disk_read_s": t_disk if all(evicted) else None,
        "disk_patches_per_s": n / t_disk if all(evicted) else None,
        "warm_speedup_over_cold": t_cold / t_warm,
        "warm_speedup_over_decode_only": t_decode / t_warm,
        "disk_speedup_over_cold": t_cold / t_disk if all(evicted) else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "her2st"))
    parser.add_argument("--section", default="C2")
    parser.add_argument("--size-um", type=float, default=112.0)
    parser.add_argument("--out-px", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = {"machine": machine()}
    figures["patches"] = measure(Path(args.data_dir), args.section, args.size_um, args.out_px, args.repeat)
    emit(figures, args.json)


if __name__ == "__main__":
    main()
