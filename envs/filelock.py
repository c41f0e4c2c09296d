"""One writer per directory: an exclusive ``fcntl.flock`` on a lock file, naming its holder when taken.

Used by ``acodm data prepare`` (one preparation per prepared directory, ``envs.prepare``) and by
``acodm train`` (one driver per run directory, ``ray_jobs.rundir``).

Why ``flock`` on an open file rather than a PID file or ``O_EXCL``: the kernel releases the lock when
the holder's file descriptor closes, which happens on any exit, including SIGKILL and an OOM kill, so a
lock is never stale and never needs cleaning up by hand. The lock file itself stays (removing it would
let a second process lock a new inode while a third still holds the old one); its content is only a
description of the last holder (PID, host, command, start time), written after the lock is taken and
read by a process that finds the lock held, to say who holds it. On NFS, Linux maps ``flock`` onto
POSIX byte-range locks (NFSv4 locks held by the server), so two nodes that mount the same directory
exclude each other as well; the holder's host is in the message because its PID means nothing on
another node.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DirectoryLockedError", "exclusive_lock", "lock_holder"]


class DirectoryLockedError(FileExistsError):
    """Another process holds the lock; the message names it (PID, host, command, since when)."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


def lock_holder(lock_path: Path) -> dict[str, Any] | None:
    """The holder record in ``lock_path`` (``pid``, ``host``, ``command``, ``since``), or None if unreadable."""
    try:
        record = json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder or "pid" not in holder:
        return "another process (its PID is not recorded yet)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    return (
        f"PID {holder['pid']} on host {holder.get('host', '?')} (command: {holder.get('command', '?')}; "
        f"since {when})"
    )


def _write_holder(lock: TextIO) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:300] or sys.executable,
        "since": time.time(),
    }
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps(record) + "\n")
    lock.flush()


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str], *, what: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``lock_path`` for the block (created if absent).

    Args:
        lock_path: the lock file; its directory must exist.
        what: what the lock protects, for the message (e.g. ``"run directory runs/demo"``).

    Yields:
        The lock file's path.

    Raises:
        DirectoryLockedError: another process holds the lock; the message names its PID and host.
    """
    path = Path(lock_path)
    # "a+" never truncates a record another holder wrote. Not inheritable (close-on-exec): processes this
    # one starts (a local Ray's raylet and GCS) must not keep the lock alive after it died.
    with open(path, "a+") as lock:
        os.set_inheritable(lock.fileno(), False)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_holder(path)
            raise DirectoryLockedError(
                f"{what} is in use by {_describe(holder)}; wait for it to finish or stop it "
                f"(lock file {path}, released automatically when that process exits)",
                holder,
            ) from None
        try:
            _write_holder(lock)
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
