"""glibc's malloc tuning of a process that makes tensors of tens of MB every batch (``runtime.malloc``): the freed
float batch stays in the heap, so the next batch faults in no new pages; a user's own malloc settings are kept."""
import os
import subprocess
import sys
import textwrap

import pytest

_BATCHES = textwrap.dedent("""
    import resource, sys, torch
    from lade_core.runtime.malloc import keep_freed_blocks
    print(keep_freed_blocks() if sys.argv[1] == "tuned" else None)
    x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
    def batch():  # what model_batches makes of a uint8 batch: 38.5 MB of float32
        return x.float().sub_(120).div_(60)
    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        y = batch()
        del y
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _run(mode: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _BATCHES, mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_tuned_process_reuses_its_batch_memory_and_a_users_settings_are_kept():
    _, plain = _run("plain")
    applied, tuned = _run("tuned")
    pages = 64 * 3 * 224 * 224 * 4 / 4096  # one float batch: 9 408 pages
    assert float(plain) > 0.9 * pages  # untuned: every batch is fresh pages from the OS
    assert applied == "True" and float(tuned) < 0.3 * pages, (plain, tuned)
    # glibc's own knob set by the user: left alone, and the batches fault as glibc was told.
    applied, kept = _run("tuned", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert applied == "False" and float(kept) > 0.9 * pages
    applied, off = _run("tuned", LADE_KEEP_FREED_BLOCKS="0")  # lade's own switch: glibc's defaults
    assert applied == "False" and float(off) > 0.9 * pages
