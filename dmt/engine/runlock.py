"""One process at a time per run directory (or benchmark result file).

Two launches with the same run.name would interleave their metrics and overwrite each
other's checkpoints. The kernel holds the lock (flock) and drops it when the process ends,
however it ends, so a crash leaves no stale lock; the file itself stays, naming the last
holder."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class LockBusy(Exception):
    """Another process holds the lock; str() names it."""


class ExclusiveLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self.unsupported: str | None = None  # why the filesystem took no lock, if it did not

    def acquire(self) -> ExclusiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "one just starting"
            f.close()
            raise LockBusy(f"process {holder}") from None
        except OSError as err:  # a filesystem without locks (some network mounts): go on
            self.unsupported = f"{self.path}: {err.strerror or err}"
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
