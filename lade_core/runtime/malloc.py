"""glibc's malloc tuned for a process that makes tensors of tens of MB every batch (a training worker, a
prediction driver).

Why: glibc serves a block over its mmap threshold (128 kB, raised as blocks are freed, to at most 32 MiB) with a
fresh mapping from the OS, and hands it back when it is freed; the top of a heap is trimmed back to the OS as
well. So every batch's float copy (64 x 3 x 224 x 224 float32 = 38.5 MB) is new pages, each faulted in and zeroed
by the kernel: 9 400 page faults and 14.6 ms per batch of normalizing here, against 4.0 ms once blocks stay in the
heap (bench/README.md, data_throughput). A DataLoader's plain loop pays the same, and so do CPU training's activations.
jemalloc or tcmalloc (LD_PRELOAD) would do this too; mallopt needs nothing installed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_MIB = 128  # blocks up to this size stay in the heap, and this much free space at a heap's top is kept
# glibc's own knobs: a process started with either keeps what its user chose.
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


@lru_cache(maxsize=1)
def keep_freed_blocks() -> bool:
    """Keep freed blocks up to KEEP_MIB in this process's heaps instead of returning them to the OS (glibc's
    ``mallopt``: a fixed mmap threshold and trim threshold of KEEP_MIB). Once per process; False where it does not
    apply: not Linux, not glibc, the user set glibc's knobs or preloaded another allocator, or turned it off
    (``LADE_KEEP_FREED_BLOCKS=0``)."""
    if os.environ.get("LADE_KEEP_FREED_BLOCKS", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_KNOBS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    size = KEEP_MIB << 20
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, size))
