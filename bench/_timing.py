"""Tiny timing helper shared by the benchmarks: best-of-k wall time, interleaved so noise hits all variants."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable


def best_times(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


class ProcessCPU:
    """CPU seconds (user + system, /proc) each process on this machine spends inside a ``with`` block, sampled
    every ``interval`` s so processes that start and end inside it count too. Linux only; empty elsewhere.
    ``by_name()``: {command name: CPU s}, Ray's processes by their title (``ray::TrainController``, ``raylet``);
    ``by_name(since, until)``: the same between two ``time.time()`` instants inside the block (the samples nearest
    around them), e.g. a loop's warm epochs only, which start-up and shutdown do not blur."""

    def __init__(self, interval: float = 0.5):
        self.interval, self._stop, self._thread = interval, threading.Event(), None
        self.before: dict[int, tuple[float, str]] = {}
        self.after: dict[int, tuple[float, str]] = {}
        self.series: list[tuple[float, dict[int, tuple[float, str]]]] = []  # (time.time(), sample), in order
        self.wall_s = 0.0

    @staticmethod
    def sample() -> dict[int, tuple[float, str]]:
        out = {}
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for pid in (p for p in (os.listdir("/proc") if os.path.isdir("/proc") else []) if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:  # ended between listing and reading
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
            name = argv[0].decode(errors="replace").split("/")[-1].strip() or stat[stat.find("(") + 1:stat.rfind(")")]
            if name.startswith("python") and len(argv) > 1:  # a script or a spawned child, not the interpreter
                name = " ".join(a.decode(errors="replace").split("/")[-1] for a in argv[1:] if a)[:48]
            out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, name)
        return out

    def _record(self) -> None:
        now = self.sample()
        self.series.append((time.time(), now))
        self.after.update(now)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def __enter__(self) -> "ProcessCPU":
        self.before, self._t0 = self.sample(), time.perf_counter()
        self.series, self.after = [(time.time(), self.before)], dict(self.before)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self.wall_s = time.perf_counter() - self._t0

    def window(self, since: float, until: float) -> tuple[float, dict, dict]:
        """(seconds, first sample, last sample): the samples nearest outside ``since`` and ``until`` (the block's
        first and last where the instants lie beyond them), so a window shorter than ``interval`` still has two."""
        first = max((i for i, (t, _) in enumerate(self.series) if t <= since), default=0)
        last = min((i for i, (t, _) in enumerate(self.series) if t >= until), default=len(self.series) - 1)
        return self.series[last][0] - self.series[first][0], self.series[first][1], self.series[last][1]

    def by_name(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        before, after = (self.before, self.after) if since is None else self.window(since, until)[1:]
        out: dict[str, float] = {}
        for pid, (cpu, name) in after.items():
            spent = cpu - before.get(pid, (0.0, name))[0]
            if spent > 0:
                out[name] = out.get(name, 0.0) + spent
        return self.merge_titles(out)

    @staticmethod
    def merge_titles(spent: dict[str, float]) -> dict[str, float]:
        """{name: CPU s} with a process title cut short (Ray's ``ray::RayTrainWo``...) counted under the full one.
        Per block and again over blocks summed: one round's worker can be cut short where another's is not."""
        out = dict(spent)
        for short in sorted(out, key=len):
            full = [n for n in out if n != short and n.startswith(short)]
            if full:
                out[full[0]] += out.pop(short)
        return out
