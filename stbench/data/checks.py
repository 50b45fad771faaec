"""Checks the core applies to every section a dataset plugin returns, whatever the plugin.

A plugin's reader checks its own files (it knows their names and fields); these checks catch what would
silently corrupt a method downstream whichever reader produced the section, and name the section and
the dataset so the user knows where to look.
"""

from __future__ import annotations

import numpy as np

from stbench.data.model import Section
from stbench.errors import DataError


def check_section(section: Section, dataset: str = "") -> Section:
    """Refuse a section whose arrays disagree in length, or in which two spots share a grid cell.

    Two spots in one grid cell would overwrite each other wherever a method places spots on the array
    grid (PHG2ST's positional encoding, the 5×5 neighbour lattice, niche profiles): one of them would be
    predicted from the other's position without a word.
    """
    where = f"dataset {dataset}, section {section.name}" if dataset else f"section {section.name}"
    n = len(section.spot_ids)
    for field in ("grid", "pixel"):
        shape = np.shape(getattr(section, field))
        if shape != (n, 2):
            raise DataError(f"{where}: {field} has shape {shape}, expected ({n}, 2) for {n} spots; "
                            "the reader must give one (x, y) per spot")
    if section.counts is not None and section.counts.shape != (n, len(section.genes)):
        raise DataError(f"{where}: counts have shape {section.counts.shape}, expected ({n}, {len(section.genes)}) "
                        "(spots x genes); the reader must align counts with spots and genes")
    grid = np.asarray(section.grid)
    if n:
        cells, first, counts = np.unique(grid, axis=0, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = cells[counts > 1]
            shown = ", ".join(f"({int(x)}, {int(y)})" for x, y in dup[:3]) + (" ..." if len(dup) > 3 else "")
            raise DataError(f"{where}: {len(dup)} grid cell(s) hold more than one spot: {shown}; each spot needs its "
                            "own array (x, y) position: remove the duplicated spots or fix their array coordinates")
    return section


def load_checked(dataset, name: str) -> Section:
    """``dataset.load_section(name)``, checked with :func:`check_section`."""
    return check_section(dataset.load_section(name), getattr(dataset, "name", ""))
