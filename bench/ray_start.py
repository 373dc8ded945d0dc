"""What a local Ray's start costs with and without Ray's dashboard (issue 24, items 5 and 6).

Each round starts the local Ray the pipelines start (``runtime.init_ray``: loopback, the worker soft limit, lade's
log levels) in a fresh process, once with the dashboard (tune.py, serve.py) and once without (train.py, predict.py,
prepare_data.py), alternating so that a noisy machine hits both alike. Timed in that process: ``init_ray`` itself,
then two tasks that import torch (what every Ray Data and training process of a run does first), then shutdown;
and the machine's CPU seconds (user + nice + system + steal, from /proc/stat) over the whole process.

    python bench/ray_start.py --rounds 3

Prints per round and the medians, then ``ray_start dashboard/none <ratio>`` (start + first tasks, wall) and
``ray_start_cpu dashboard/none <ratio>`` (machine CPU seconds). Run it alone: it starts local Rays.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import ray
from lade_core.runtime.local_ray import init_ray

init_ray(num_cpus=4, dashboard=sys.argv[1] == "True")
t1 = time.perf_counter()


@ray.remote
def first_task() -> int:
    import torch  # noqa: F401  (every data and training process of a run imports it first)

    return os.getpid()


ray.get([first_task.remote() for _ in range(2)])
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(json.dumps({"init": t1 - t0, "tasks": t2 - t1, "shutdown": t3 - t2}))
"""


def machine_cpu_seconds() -> float:
    """user + nice + system + steal of all cores since boot (/proc/stat), in seconds."""
    fields = open("/proc/stat").readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 7)) / os.sysconf("SC_CLK_TCK")


def one_start(dashboard: bool) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    before = machine_cpu_seconds()
    p = subprocess.run([sys.executable, "-c", PROBE, str(dashboard)], env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {**out, "start": out["init"] + out["tasks"], "cpu": machine_cpu_seconds() - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.rounds):
        for dashboard in (True, False):
            t = one_start(dashboard)
            runs[dashboard].append(t)
            print(f"round {r + 1} dashboard={dashboard!s:5}  init {t['init']:5.1f} s  first tasks {t['tasks']:5.1f} s"
                  f"  shutdown {t['shutdown']:4.1f} s  machine CPU {t['cpu']:5.1f} s")

    def median(dashboard: bool, key: str) -> float:
        return statistics.median(t[key] for t in runs[dashboard])

    for dashboard in (True, False):
        print(f"median dashboard={dashboard!s:5}  start + first tasks {median(dashboard, 'start'):5.1f} s  "
              f"machine CPU {median(dashboard, 'cpu'):5.1f} s")
    print(f"ray_start dashboard/none {median(True, 'start') / median(False, 'start'):.2f}")
    print(f"ray_start_cpu dashboard/none {median(True, 'cpu') / median(False, 'cpu'):.2f}")


if __name__ == "__main__":
    main()
