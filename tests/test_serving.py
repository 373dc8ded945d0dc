"""The registered model under any target prior: the MLflow pyfunc in process, pipelines/predict.py (the model in
its own process, or on Ray Data's actors), and `mlflow models serve` over REST; all on the models of real tiny
training runs (session fixture ``smoke_run``), checked against the run's stored test logits and Eq. 6 / Eq. 17
computed here."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import free_port, run_predict
from lade_core.math.label_shift import Calibration, estimate_target_prior, fit_calibration, source_logits
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, PRIOR_ARTIFACT, VAL_LOGITS_ARTIFACT, read_logits_parquet

LOSSES = ("lade", "softmax")


@pytest.fixture(scope="module")
def store(train_workdir, smoke_run):
    for loss in LOSSES:
        smoke_run(loss)
    uri = f"sqlite:///{train_workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lade").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    return uri, client, runs, train_workdir / "data" / "synthetic_smoke"


def _download(client, run_id, path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=client.tracking_uri)


def _stored(client, run_id):
    """The run's test logits [N, C] (split order), labels, and source prior, as training stored them."""
    logits, labels = read_logits_parquet(_download(client, run_id, LOGITS_ARTIFACT))
    ps = torch.tensor(json.loads(open(_download(client, run_id, PRIOR_ARTIFACT)).read())["source_prior"],
                      dtype=torch.float64)
    return logits.double(), labels, ps


def _expected_logits(loss, logits, ps, pt):
    """Eq. 17 (LADE: z + log p_t) or Eq. 4 (softmax: PC, z - log p_s + log p_t), written here."""
    return logits + torch.log(pt) - (torch.log(ps) if loss == "softmax" else 0)


def _expected_probabilities(loss, logits, ps, pt):
    return torch.softmax(_expected_logits(loss, logits, ps, pt), 1)


def _test_images(data_dir):
    """The prepared test split's encoded images as stored, and each row's position in the split."""
    t = pq.read_table(str(data_dir / "test"), columns=["image", "index"])
    return t.column("image").to_pylist(), np.asarray(t.column("index").to_pylist())


def _png(colour, size=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("loss", LOSSES)
def test_pyfunc_answers_under_any_target_prior(store, loss):
    uri, client, runs, data_dir = store
    logits, labels, ps = _stored(client, runs[f"r-{loss}"])
    images, index = _test_images(data_dir)
    model = mlflow.pyfunc.load_model(f"models:/model-{loss}/1")
    pt = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample()
    pt = pt / pt.sum()
    out = model.predict(pd.DataFrame({"image": images}), params={"target_prior": pt.tolist()})
    expected = _expected_probabilities(loss, logits[index], ps, pt)
    np.testing.assert_allclose(np.stack(out["probabilities"]), expected.numpy(), atol=2e-4)
    assert (out["label"].to_numpy() == expected.argmax(1).numpy()).mean() > 0.97  # float32 ties aside
    # The post-hoc logits themselves: a tiny model's probabilities saturate and would hide a per-class offset.
    out = model.predict(pd.DataFrame({"image": images}), params={"target_prior": pt.tolist(), "output": "logits"})
    np.testing.assert_allclose(np.stack(out["logits"]), _expected_logits(loss, logits[index], ps, pt).numpy(),
                               rtol=1e-4, atol=1e-3)
    # Default params: uniform target, the loss's own rule; output=label has no probability column.
    uniform = model.predict(pd.DataFrame({"image": images[:8]}), params={"output": "label"})
    assert list(uniform.columns) == ["label", "class_name"]
    flat = torch.full((4,), 0.25, dtype=torch.float64)
    expected = _expected_probabilities(loss, logits[index[:8]], ps, flat).argmax(1)
    np.testing.assert_array_equal(uniform["label"], expected)
    assert uniform["class_name"].tolist() == [f"class_{k}" for k in uniform["label"]]
    # The model card carries the source prior and the BCTS fitted on the validation split (20 images per class).
    card = model.unwrap_python_model().card
    np.testing.assert_allclose(card.source_prior, ps.numpy())
    assert card.loss == loss and card.posthoc == ("pc" if loss == "softmax" else "inject")
    val_logits, val_labels = read_logits_parquet(_download(client, runs[f"r-{loss}"], VAL_LOGITS_ARTIFACT))
    ref = fit_calibration(source_logits(val_logits, ps, loss), val_labels, ps)
    assert card.calibration["temperature"] == pytest.approx(ref.temperature, rel=1e-4)
    np.testing.assert_allclose(card.calibration["bias"], ref.bias.numpy(), atol=1e-4)
    assert card.class_names == [f"class_{k}" for k in range(4)]


def test_pyfunc_refuses_bad_input_by_name(store):
    from lade_core.tracking.model import load_classifier

    model = mlflow.pyfunc.load_model("models:/model-lade/1")
    good = pd.DataFrame({"image": [_png(10), _png(200)]})
    for prior, message in (([0.5, 0.5], "wrong length"), ([0.5, -0.1, 0.3, 0.3], "negative"),
                           ([float("nan"), 0.2, 0.4, 0.4], "NaN"), ([0, 0, 0, 0], "sum")):
        with pytest.raises(Exception, match=message):
            model.predict(good, params={"target_prior": prior})
    with pytest.raises(Exception, match="posthoc 'pc' does not fit a lade model"):
        model.predict(good, params={"posthoc": "pc"})
    bad = pd.DataFrame({"image": [_png(10), b"not an image", _png(90)]})
    with pytest.raises(ValueError, match=r"1 of 3 images do not decode \(row 1"):
        model.predict(bad)
    out = model.predict(bad, params={"skip_bad": True})
    assert out["label"].tolist()[1] == -1 and "does not decode" in out["error"][1] and out["label"][0] >= 0
    with pytest.raises(ValueError, match="alias champion not found"):
        load_classifier("models:/model-lade@champion")
    with pytest.raises(ValueError, match="cannot load models:/no-such-model/1"):
        load_classifier("models:/no-such-model/1")
    with mlflow.start_run(experiment_id=mlflow.set_experiment("other-tool").experiment_id):
        other = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="m",
                                         input_example=np.zeros((1, 2), np.float32)).model_uri
    with pytest.raises(ValueError, match="not a lade model"):
        load_classifier(other)


REST_MAX_ROWS = 16  # the served model's cap on rows per request in the REST test


def _serve(uri, model_uri, log_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "LADE_MAX_ROWS_PER_REQUEST": str(REST_MAX_ROWS)}
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--host",
                               "127.0.0.1", "--port", str(port), "--env-manager", "local"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).read()
            return server, port, log
        except OSError:
            assert server.poll() is None, open(log_path).read()[-3000:]
            time.sleep(0.5)
    raise AssertionError(open(log_path).read()[-3000:])


def test_rest_server_answers_like_the_pyfunc(store, tmp_path):
    uri, client, runs, data_dir = store
    images, _ = _test_images(data_dir)
    images = images[::7]
    pt = [0.1, 0.2, 0.3, 0.4]
    local = mlflow.pyfunc.load_model("models:/model-lade/1").predict(pd.DataFrame({"image": images}),
                                                                      params={"target_prior": pt})
    server, port, log = _serve(uri, "models:/model-lade/1", tmp_path / "serve.log")
    try:
        def post(body):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        b64 = [base64.b64encode(im).decode() for im in images]
        status, answer = post({"dataframe_split": {"columns": ["image"], "data": [[x] for x in b64]},
                               "params": {"target_prior": pt}})
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        assert served["label"].tolist() == local["label"].tolist()
        np.testing.assert_allclose(np.stack(served["probabilities"]), np.stack(local["probabilities"]), atol=1e-6)
        # Bad input is a 400 that names the problem, without the server's stack trace: a malformed prior, more rows
        # than the cap, an image over the pixel cap.
        bomb = io.BytesIO()
        Image.new("L", (9000, 9000)).save(bomb, format="PNG")
        for body, message in (
                ({"dataframe_split": {"columns": ["image"], "data": [[b64[0]]]},
                  "params": {"target_prior": [0.5, 0.5]}}, "wrong length"),
                ({"dataframe_split": {"columns": ["image"], "data": [[b64[0]]] * (REST_MAX_ROWS + 1)}},
                 f"{REST_MAX_ROWS + 1} rows in one request; at most {REST_MAX_ROWS}"),
                ({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(bomb.getvalue()).decode()]]}},
                 "9000 x 9000 pixels is over the 40-megapixel limit")):
            status, answer = post(body)
            assert status == 400 and message in answer["message"], answer
            assert not answer.get("stack_trace") and "Traceback" not in json.dumps(answer), answer
        # An animated GIF answers with its first frame's prediction, like the same image as a PNG.
        frames = [Image.open(io.BytesIO(images[0])).convert("RGB"), Image.new("RGB", (20, 20), (250, 0, 0))]
        gif = io.BytesIO()
        frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
        status, answer = post({"dataframe_split": {"columns": ["image"],
                                                   "data": [[base64.b64encode(gif.getvalue()).decode()]]}})
        assert status == 200 and len(answer["predictions"]) == 1 and answer["predictions"][0]["label"] >= 0, answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_predict_pipeline_on_a_prepared_split_with_a_given_and_an_estimated_prior(store, tmp_path):
    uri, client, runs, data_dir = store
    logits, labels, ps = _stored(client, runs["r-lade"])
    prior_file = tmp_path / "pt.json"
    pt = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    prior_file.write_text(json.dumps({"prior": pt.tolist()}))
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(data_dir), "--split", "test",
                 "--output", str(tmp_path / "given.parquet"), "--target-prior", str(prior_file), "--num-workers", "2",
                 "--top-k", "3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "80 images" in p.stdout and "top-1" in p.stdout
    assert "model: 2 Ray actors" in p.stdout  # read by Ray Data into the actor pool
    out = pq.read_table(tmp_path / "given.parquet").to_pandas()
    assert out["row"].tolist() == list(range(80))  # one row per image, in split order
    expected = _expected_probabilities("lade", logits, ps, pt)
    top = expected.topk(3, dim=1)
    np.testing.assert_allclose(np.stack(out["top_k_probabilities"]), top.values.numpy(), atol=2e-4)
    assert (np.stack(out["top_k_labels"])[:, 0] == top.indices[:, 0].numpy()).mean() > 0.97
    assert out["true_label"].tolist() == labels.tolist()
    # An existing output is never overwritten silently.
    again = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(data_dir),
                     "--output", str(tmp_path / "given.parquet"))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    # The estimated prior: by default the one of EM, MAPLS and the Dirichlet MAP that best predicts held-out images,
    # on the images' own outputs with the card's calibration, logged to lade-predict.
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(data_dir),
                 "--output", str(tmp_path / "est.csv"), "--target-prior", "estimate")
    assert p.returncode == 0, p.stderr[-3000:]
    # The default on one node without GPUs: the split read and the model run in predict.py's own process.
    assert "model: in this process" in p.stdout and "Ray not started" in p.stdout, p.stdout
    est = json.loads((tmp_path / "est.target_prior.json").read_text())
    card = mlflow.pyfunc.load_model("models:/model-lade/1").unwrap_python_model().card
    calibration = Calibration.from_dict(card.calibration) if card.calibration else None
    ref, ref_info = estimate_target_prior(logits.float(), ps, loss="lade", method="auto", calibration=calibration)
    np.testing.assert_allclose(est["prior"], ref.numpy(), atol=1e-3)
    scores = est["chosen_by"]["scores"]
    assert est["method"] == ref_info["method"] == max(scores, key=scores.get) and set(scores) == {"em", "mapls",
                                                                                                  "dirichlet"}
    assert f"estimated target prior ({est['method']}, chosen by held-out likelihood per image" in p.stdout
    # Beside it: its 90 % bootstrap intervals per class and the expected top-1 gain over uniform with its interval.
    iv = est["interval"]
    assert iv["level"] == 0.9 and iv["n_boot"] >= 100 and len(iv["lower"]) == len(iv["upper"]) == 4
    assert all(lo - 1e-9 <= x <= hi + 1e-9 for lo, x, hi in zip(iv["lower"], est["prior"], iv["upper"]))
    assert iv["gain"]["lower"] <= iv["gain"]["estimate"] <= iv["gain"]["upper"]
    assert "expected top-1 gain over uniform" in p.stdout
    # The store is the session's: other prediction jobs (test_peers_pipeline's aggregation) log there too.
    logged = client.search_runs([client.get_experiment_by_name("lade-predict").experiment_id],
                                "params.estimate_method = 'auto'")
    assert len(logged) == 1 and logged[0].data.params["method"] == est["method"]
    assert logged[0].data.metrics["gain/estimate"] == pytest.approx(iv["gain"]["estimate"])
    csv = pd.read_csv(tmp_path / "est.csv")
    expected = _expected_probabilities("lade", logits, ps, torch.tensor(est["prior"], dtype=torch.float64))
    np.testing.assert_allclose(csv["probability"], expected.max(1).values.numpy(), atol=2e-4)


def test_predict_pipeline_on_an_image_folder_reports_bad_images(store, tmp_path):
    uri, *_ = store
    folder = tmp_path / "photos"
    for k, colour in enumerate((10, 200, 90)):
        (folder / f"class_{k}").mkdir(parents=True)
        (folder / f"class_{k}" / "a.png").write_bytes(_png(colour))
    (folder / "unsorted").mkdir()
    (folder / "unsorted" / "b.png").write_bytes(_png(30))
    (folder / "unsorted" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(folder), "--output",
                 str(tmp_path / "x.parquet"))
    assert p.returncode == 2 and "broken.jpg" in p.stderr and "--skip-bad" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "x.parquet").exists()
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(folder), "--output",
                 str(tmp_path / "x.parquet"), "--skip-bad")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 not decoded" in p.stdout
    out = pq.read_table(tmp_path / "x.parquet").to_pandas().set_index("path")
    assert out.loc[str(folder / "unsorted" / "broken.jpg"), "label"] == -1
    assert "does not decode" in out.loc[str(folder / "unsorted" / "broken.jpg"), "error"]
    assert out.loc[str(folder / "class_1" / "a.png"), "true_label"] == 1  # the folder names the class
    unsorted = str(folder / "unsorted" / "b.png")
    assert out.loc[unsorted, "true_label"] == -1 and out.loc[unsorted, "label"] >= 0
    # An estimate over fewer images than classes is refused by name.
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(folder / "unsorted"), "--output",
                 str(tmp_path / "y.parquet"), "--skip-bad", "--target-prior", "estimate")
    assert p.returncode == 2 and "at least 4 unlabeled samples; got 1" in p.stderr, p.stderr[-3000:]


def test_predict_pipeline_with_test_time_ensembling(store, tmp_path):
    from lade_core.data.transforms import decode_rgb, tta_views
    from lade_core.tracking.model import load_classifier

    uri, client, runs, data_dir = store
    _, labels, ps = _stored(client, runs["r-lade"])
    pt = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    (tmp_path / "pt.json").write_text(json.dumps(pt.tolist()))
    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(data_dir), "--split", "test",
                    "--output", str(tmp_path / "tta.parquet"), "--target-prior", str(tmp_path / "pt.json"),
                    "--tta", "five_crop", "--top-k", "4")  # in this process: the actors' path is the same call
    assert p.returncode == 0, p.stderr[-3000:]
    out = pq.read_table(tmp_path / "tta.parquet").to_pandas()
    # Here: the five crops of each image through the model, their softmax averaged, then Eq. 17 with p_t.
    model = load_classifier("models:/model-lade/1", uri)
    images, index = _test_images(data_dir)
    order = np.argsort(index)
    decoded = [decode_rgb(images[i]) for i in order]
    views = tta_views(decoded, model.card.transform, model.card.image_size, "five_crop")
    posterior = torch.stack([torch.softmax(model.logits(v).double(), 1) for v in views]).mean(0)
    expected = torch.softmax(torch.log(posterior) + torch.log(pt), 1)
    top = expected.topk(4, dim=1)
    np.testing.assert_allclose(np.stack(out["top_k_probabilities"]), top.values.numpy(), atol=2e-4)
    plain = _expected_probabilities("lade", _stored(client, runs["r-lade"])[0], ps, pt)
    assert not np.allclose(np.stack(out["top_k_probabilities"]), plain.topk(4, dim=1).values.numpy(), atol=1e-3)
    assert out["true_label"].tolist() == labels.tolist()
    bad = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--input", str(data_dir), "--output",
                      str(tmp_path / "x.parquet"), "--tta", "flip", "--aggregate", "self-supervised")
    assert bad.returncode == 2 and "does not take --tta" in bad.stderr
