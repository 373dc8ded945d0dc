"""A local Ray started by the pipelines (``runtime.init_ray``) serves this machine alone: its node address is
127.0.0.1 and every socket its processes listen on is a loopback one, read from the kernel's own tables; and its
driver prints the raylet's worker-pool notice only when verbose."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# Runs in a process of its own (the only Ray on the machine while it runs): starts the local Ray the pipelines
# start (with the dashboard, as tune.py and serve.py do, or without, as the others do), runs a task (so a worker
# process listens too), prints the node address and each listening socket of its process tree as "ip pid".
PROBE = r'''
import os, socket, struct, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from lade_core.runtime.local_ray import init_ray

init_ray(num_cpus=1, dashboard=DASHBOARD)
ray.get(ray.remote(lambda: os.getpid()).remote())
time.sleep(2)
children = {}
for d in filter(str.isdigit, os.listdir("/proc")):
    try:
        ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        continue
    children.setdefault(ppid, []).append(int(d))
tree, todo = set(), [os.getpid()]
while todo:
    pid = todo.pop()
    tree.add(pid)
    todo += children.get(pid, [])
inodes = {}
for pid in tree:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    except OSError:
        pass
def ip(hex_addr, family):
    raw = bytes.fromhex(hex_addr)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[::-1])
    return socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            print("listen", ip(f[1].split(":")[0], family), inodes[f[9]])
print("node", ray.nodes()[0]["NodeManagerAddress"])
ray.shutdown()
'''


@pytest.mark.parametrize("dashboard", [False, True])
def test_a_local_ray_listens_on_loopback_only(dashboard):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", PROBE.replace("DASHBOARD", str(dashboard))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line.split() for line in p.stdout.splitlines()]
    listening = [(addr, int(pid)) for kind, addr, *rest in lines if kind == "listen" for pid in rest]
    assert ["node", "127.0.0.1"] in lines, p.stdout
    assert len({pid for _, pid in listening}) >= 3, p.stdout  # the GCS, the raylet, workers and agents
    assert {addr for addr, _ in listening} <= LOOPBACK, p.stdout


# Starts more worker processes than 4x a 1-CPU node's startup concurrency (actors of no CPU, as Ray Train's and Ray
# Data's own are), so that the raylet pushes its worker-pool notice to this driver; waits for it to arrive.
CROWD = r'''
import os, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from lade_core.runtime.local_ray import init_ray, quiet_logging

quiet_logging(verbose=VERBOSE)
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
class Idle:
    def pid(self):
        return os.getpid()

actors = [Idle.remote() for _ in range(12)]
print("pids", len(set(ray.get([a.pid.remote() for a in actors]))), flush=True)
time.sleep(3)
ray.shutdown()
'''


@pytest.mark.parametrize("verbose", [False, True])
def test_the_raylet_worker_pool_notice_is_shown_only_when_verbose(verbose):
    """On a small machine a single run's Ray Train and Ray Data start more Python workers than the raylet expects
    (4x min(cores, CPUs)); its notice names nothing a user can change, so a local Ray's driver drops it unless
    ``--verbose``. Verbose is the control: the same crowd makes the raylet say it."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", CROWD.replace("VERBOSE", str(verbose))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pids 12" in p.stdout, p.stdout
    assert ("worker processes have been started on node" in p.stdout + p.stderr) == verbose, p.stdout[-3000:]
