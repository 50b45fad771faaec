"""What every performance script prints: the machine, then its figures as JSON (and optionally a file)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0]}


def emit(figures: dict, json_path: Optional[str] = None) -> None:
    text = json.dumps(figures, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of ``repeat`` timed calls, in seconds (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
