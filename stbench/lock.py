"""One process per run directory.

Two runs started into one ``--out`` at the same moment would interleave their parts and leave rows of
one setting labelled with the other. :class:`RunLock` holds an exclusive ``flock`` on ``RUN_DIR/.lock``
for the whole run; a second process is refused with one line naming the holder. The kernel releases a
``flock`` when its process dies, so the lock of a killed run is stale by construction and is simply
taken over: the file's content (pid, host, start time, command) is only information for the message.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from stbench.errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
                    f"{info.get('command')}")
        except (OSError, ValueError):
            return "another process"

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"output directory {self.path.parent} is in use by a running stbench ({self.holder()}); "
                              "wait for it to finish, or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["stbench", *sys.argv[1:]]) if sys.argv else "stbench"}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
