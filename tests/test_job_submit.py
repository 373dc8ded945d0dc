"""Cluster submission as a user does it: a real head on 127.0.0.1 (`ray start --head`), then
`ray job submit --working-dir . -- python pipelines/train.py --smoke-test`, then the MLflow run is checked."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # The job's `python` must be this interpreter (the one with lade installed), as in an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def head():
    """A head node of its own (own ports, own temp dir), stopped afterwards without touching any other Ray."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--num-cpus", "4", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    log = (Path(temp_dir) / "head.log").read_text()[-3000:]
                    raise RuntimeError("ray head did not come up:\n" + log) from None
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGINT)  # `ray start --block` shuts its node down on interrupt
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: str, entrypoint: list[str]):
    """``ray job submit --working-dir . -- ENTRYPOINT`` from the checkout, waited for: (final status, job logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submit = subprocess.run([RAY, "job", "submit", "--address", head, "--working-dir", ".", "--no-wait",
                             "--", *entrypoint], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    (job_id,) = [w.strip("'") for line in submit.stdout.splitlines() for w in line.split()
                 if w.startswith("'raysubmit_")][:1]
    client = JobSubmissionClient(head)
    deadline = time.time() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    return status, client.get_job_logs(job_id)


def test_ray_job_submit_smoke_run_lands_in_mlflow(head, tmp_path):
    from ray.job_submission import JobStatus

    # The defaults (./mlflow.db, ./outputs) would live in Ray's temporary copy of the package: refused, naming flags.
    status, logs = _submit(head, ["python", "pipelines/train.py", "--smoke-test", "--run-name", "job-defaults"])
    assert status == JobStatus.FAILED, logs[-3000:]
    assert "pass --mlflow-uri, --storage-path with an absolute path" in logs, logs[-3000:]
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray_results"
    status, logs = _submit(head, ["python", "pipelines/train.py", "--smoke-test", "--run-name", "job-smoke",
                                  "--mlflow-uri", f"sqlite:///{db}", "--storage-path", str(storage)])
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "backward_10" in logs  # the final table reached the job's log
    mlflow_client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("lade").experiment_id],
                                       "tags.mlflow.runName = 'job-smoke'")
    assert {"test/top1", "val/top1", "train/lader"} <= set(run.data.metrics)
    assert (storage / "job-smoke").is_dir()  # checkpoints went where the flag said, not into the job's temp dir


def test_cluster_configs_run_the_real_entry_point():
    """The cluster launcher and KubeRay configs parse and point at files that exist in this repository."""
    import yaml

    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("pip install -c cluster/constraints.txt -e ." in c for c in launcher["setup_commands"])
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()))
    job = docs[0]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/app/pipelines/train.py"]
    assert (REPO / entry[entry.index("--config") + 1].removeprefix("/app/")).is_file()
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(entry[entry.index("--num-workers") + 1]) == gpus * workers["replicas"]
    # Token authentication on every node, never disabled; the launcher's dashboard stays on the head's loopback.
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert [c for c in starts if "ray start" in c] and all("RAY_AUTH_MODE=token ray start" in c for c in starts
                                                            if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])
    assert "/home/ubuntu/.ray/auth_token" in launcher["file_mounts"]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    text = (REPO / "cluster" / "aws-gpu.yaml").read_text() + (REPO / "cluster" / "kuberay-rayjob.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "value: disabled" not in text
    # Every raylet keeps Ray Data's task workers warm between epochs, as the local Ray does (worker_soft_limit).
    from lade_core.runtime.local_ray import worker_soft_limit

    assert all("RAY_num_workers_soft_limit=$((2 * $(nproc) + 4))" in c for c in starts if "ray start" in c)
    groups = [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        limit = str(worker_soft_limit(int(container["resources"]["limits"]["cpu"])))
        assert env.get("RAY_num_workers_soft_limit") == limit


def test_cluster_configs_are_locked_down():
    """Pinned code on every node, retries that resume, SSH from one range, least-privilege roles, network policies
    around the Ray pods and the tracking server, and MLflow with authentication."""
    import re

    import yaml

    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    (ssh,) = launcher["provider"]["security_group"]["IpPermissions"]
    assert ssh["FromPort"] == ssh["ToPort"] == 22 and all(r["CidrIp"] != "0.0.0.0/0" for r in ssh["IpRanges"])
    for node in launcher["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert any("--app-name basic-auth" in c for c in launcher["head_setup_commands"])
    # The tracking servers' store is PostgreSQL, reached with a password that is in no URI or command line.
    (mlflow_cmd,) = [c for c in launcher["head_setup_commands"] if "mlflow server" in c]
    assert re.search(r'--backend-store-uri "postgresql\+psycopg://lade@[^:/]+:5432/mlflow\?sslmode=verify-full"',
                     mlflow_cmd), mlflow_cmd
    assert "/home/ubuntu/.pgpass" in launcher["file_mounts"] and "chmod 600 /home/ubuntu/.pgpass" in \
        launcher["head_setup_commands"]
    assert "/home/ubuntu/.mlflow/credentials" in launcher["file_mounts"]
    pins = [line for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", p) for p in pins), pins
    assert {p.split("==")[0].lower() for p in pins} >= {"torch", "torchvision", "ray", "mlflow", "pyarrow", "numpy"}

    docs = {d["kind"] + "/" + d["metadata"]["name"]: d
            for d in yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())}
    job = docs["RayJob/lade-train-imagenet-lt"]
    assert job["spec"]["backoffLimit"] >= 1
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]),
            docs["Deployment/lade-mlflow"]["spec"]["template"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", container["image"]), container["image"]
    (server,) = docs["Deployment/lade-mlflow"]["spec"]["template"]["spec"]["containers"]
    assert "basic-auth" in server["command"]
    store = server["command"][server["command"].index("--backend-store-uri") + 1]
    assert re.fullmatch(r"postgresql\+psycopg://lade@[^:/]+:5432/mlflow\?sslmode=require", store), store
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in server["env"]}
    assert secrets == {"PGPASSWORD": "lade-mlflow-db"}
    ray_pods = {"ray.io/originated-from-cr-name": "lade-train-imagenet-lt"}
    for name, guarded in (("lade-train-imagenet-lt-ray", ray_pods), ("lade-mlflow", {"app": "lade-mlflow"})):
        policy = docs[f"NetworkPolicy/{name}"]["spec"]
        assert policy["podSelector"]["matchLabels"] == guarded and policy["policyTypes"] == ["Ingress"]
        assert [src["podSelector"]["matchLabels"] for rule in policy["ingress"] for src in rule["from"]] == [ray_pods]
    for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
        env = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env
