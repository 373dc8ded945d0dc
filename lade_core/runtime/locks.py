"""One driver at a time per run, per prepared output, per search: an exclusive lock file beside what it guards.

Two ``train.py --run-name X`` started together would otherwise both resume the same MLflow run and write one
checkpoint folder; a second ``prepare_data.py`` to the same ``--out`` would delete the first one's temporary
folder mid-write. The lock is ``flock`` on a file: the kernel releases it when its process dies, however it dies, so
a dead holder's lock is simply taken by the next driver (no stale-lock guessing); it works on a local disk and on
NFS (Linux maps ``flock`` to NFS byte-range locks). The file records who holds it, for the error of the next one,
and is removed when the holder is done.
Object stores (``s3://``) have no such lock: a location given as a URI is not locked (``lock_for`` returns None).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the ``with`` block, or raise ``LockHeld`` naming the process that has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"{what} is in use by {holder} (lock {path}); wait for it to finish, or stop it") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the file that is there now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                                  "what": what}).encode(), 0)
        yield
    finally:
        # Removed while still held, so nothing is left behind; a process that opened it meanwhile sees, once it
        # has the lock, that the path no longer names its file, and tries again.
        path.unlink(missing_ok=True)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def lock_for(location: str, name: str) -> Path | None:
    """The lock file for ``name`` under ``location`` (a folder path; None for a URI, which has no file lock)."""
    if "://" in location and not location.startswith("file://"):
        return None
    base = Path(location.removeprefix("file://"))
    return base / ".locks" / f"{name}.lock"


@contextlib.contextmanager
def maybe_exclusive(path: Path | None, what: str) -> Iterator[None]:
    """``exclusive`` where there is a lock file to take, else nothing (see ``lock_for``)."""
    if path is None:
        yield
        return
    with exclusive(path, what):
        yield
