"""One driver at a time per run, prepared output and search (``lade_core.runtime.locks``), with real processes: the
second is refused naming the first; a holder that dies (even SIGKILLed) leaves a lock the next one takes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_prepare, run_train
from lade_core.runtime.locks import LockHeld, exclusive, lock_for
from lade_core.tracking.store import run_key

HOLD = ("import sys, time\nfrom lade_core.runtime.locks import exclusive\n"
        "with exclusive(sys.argv[1], 'thing'):\n    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_refused_by_name_and_a_dead_holders_lock_is_taken(tmp_path):
    path = tmp_path / "locks" / "x.lock"
    holder = _holder(path)
    try:
        with pytest.raises(LockHeld, match=rf"run 'x' is in use by pid {holder.pid} on .* since "):
            with exclusive(path, "run 'x'"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel releases the lock
        holder.wait()
    with exclusive(path, "run 'x'"):  # taken at once
        with pytest.raises(LockHeld, match=rf"in use by pid {os.getpid()}"):
            with exclusive(path, "run 'x'"):
                pass
    assert lock_for("s3://bucket/runs", "x") is None and lock_for(str(tmp_path), "x") == tmp_path / ".locks" / "x.lock"


@pytest.mark.slow
def test_a_second_preparation_or_training_driver_is_refused(tmp_path, train_workdir, smoke_run):
    out = tmp_path / "data"
    holder = _holder(tmp_path / ".data.lock")
    try:
        p = run_prepare(tmp_path, "synthetic", "--num-classes", "3", "--max-count", "8", "--out", str(out))
        assert p.returncode == 2 and f"prepared dataset {out} is in use by pid {holder.pid}" in p.stderr, p.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    smoke_run("lade")  # the session's finished run r-lade and its data
    storage = train_workdir / "ray_results"
    holder = _holder(lock_for(str(storage), f"run-{run_key('r-lade')}"))
    try:
        start = time.time()
        p = run_train(train_workdir, "--loss", "lade", "--run-name", "r-lade")
        assert p.returncode == 2 and f"run 'r-lade' is in use by pid {holder.pid}" in p.stderr, p.stderr[-2000:]
        assert time.time() - start < 120
    finally:
        holder.kill()
        holder.wait()
