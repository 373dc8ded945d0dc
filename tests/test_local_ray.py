"""A local Ray started by the pipelines (``runtime.init_ray``) serves this machine alone: its node address is
127.0.0.1 and every socket its processes listen on is a loopback one, read from the kernel's own tables."""
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
from lade_core.runtime import init_ray

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
