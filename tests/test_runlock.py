"""The run lock: one launch at a time per run directory, and a lock file that names the
holder (the lock's own tests that launch runs are in test_engine.py)."""
import errno
import fcntl
import os
import socket

import pytest

import dmt  # noqa: F401
from dmt.engine.runlock import ExclusiveLock, LockBusy


def test_a_busy_lock_names_the_process_holding_it(tmp_path):
    """flock conflicts between two opens even in one process: the second is refused with
    the holder's pid and host, what a user needs to find the other launch."""
    with ExclusiveLock(tmp_path / ".lock"):
        with pytest.raises(LockBusy) as busy:
            ExclusiveLock(tmp_path / ".lock").acquire()
    assert f"{os.getpid()} on {socket.gethostname()}" in str(busy.value)
    ExclusiveLock(tmp_path / ".lock").acquire().release()  # free again once released


def test_the_lock_file_names_only_the_latest_holder(tmp_path):
    """Each holder replaces the previous one's line (the file is opened for appending):
    after two launches it still holds exactly one line."""
    path = tmp_path / "run" / ".lock"
    path.parent.mkdir()
    path.write_text("12345 on elsewhere\n")  # a holder long gone
    for _ in range(2):
        ExclusiveLock(path).acquire().release()
    assert path.read_text() == f"{os.getpid()} on {socket.gethostname()}\n"


def test_a_filesystem_without_locks_still_runs_and_says_why(tmp_path, monkeypatch):
    """Some network mounts refuse flock (ENOLCK): the launch goes on unlocked, and the
    reason is kept for a warning."""
    def no_locks(*_args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = ExclusiveLock(tmp_path / ".lock").acquire()
    try:
        assert lock.unsupported == f"{tmp_path / '.lock'}: {os.strerror(errno.ENOLCK)}"
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
    finally:
        lock.release()
