import collections
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Ray >= 2.59 may turn on token auth; the tests run a local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]


class Script:
    """A ``pipelines/`` script driven as a user runs it, in its own process (the tests import only lade_core):
    ``main(argv)`` -> its exit status, its stdout and stderr written to this process's, where capsys reads them."""

    def __init__(self, name: str):
        self.path = REPO / "pipelines" / f"{name}.py"

    def main(self, argv: list[str]) -> int:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        p = subprocess.run([sys.executable, str(self.path), *argv], env=env, capture_output=True, text=True,
                           timeout=600)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        return p.returncode

SHARED_DATA = Path(os.environ.get("LADE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# The published split lists the tests read, committed xz-compressed (their real lines, in their real class-grouped
# order), so that a fresh clone without ../shared runs every test.
FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "shared"


def shared_file(*parts: str) -> Path:
    """A published split list: ../shared/data's copy where the checkout has one, else the committed one."""
    import lzma

    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return path
    unpacked = Path(tempfile.gettempdir()) / f"lade-shared-{os.getuid()}" / Path(*parts)
    if not unpacked.exists():
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        part = unpacked.with_name(f"{unpacked.name}.{os.getpid()}")
        part.write_bytes(lzma.decompress(FIXTURE_DATA.joinpath(*parts[:-1], parts[-1] + ".xz").read_bytes()))
        part.replace(unpacked)  # atomic: concurrent test processes never read half a file
    return unpacked


def split_counts(path: Path) -> list[int]:
    """Class counts of a `<path> <label>` split list, written independently of lade_core's reader."""
    c = collections.Counter(int(line.split()[-1]) for line in path.read_text().splitlines() if line.strip())
    return [c[k] for k in range(max(c) + 1)]


@pytest.fixture(scope="session")
def places_train_counts() -> list[int]:
    return split_counts(shared_file("Places_LT", "Places_LT_train.txt"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module, with spare logical CPUs so Ray Data never starves behind workers.

    Module-scoped: the pipeline tests start their own local Ray in a subprocess, and Ray Train's placement-group
    cleaner finds its cluster through the state API, which refuses to guess when two local clusters are up.
    """
    import ray

    from lade_core.runtime.local_ray import init_ray

    global _RAY_LOCAL_UP
    init_ray(num_cpus=4)
    _RAY_LOCAL_UP = True
    yield ray
    ray.shutdown()
    _RAY_LOCAL_UP = False


_RAY_LOCAL_UP = False


@pytest.fixture(autouse=True)
def no_stray_ray():
    """A test that starts a Ray in the test process outside ``ray_local`` (e.g. a Ray Data call, which starts one
    on its own) fails here: that Ray would outlive the test beside the pipelines' own local Rays, and Ray Train
    cannot tell two local clusters apart (a later Tune test then hung)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not _RAY_LOCAL_UP and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started a Ray in the test process without the ray_local fixture")




def log_small_model(store: Path, experiment: str, tracking_uri: str | None = None, **card_fields):
    """A 3-class resnet32 with seeded random weights logged by today's ``log_classifier`` to ``tracking_uri``
    (default a fresh sqlite store under ``store``): (tracking URI, its ModelInfo). ``card_fields`` add to the card
    (``rules``, ``lade_version``)."""
    import mlflow
    import torch

    from lade_core.models.backbones import build_model
    from lade_core.tracking.model import ModelCard, log_classifier

    uri = tracking_uri or f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    torch.manual_seed(0)
    card = ModelCard("resnet32", 3, ["a", "b", "c"], [0.6, 0.3, 0.1], "lade", "cifar", 16, **card_fields)
    with mlflow.start_run():
        return uri, log_classifier(card, build_model("resnet32", 3).state_dict(), "model")


def free_port() -> int:
    """A free TCP port on the loopback interface (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
def start_mlflow_server(workdir: Path, port: int | None = None, backend_uri: str | None = None,
                        env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on a loopback port (a free one by default), ``backend_uri`` (default a sqlite file)
    and proxied artifacts in ``workdir`` (a second start on the same port and folder is the same server restarted);
    returns it once healthy, with its URI. Its log: ``workdir/mlflow_server.log`` (appended); ``env`` adds to its
    environment."""
    import time
    import urllib.request

    port = port or free_port()
    log = open(workdir / "mlflow_server.log", "a")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", backend_uri or f"sqlite:///{workdir / 'server.db'}",
                               "--artifacts-destination", str(workdir / "server_artifacts"), "--workers", "2"],
                              cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **(env or {})})
    log.close()  # the server holds its own copy
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1).read()
            return server, uri
        except OSError:
            assert server.poll() is None, (workdir / "mlflow_server.log").read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError(f"mlflow server on {uri} did not become healthy")


def stop_mlflow_server(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


class TeamTracking:
    """What a team runs: PostgreSQL on 127.0.0.1 (password auth) and an ``mlflow server`` on it with proxied
    artifacts in ``workdir``. ``uri`` is what every Ray node and script is given."""

    def __init__(self, workdir: Path):
        from postgres import PostgresServer

        self.workdir = workdir
        self.postgres = PostgresServer(free_port())
        self.postgres.start()
        self.postgres.create_database("mlflow")
        self.port = free_port()
        self.start_server()
        self.log = workdir / "mlflow_server.log"

    def start_server(self) -> None:
        """The tracking server (again, on its port). As the README's team setup: no password in the backend URI,
        libpq reads it from the server's PGPASSFILE."""
        passfile = self.postgres.passfile(self.workdir / "pgpass")
        store = self.postgres.uri("mlflow", password=False)
        self.server, self.uri = start_mlflow_server(self.workdir, self.port, store, env={"PGPASSFILE": str(passfile)})

    def stop_server(self) -> None:
        stop_mlflow_server(self.server)

    def close(self) -> None:
        self.stop_server()
        self.postgres.close()


@pytest.fixture(scope="session")
def team_tracking(tmp_path_factory):
    """One PostgreSQL-backed tracking server for the session (each test its own experiment and model names)."""
    team = TeamTracking(tmp_path_factory.mktemp("team"))
    yield team
    team.close()


# Tests that use these start a Ray cluster or a pipeline end to end: marked slow (`pytest -m "not slow"` skips them).
SLOW_FIXTURES = {"ray_local", "smoke_run", "store", "head", "mlflow_server", "team_tracking"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        if "team_tracking" in names:
            item.add_marker(pytest.mark.postgres)


def run_train(workdir: Path, *args: str, timeout: int = 600, num_cpus: str | None = "4") -> subprocess.CompletedProcess:
    """pipelines/train.py --smoke-test as a user runs it: own local Ray (``num_cpus`` logical CPUs, None: the
    script's default), sqlite MLflow in workdir."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cpus = ["--num-cpus", num_cpus] if num_cpus else []
    cmd = [sys.executable, str(REPO / "pipelines" / "train.py"), "--smoke-test", *cpus,
           "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--storage-path", str(workdir / "ray_results"), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def run_predict(workdir: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    """pipelines/predict.py as a user runs it, in its own process (its own local Ray, 4 logical CPUs, where it
    starts one: model actors)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "predict.py"), "--mlflow-uri", uri,
                           "--num-cpus", "4", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def run_prepare(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """pipelines/prepare_data.py as a user runs it, in its own process: no Ray is left running in the test process
    (a second local Ray beside the pipelines' own confuses Ray Train's placement-group cleanup)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "prepare_data.py"), *args, "--num-cpus", "2"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def train_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


# Per-loss train.py flags of the session's smoke runs: a non-default value where the default would hide a bug
# (logit adjustment's tau = 1 is Balanced Softmax; LDAM-DRW's re-weighting must switch on mid-run), and backbones
# other than resnet32 under the heads that replace a model's own classifier: a torchvision model outside the
# classic ResNets under Causal Norm's head, a timm model under LDAM's cosine head (trained, registered, served).
SMOKE_FLAGS = {"logit_adjusted": ["--tau", "0.5"], "focal": ["--gamma", "1"],
               "ldam_drw": ["--epochs", "2", "--drw-epoch", "1", "--model", "timm:test_resnet"],
               "causal_norm": ["--model", "shufflenet_v2_x0_5"],
               # SADE's inverse expert at another strength; BalPoE with mixup (its recipes') and taus whose mean is
               # not 1, so the served model must apply the head's (mean tau - 1) log p_s as training's did.
               "sade": ["--tau", "1.5"], "balpoe": ["--taus", "[0.5, 1, 2]", "--mixup", "0.4"]}


@pytest.fixture(scope="session")
def smoke_run(train_workdir):
    """smoke_run(loss) -> the finished train.py process of run "r-<loss>" (model "model-<loss>"), trained once per
    session (flags: ``SMOKE_FLAGS``) and shared by the training, evaluation, serving and comparison tests."""
    done: dict[str, subprocess.CompletedProcess] = {}

    def get(loss: str) -> subprocess.CompletedProcess:
        if loss not in done:
            done[loss] = run_train(train_workdir, "--loss", loss, "--run-name", f"r-{loss}", "--register",
                                   f"model-{loss}",
                                   *SMOKE_FLAGS.get(loss, []))
            assert done[loss].returncode == 0, done[loss].stdout[-3000:] + done[loss].stderr[-3000:]
        return done[loss]

    return get


def class_png(path: Path, label: int, size: int, rng: np.random.Generator) -> None:
    """A small learnable image: class colour plus noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.array([(37 * label) % 256, (91 * label) % 256, (173 * label) % 256], dtype=np.float64)
    img = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]) written from the PNG specification, big-endian samples."""
    h, w = samples.shape[:2]
    colour = 0 if samples.ndim == 2 else 2
    rows = samples.astype(">u2").reshape(h, -1).tobytes()
    raw = b"".join(b"\x00" + rows[i * len(rows) // h:(i + 1) * len(rows) // h] for i in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_sorted_list_dataset(root: Path, counts: list[int], test_per_class: int = 4, size: int = 20, draw=None,
                              class_dir=lambda c: f"class_{c:02d}", seed: int = 0) -> dict:
    """A split-list dataset in the published layout, lines grouped by class exactly like Places_LT_train.txt;
    ``draw(path, label, size, rng)`` writes each image (default ``class_png``)."""
    rng, lists, draw = np.random.default_rng(seed), {}, draw or class_png
    for split, per in (("train", counts), ("test", [test_per_class] * len(counts))):
        lines = []
        for c, n in enumerate(per):
            for k in range(n):
                rel = f"{split}/{class_dir(c)}/{k:04d}.png"
                draw(root / "images" / rel, c, size, rng)
                lines.append(f"{rel} {c}")
        lists[split] = root / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return lists


def arrow_png(path: Path, direction: int, size: int, rng: np.random.Generator) -> None:
    """An arrow (a filled triangle) pointing left, right, up or down (``direction`` 0..3), at a jittered place
    on a noisy background: a horizontal mirror turns a left arrow into a right one, and nothing else into another
    class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = rng.normal(60, 25, (size, size, 3))
    half = size // 3
    cy, cx = rng.integers(half + 1, size - half - 1, 2)
    ys, xs = np.mgrid[0:size, 0:size]
    u, v = (xs - cx, ys - cy) if direction < 2 else (ys - cy, xs - cx)  # along the arrow, across it
    u = -u if direction in (0, 2) else u  # left / up point towards -x / -y
    inside = (u >= -half) & (u <= half) & (np.abs(v) <= (half - u) / 2)  # wide at the back, a point at the front
    img[inside] = rng.uniform(170, 255, 3)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="PNG")


def write_arrow_dataset(root: Path, counts: list[int], test_per_class: int, size: int = 16) -> dict:
    """``write_sorted_list_dataset``'s published list layout (lines grouped by class) with arrow images."""
    return write_sorted_list_dataset(root, counts, test_per_class, size, draw=arrow_png, seed=1,
                                     class_dir=lambda c: ["left", "right", "up", "down"][c])


def wait_for(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def train_worker_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"RayTrainWorker" in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids
