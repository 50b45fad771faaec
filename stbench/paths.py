"""Where stbench looks for data and keeps its caches (one place for each default)."""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming a directory that holds one folder per dataset (``$STBENCH_DATA/her2st``)
DATA_ENV = "STBENCH_DATA"
#: environment variable overriding the cache directory
CACHE_ENV = "STBENCH_CACHE"


def cache_dir() -> Path:
    """``$STBENCH_CACHE``, else ``$XDG_CACHE_HOME/stbench``, else ``~/.cache/stbench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "stbench"


def default_data_dir(folder: str) -> tuple[Path, list[str]]:
    """The data directory for a dataset folder when none is given, and the places that were tried.

    ``$STBENCH_DATA/<folder>`` if that variable is set, else ``<cache_dir>/data/<folder>``.
    """
    tried = []
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser() / folder
        tried.append(f"${DATA_ENV}/{folder} = {path}")
        return path, tried
    path = cache_dir() / "data" / folder
    tried.append(f"the user cache {path}")
    return path, tried
