"""One driver at a time per run, per prepared output, per search: an exclusive lock file beside what it guards.

Two ``train.py --run-name X`` started together would otherwise both resume the same MLflow run and write one
checkpoint folder; a second ``prepare_data.py`` to the same ``--out`` would delete the first one's temporary
folder mid-write. The lock is ``flock`` on a file: the kernel releases it when its process dies, however it dies, so
a dead holder's lock is simply taken by the next driver (no stale-lock guessing); it works on a local disk and on
NFS (Linux maps ``flock`` to NFS byte-range locks). The file records who holds it, for the error of the next one.
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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{what} is in use by {_holder(fd)} (lock {path}); wait for it to finish, or stop it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                                  "what": what}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a process opening it)


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
