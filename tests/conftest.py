"""Shared fixtures: an isolated cache, the real data location, and a tiny her2st-layout writer."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from stbench.plugins import reset_plugins

REPO = Path(__file__).resolve().parents[1]
#: the real public HER2+ data, beside the repository (../shared/data); never copied into it
SHARED_HER2 = REPO.parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One fresh cache for the whole session (session-scoped fixtures are set up before per-test ones)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "stbench-cache"))
        yield


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test reads the user's cache, data or installed third-party plugins, or writes into the
    working tree (default output folders such as runs/ are relative to the current directory)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.delenv("STBENCH_DATA", raising=False)
    monkeypatch.delenv("STBENCH_BLOCK_PLUGINS", raising=False)
    monkeypatch.setenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def her2_dir():
    if not (SHARED_HER2 / "ST-cnts").is_dir():
        pytest.skip(f"real HER2+ data not found at {SHARED_HER2}")
    return SHARED_HER2


def write_her2_layout(root: Path, sections=("A1", "A2", "B1", "C1"), n_spots=30, genes=("G1", "G2", "G3", "G4", "G5"),
                      seed=0) -> Path:
    """A tiny dataset in the public her2st layout (ST-cnts/, ST-spotfiles/), with spatial signal."""
    rng = np.random.default_rng(seed)
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(n_spots)))
    for name in sections:
        xy = [(5 + i % side, 5 + i // side) for i in range(n_spots)]
        ids = [f"{x}x{y}" for x, y in xy]
        field = np.array([np.sin(x / 2.0) + np.cos(y / 3.0) + 2.5 for x, y in xy])
        counts = rng.poisson(np.outer(field, np.arange(1, len(genes) + 1)) * 3)
        lines = ["\t" + "\t".join(genes)] + [f"{i}\t" + "\t".join(map(str, row)) for i, row in zip(ids, counts)]
        with gzip.open(root / "ST-cnts" / f"{name}.tsv.gz", "wt") as fh:
            fh.write("\n".join(lines) + "\n")
        rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
        for x, y in xy:
            rows.append(f"{x}\t{y}\t{x:.3f}\t{y:.3f}\t{290 * (x - 1):.2f}\t{290 * (y - 1):.2f}\t1")
        (root / "ST-spotfiles" / f"{name}_selection.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny networks run fastest on one thread, and several threads crawl on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
