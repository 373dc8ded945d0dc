"""pipelines/evaluate.py and pipelines/compare.py on runs produced by real tiny training jobs (shared with
test_train through the session fixture ``smoke_run``), against a direct lade_core computation."""
import csv
import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import Script
from lade_core.math.evaluation import protocol_targets
from lade_core.math.metrics import expected_calibration_error, nll, shot_accuracies
from lade_core.math.posthoc import posthoc_logits
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, PRIOR_ARTIFACT, read_logits_parquet

FIGURES = ("reliability", "predicted_prior", "logits", "accuracy_vs_shift")
compare, evaluate = Script("compare"), Script("evaluate")


@pytest.fixture(scope="module")
def store(train_workdir, smoke_run):
    smoke_run("lade")
    smoke_run("softmax")
    uri = f"sqlite:///{train_workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("lade")
    ids = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    return uri, client, ids


def _download(client, run_id, path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=client.tracking_uri)


def _table(client, run_id, path):
    return pd.read_json(_download(client, run_id, path), orient="split")


def _direct_rows(client, run_id, modes):
    logits, labels = read_logits_parquet(_download(client, run_id, LOGITS_ARTIFACT))
    info = json.loads(open(_download(client, run_id, PRIOR_ARTIFACT)).read())
    ps, counts = torch.tensor(info["source_prior"], dtype=torch.float64), info["train_counts"]
    out = {}
    for t in protocol_targets(labels, counts, knockouts=True):
        idx = torch.as_tensor(t.indices)
        for mode in modes:
            z, y = posthoc_logits(logits[idx].double(), mode, ps, t.prior), labels[idx]
            acc = shot_accuracies(z.argmax(1), y, counts)
            out[(t.name, mode)] = {"top1": acc["all"], "medium": acc["medium"], "few": acc["few"], "nll": nll(z, y),
                                   "ece": expected_calibration_error(torch.softmax(z, 1), y)}
    return out


def test_evaluate_logs_the_direct_computation_and_is_idempotent(store, capsys):
    uri, client, ids = store
    rid = ids["r-lade"]
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "backward_50" in printed and "inject" in printed
    metrics = client.get_run(rid).data.metrics
    direct = _direct_rows(client, rid, ("inject", "raw"))
    assert len(direct) == 34  # 11 shifted priors and 6 knock-outs, 2 rules
    for (target, mode), want in direct.items():
        for k, v in want.items():
            if not np.isnan(v):
                assert metrics[f"shift/{target}/{mode}/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-5), (target, mode, k)
    table = _table(client, rid, "eval/shift_table.json")
    assert len(table) == 34 and set(table["mode"]) == {"inject", "raw"}
    # Rerun: the same values, no metric history added, the table not appended to.
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri]) == 0
    assert "0 metrics written" in capsys.readouterr().out
    for key in ("shift/backward_10/inject/top1", "shift/uniform/raw/nll", "shift/forward_50/inject/ece"):
        assert len(client.get_metric_history(rid, key)) == 1
    assert len(_table(client, rid, "eval/shift_table.json")) == 34
    assert client.get_run(rid).data.metrics == metrics


def test_figures_are_real_pngs(store, tmp_path):
    uri, client, ids = store
    rid = ids["r-lade"]
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri]) == 0
    for name in FIGURES:
        path = _download(client, rid, f"eval/figures/{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape[0] >= 300 and img.shape[1] >= 500, name
        # Not blank: many distinct colours and real contrast.
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50 and img.std() > 20, name


def test_model_uri_and_user_priors(store, tmp_path, capsys):
    uri, client, ids = store
    (tmp_path / "mine.json").write_text(json.dumps({"counts": [10, 5, 2, 1]}))
    (tmp_path / "rev.csv").write_text("class,p\n0,0.1\n1,0.2\n2,0.3\n3,0.4\n")
    args = ["--model", "models:/model-softmax/1", "--mlflow-uri", uri, "--no-figures",
            "--target-prior", str(tmp_path / "mine.json"), "--target-prior", str(tmp_path / "rev.csv")]
    assert evaluate.main(args) == 0
    metrics = client.get_run(ids["r-softmax"]).data.metrics
    assert {"shift/mine/pc/top1", "shift/rev/raw/ece", "shift/backward_50/pc/top1"} <= set(metrics)
    # The user's counts select exactly those test samples: recompute top-1 for "mine" under PC.
    logits, labels = read_logits_parquet(_download(client, ids["r-softmax"], LOGITS_ARTIFACT))
    info = json.loads(open(_download(client, ids["r-softmax"], PRIOR_ARTIFACT)).read())
    idx = np.concatenate([np.nonzero(labels.numpy() == c)[0][:n] for c, n in enumerate([10, 5, 2, 1])])
    p_t = torch.tensor([10, 5, 2, 1], dtype=torch.float64) / 18
    z = posthoc_logits(logits[idx].double(), "pc", info["source_prior"], p_t)
    assert metrics["shift/mine/pc/top1"] == pytest.approx(float((z.argmax(1) == labels[idx]).double().mean()))


@pytest.mark.parametrize("make_args, message", [
    (lambda d, ids: ["--run-id", "0" * 32], "unknown run id"),
    (lambda d, ids: ["--model", "models:/model-lade@nope"], "unknown model 'models:/model-lade@nope'"),
    (lambda d, ids: ["--run-id", ids["bare"]], "has no eval/test_logits.parquet artifact"),
    (lambda d, ids: ["--run-id", ids["r-lade"], "--target-prior", str(d / "short.json")],
     "wrong length: 3 entries for 4 classes"),
    (lambda d, ids: ["--run-id", ids["r-lade"], "--target-prior", str(d / "neg.json")],
     "negative at class indices [1]"),
    (lambda d, ids: ["--run-id", ids["r-lade"], "--target-prior", str(d / "nan.csv")], "NaN"),
    (lambda d, ids: ["--run-id", ids["r-lade"], "--target-prior", str(d / "big.json")],
     "asks for more test samples than exist"),
])
def test_bad_input_is_one_clear_error(store, tmp_path, capsys, make_args, message):
    uri, client, ids = store
    with mlflow.start_run(run_name="bare", experiment_id=client.get_experiment_by_name("lade").experiment_id) as bare:
        pass
    (tmp_path / "short.json").write_text("[0.2, 0.3, 0.5]")
    (tmp_path / "neg.json").write_text('{"prior": [0.5, -0.1, 0.3, 0.3]}')
    (tmp_path / "nan.csv").write_text("0.5\nnan\n0.25\n0.25\n")
    (tmp_path / "big.json").write_text('{"counts": [21, 1, 1, 1]}')
    before = client.get_run(ids["r-lade"]).data.metrics
    assert evaluate.main([*make_args(tmp_path, {**ids, "bare": bare.info.run_id}), "--mlflow-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert client.get_run(ids["r-lade"]).data.metrics == before  # nothing logged
    client.delete_run(bare.info.run_id)


def test_compare_lists_both_runs(store, capsys):
    uri, client, ids = store
    assert compare.main(["--run-ids", ids["r-softmax"], ids["r-lade"], "--mlflow-uri", uri, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # One row per post-hoc rule that fits each run, its own first; the tuned post-hoc logit adjustment and τ-norm
    # for the softmax model (tests/test_peers_pipeline.py recomputes them).
    assert [(r["loss"], r["posthoc"].split(" ")[0]) for r in rows] == [
        ("softmax", "pc"), ("softmax", "raw"), ("softmax", "adjusted"), ("softmax", "tau_norm"), ("lade", "inject"),
        ("lade", "raw")]
    assert list(rows[0])[3:14] == ["forward_50", "forward_25", "forward_10", "forward_5", "forward_2", "uniform",
                                   "backward_2", "backward_5", "backward_10", "backward_25", "backward_50"]
    direct = _direct_rows(client, ids["r-lade"], ("inject",))
    for name in ("uniform", "backward_50", "forward_10", "knockout_head_50", "knockout_random_25"):
        assert float(rows[4][name]) == pytest.approx(direct[(name, "inject")]["top1"])
    # The mean over the 11 shifted priors and the 6 knock-outs.
    assert float(rows[4]["mean"]) == pytest.approx(np.mean([v["top1"] for v in direct.values()]))
    assert float(rows[4]["ece"]) == pytest.approx(direct[("uniform", "inject")]["ece"])
    # Logged as a table in the comparison experiment.
    exp = client.get_experiment_by_name("lade-compare")
    (logged,) = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
    assert len(_table(client, logged.info.run_id, "compare.json")) == 6
    # An experiment: every run with logits, runs without are left out; markdown by default.
    assert compare.main(["--experiment", "lade", "--mlflow-uri", uri, "--no-log"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| ") and "r-softmax" in out and "r-lade" in out


def test_local_logits_file(store, tmp_path, capsys):
    uri, client, ids = store
    logits_file = _download(client, ids["r-lade"], LOGITS_ARTIFACT)
    info = _download(client, ids["r-lade"], PRIOR_ARTIFACT)
    out = tmp_path / "out"
    assert evaluate.main(["--logits", logits_file, "--source-info", info, "--loss", "lade", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "shift_table.csv")))
    metrics = client.get_run(ids["r-lade"]).data.metrics
    assert len(rows) == 34 and all((out / f"{n}.png").is_file() for n in FIGURES)
    back = next(r for r in rows if r["target"] == "backward_10" and r["mode"] == "inject")
    assert float(back["top1"]) == pytest.approx(metrics["shift/backward_10/inject/top1"])


# EM's path is the compare test's below (--estimate-prior em): the same code with another method name.
@pytest.mark.parametrize("method", ["mapls", "bbse"])
def test_estimated_prior_columns_against_a_direct_estimate(store, capsys, method):
    """evaluate.py --estimate-prior: per target, top-1 under the prior estimated from the target's own logits,
    recomputed here from the stored test and validation logits with lade_core.math.label_shift and Eq. 17; the
    knock-outs included."""
    from lade_core.math.label_shift import estimate_target_prior
    from lade_core.tracking.artifacts import VAL_LOGITS_ARTIFACT

    uri, client, ids = store
    rid = ids["r-lade"]
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri, "--no-figures", "--estimate-prior", method,
                          "--calibration", "none"]) == 0
    assert "uncalibrated posteriors" in capsys.readouterr().out
    logits, labels = read_logits_parquet(_download(client, rid, LOGITS_ARTIFACT))
    val_logits, val_labels = read_logits_parquet(_download(client, rid, VAL_LOGITS_ARTIFACT))
    info = json.loads(open(_download(client, rid, PRIOR_ARTIFACT)).read())
    ps, counts = torch.tensor(info["source_prior"], dtype=torch.float64), info["train_counts"]
    metrics = client.get_run(rid).data.metrics
    table = _table(client, rid, f"eval/estimate_{method}-raw.json").set_index("target")
    for t in protocol_targets(labels, counts, knockouts=True):
        idx = torch.as_tensor(t.indices)
        est, _ = estimate_target_prior(logits[idx], ps, loss="lade", method=method, val_logits=val_logits,
                                       val_labels=val_labels)
        z, y = logits[idx].double(), labels[idx]
        top1 = lambda p: float(((z + p.log()).argmax(1) == y).double().mean())  # noqa: E731  (Eq. 17)
        assert table.loc[t.name, "top1_true"] == pytest.approx(top1(t.prior))
        assert table.loc[t.name, "top1_uniform"] == pytest.approx(top1(torch.full((4,), 0.25, dtype=torch.float64)))
        assert metrics[f"estimate/{method}-raw/{t.name}/top1_estimated"] == pytest.approx(top1(est))
        assert metrics[f"estimate/{method}-raw/{t.name}/tv"] == pytest.approx(0.5 * float((est - t.prior).abs().sum()))


def test_compare_shows_the_estimated_prior_columns(store, capsys):
    uri, client, ids = store
    rid = ids["r-lade"]
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri, "--no-figures", "--estimate-prior", "em"]) == 0
    capsys.readouterr()
    ratios = _table(client, rid, "eval/estimate_em-bcts.json")["ratio"]  # auto: BCTS from 20 val images/class
    assert compare.main(["--run-ids", rid, "--mlflow-uri", uri, "--estimate-prior", "em", "--no-log",
                         "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    row = rows[0]
    assert float(row["em/true mean"]) == pytest.approx(ratios.mean(), abs=1e-4)
    assert float(row["em/true min"]) == pytest.approx(ratios.min(), abs=1e-4)
    # The estimated prior's own row: top-1 per target with p_t estimated from the target's logits, as evaluate.py.
    estimated = {r["posthoc"]: r for r in rows}[f"{row['posthoc']} (em estimate)"]
    table = _table(client, rid, "eval/estimate_em-bcts.json").set_index("target")
    for target, top1 in table["top1_estimated"].items():
        assert float(estimated[target]) == pytest.approx(top1, abs=1e-6), target


def test_tta_logits_are_the_models_views_ensembled_and_evaluated_like_any_others(store, capsys, tmp_path):
    from lade_core.data.transforms import decode_rgb
    from lade_core.tracking.artifacts import MODEL_NAME, tta_logits_artifact
    from lade_core.tracking.model import load_classifier
    from lade_core.tracking.store import logged_model_uri

    uri, client, ids = store
    rid = ids["r-lade"]
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri, "--tta", "flip"]) == 0
    assert "inject-flip" in capsys.readouterr().out
    stored, labels = read_logits_parquet(_download(client, rid, tta_logits_artifact("flip")))
    plain, plain_labels = read_logits_parquet(_download(client, rid, LOGITS_ARTIFACT))
    assert torch.equal(labels, plain_labels)
    # Here: the model on each test image and on its mirror, log of the mean of the two softmaxes, in float64.
    model = load_classifier(logged_model_uri(client, rid, MODEL_NAME), uri)
    data = client.get_run(rid).data.params["dataset"]
    import pyarrow.parquet as pq

    t = pq.read_table(f"{data}/test", columns=["image", "index"]).to_pydict()
    order = np.argsort(t["index"])
    images = [decode_rgb(t["image"][i]) for i in order]
    x = model.preprocess_images(images)
    z = torch.stack([model.logits(x), model.logits(x.flip(-1))]).double()
    want = torch.log(torch.softmax(z, -1).mean(0))
    np.testing.assert_allclose(stored.double().numpy(), want.numpy(), atol=1e-5)
    assert not torch.allclose(stored, plain, atol=1e-3)  # the mirror changed something: the test can fail
    # Evaluated under every target prior, as its own rows and metrics; rerun: read back, nothing new.
    metrics = client.get_run(rid).data.metrics
    ps = torch.tensor(json.loads(open(_download(client, rid, PRIOR_ARTIFACT)).read())["source_prior"])
    uniform = posthoc_logits(stored.double(), "inject", ps.double(), torch.full((4,), 0.25, dtype=torch.float64))
    top1 = float((uniform.argmax(1) == labels).double().mean())
    assert metrics["shift/uniform/inject-flip/top1"] == pytest.approx(top1, abs=1e-6)
    assert "shift/backward_50/raw-flip/nll" in metrics
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri, "--tta", "flip"]) == 0
    assert "0 metrics written" in capsys.readouterr().out
    assert evaluate.main(["--logits", str(tmp_path / "x.parquet"), "--source-info", "s.json", "--loss", "lade",
                          "--tta", "flip"]) == 2
    assert "--tta needs a run" in capsys.readouterr().err
