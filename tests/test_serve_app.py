"""pipelines/serve.py as a user runs it: a real Ray Serve application on 127.0.0.1 with two replicas, real HTTP from
several client threads, the same answers as lade's own model, bad payloads answered 400 with one line, and one
online prior estimate shared by the replicas; the model registered on the team's tracking server (MLflow on
PostgreSQL, conftest.team_tracking)."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, free_port, log_small_model
from lade_core.tracking.model import load_classifier

pytestmark = pytest.mark.slow  # a Ray and a Serve application in a subprocess: about a minute


def _png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _call(base: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None or "reset" in path else
                                 "GET", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory, team_tracking):
    """serve.py on a model registered on the team's tracking server (PostgreSQL-backed, proxied artifacts)."""
    tmp = tmp_path_factory.mktemp("serve")
    uri, info = log_small_model(tmp, "serve", team_tracking.uri, rules=["inject", "raw"])
    mlflow.register_model(info.model_uri, "served")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "LADE_MAX_ROWS_PER_REQUEST": "8",
           "LADE_MAX_IMAGE_MEGAPIXELS": "0.01"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "serve.py"), "--model", "models:/served/1",
                             "--mlflow-uri", uri, "--port", str(port), "--num-replicas", "2", "--window", "40",
                             "--warmup", "20", "--change-test", "off", "--num-cpus", "4"], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if _call(base, "/prior")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"serve.py did not come up: {(tmp / 'serve.log').read_text()[-3000:]}")
        time.sleep(1)
    yield base, uri
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_concurrent_requests_get_the_models_own_answers(served):
    base, uri = served
    model = load_classifier("models:/served/1", uri)
    prior = [0.2, 0.3, 0.5]

    def ask(i):
        images = [_png(10 * i + j) for j in range(1 + i % 4)]
        status, body = _call(base, "/predict", {"images": [_b64(b) for b in images], "target_prior": prior,
                                                "top_k": 2})
        return images, status, body

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    for images, status, body in answers:
        assert status == 200, body
        want = model.predict(None, pd.DataFrame({"image": images}), {"target_prior": prior})
        got = body["predictions"]
        assert [p["label"] for p in got] == want["label"].tolist()
        np.testing.assert_allclose([p["probabilities"] for p in got], np.stack(want["probabilities"]), atol=1e-5)
        assert all(len(p["top_k"]) == 2 and p["top_k"][0]["label"] == p["label"] for p in got)
        assert body["prior"]["used"] == "given"


@pytest.mark.parametrize("payload, message", [
    ({"images": [_b64(_png(1))], "target_prior": [0.5, 0.5]}, "target_prior has wrong length: 2 entries for 3"),
    ({"images": ["not base64!"]}, "images[0] is not a base64 string"),
    ({"images": [_b64(_png(i)) for i in range(9)]}, "9 images in one request; at most 8"),
    ({"images": [_b64(_png(1, size=200))]}, "images[0]: image does not decode"),  # 0.04 MP over the 0.01 cap
    ({"images": [_b64(_png(1))], "output": "everything"}, "output 'everything': choose one of"),
    ({"images": [_b64(_png(1))], "top_k": 4}, "top_k must be an integer in [1, 3]"),
    ({"image": [_b64(_png(1))]}, "unknown keys ['image']"),
])
def test_a_bad_payload_is_a_400_with_one_line(served, payload, message):
    status, body = _call(served[0], "/predict", payload)
    assert status == 400 and message in body["error"] and "\n" not in body["error"], body


def test_the_replicas_share_one_online_estimate(served):
    base, _ = served
    assert _call(base, "/prior/reset")[1]["n"] == 0
    status, body = _call(base, "/predict", {"images": [_b64(_png(100))], "target_prior": "online"})
    assert status == 200 and body["prior"]["used"].startswith("uniform")  # warming up: under 20 images

    def ask(i):
        return _call(base, "/predict", {"images": [_b64(_png(200 + 2 * i)), _b64(_png(201 + 2 * i))]})

    with ThreadPoolExecutor(6) as pool:
        assert all(s == 200 for s, _ in pool.map(ask, range(12)))  # 24 images over both replicas
    deadline = time.time() + 30
    while (state := _call(base, "/prior")[1])["seen"] < 25 and time.time() < deadline:
        time.sleep(0.2)  # updates are sent without waiting for them
    assert state["seen"] == 25 and state["n"] == 25 and state["trusted"]  # every replica's traffic, in one estimate
    assert sum(state["prior"]) == pytest.approx(1.0) and len(state["std"]) == 3
    images = [_b64(_png(999))]
    online = _call(base, "/predict", {"images": images, "target_prior": "online", "output": "logits"})[1]
    given = _call(base, "/predict", {"images": images, "target_prior": state["prior"], "output": "logits"})[1]
    assert online["prior"]["used"] == "online"
    np.testing.assert_allclose(online["predictions"][0]["logits"], given["predictions"][0]["logits"], atol=1e-9)
