"""Atomic, durable file writes: a reader (or a resumed run) sees the old file or the new one, never half
of one, even after a power cut.

The data is written to a temporary file beside the target, flushed and ``fsync``-ed, renamed over the
target in one step, and the directory is ``fsync``-ed so the rename itself survives an OS crash. The
file gets the permissions an ordinary ``open(path, "w")`` would give (0666 less the umask), not the
0600 of a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

#: the prefix of temporary files; a run removes leftovers of killed runs (:func:`remove_leftovers`)
TMP_PREFIX = ".tmp-"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (the CLI is single-threaded here)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success make it durable and move it over ``path``.

    The caller writes the temporary file (by any library). On an exception the temporary file is
    removed and ``path`` is untouched; after a kill it stays as ``.tmp-*`` litter, which the next run
    removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:  # the content must be on disk before the rename is
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: os.PathLike | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_leftovers(root: os.PathLike | str) -> int:
    """Delete the ``.tmp-*`` files that killed writers left under ``root``; returns how many.

    Call it only while holding the run directory's lock, so no live writer's file is removed.
    """
    removed = 0
    for tmp in Path(root).rglob(f"{TMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
