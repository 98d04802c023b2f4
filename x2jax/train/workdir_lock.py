"""One run per workdir: an exclusive OS-level lock on ``<workdir>/.lock``.

The lock is ``fcntl.flock`` on a file that also records who holds it (pid, host,
start time), so a second run on the same workdir exits at once naming the
first. The operating system drops the lock when its process dies (even by
``kill -9``), so a lock file left by a dead run is recovered by the next one
without any clean-up. In a multi-host run, process 0 takes the lock and every
process learns the outcome, so all of them stop together.

``flock`` is per host on most network file systems: two runs started on
*different* hosts against one shared workdir are only caught where the file
system propagates ``flock`` (NFSv4, Lustre with ``flock`` mounted).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirInUseError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """Exclusive lock on a run directory; use as a context manager or ``acquire``/``release``.

    Args:
      workdir: the run directory (created if missing).

    Raises:
      WorkdirInUseError: from ``acquire`` when another process holds the lock,
        naming its pid, host and start time as it recorded them.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirInUseError(
                f"workdir {self.path.parent} is in use by another run ({holder}); stop that run or pass "
                f"another --workdir (the lock is {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # the file stays; an empty one means "free"
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
