"""Table 6 from one command: compare.py over the session's smoke runs of every method (pipelines/train.py with
MLflow, ``smoke_run``), with each run's post-hoc rules and the τ-normalized classifier; and the registered Causal
Norm model serving the TDE logits its run stored."""
import io
import json
import math
from contextlib import redirect_stdout

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from lade_core.math.evaluation import TAU_GRID, protocol_targets
from lade_core.math.priors import SHIFT_PROTOCOL, shift_protocol_name
from lade_core.tracking.artifacts import (
    LOGITS_ARTIFACT,
    PRIOR_ARTIFACT,
    STATE_DICT_ARTIFACT,
    VAL_LOGITS_ARTIFACT,
    VAL_VIEWS_ARTIFACT,
    VIEWS_ARTIFACT,
    read_expert_views_parquet,
    read_logits_parquet,
)

# Every head and post-hoc rule (focal loss trains softmax's head with softmax's rule: tests/test_peers.py).
METHODS = ("softmax", "lade", "logit_adjusted", "ldam_drw", "causal_norm")
EXPERTS = ("sade", "balpoe")  # the multi-expert methods: trained, registered and served like the rest
PRIORS = [shift_protocol_name(d, r) for d, r in SHIFT_PROTOCOL]


def _download(client, run_id, path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=client.tracking_uri)


@pytest.fixture(scope="module")
def peers(train_workdir, smoke_run):
    for loss in (*METHODS, *EXPERTS):
        smoke_run(loss)
    uri = f"sqlite:///{train_workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lade").experiment_id])}
    return uri, client, {loss: runs[f"r-{loss}"] for loss in (*METHODS, *EXPERTS)}, train_workdir


@pytest.mark.parametrize("loss, model", [("causal_norm", "shufflenet_v2_x0_5"), ("ldam_drw", "timm:test_resnet"),
                                         ("sade", "resnet32"), ("balpoe", "resnet32")])
def test_registered_model_serves_the_logits_its_run_stored(peers, loss, model):
    """The card's architecture and head rebuild the network training had (a torchvision model outside the classic
    ResNets under Causal Norm's head, a timm model under LDAM's cosine head): the pyfunc's raw logits on the test
    images are the logits the run stored (the TDE logits for Causal Norm; a linear head would not load the
    weights)."""
    uri, client, runs, workdir = peers
    assert runs[loss].data.params["model"] == model  # conftest.SMOKE_FLAGS
    logits, _ = read_logits_parquet(_download(client, runs[loss].info.run_id, LOGITS_ARTIFACT))
    test = pq.read_table(str(workdir / "data" / "synthetic_smoke" / "test"), columns=["image", "index"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/model-{loss}/1")
    out = model.predict(pd.DataFrame({"image": test.column("image").to_pylist()}),
                        params={"output": "logits", "posthoc": "raw"})
    served = np.stack(out["logits"].to_numpy())[np.argsort(test.column("index").to_pylist())]
    np.testing.assert_allclose(served, logits.numpy(), atol=1e-4)


def _compare_csv(uri: str, run_ids: list[str]) -> pd.DataFrame:
    from conftest import Script

    compare = Script("compare")

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert compare.main(["--run-ids", *run_ids, "--mlflow-uri", uri, "--format", "csv"]) == 0
    # MLflow prints links to the logged run on stdout too; the table is the CSV lines.
    return pd.read_csv(io.StringIO("\n".join(line for line in buf.getvalue().splitlines() if line.count(",") > 10)))


def test_compare_prints_table_6_for_every_method_from_one_command(peers):
    uri, client, runs, _ = peers
    table = _compare_csv(uri, [runs[m].info.run_id for m in METHODS])
    assert list(table.columns[:3 + len(PRIORS)]) == ["run", "loss", "posthoc", *PRIORS]
    assert {"many", "medium", "few", "ece"} <= set(table.columns)
    rules = [(r["loss"], r["posthoc"].split(" ")[0]) for _, r in table.iterrows()]
    assert rules == [("softmax", "pc"), ("softmax", "raw"), ("softmax", "adjusted"), ("softmax", "tau_norm"),
                     ("lade", "inject"), ("lade", "raw"), ("logit_adjusted", "inject"), ("logit_adjusted", "raw"),
                     ("ldam_drw", "inject"), ("ldam_drw", "raw"), ("causal_norm", "inject"), ("causal_norm", "raw")]
    assert all(0 <= v <= 1 for v in table[PRIORS].to_numpy().ravel())
    # Each row recomputed here from the run's stored logits: the rule's offset (Eq. 4: - log p_s + log p_t; Eq. 17:
    # + log p_t; raw: none), Menon's post-hoc adjustment z - τ log p_s + log p_t, or the τ-normalized classifier
    # (z - b) / |w|^τ + log p_t, each τ chosen on validation top-1 over 0, 0.1, ..., 2; top-1 on each of the 11
    # shifted targets.
    for _, row in table.iterrows():
        run_id = runs[row["loss"]].info.run_id
        z, y = read_logits_parquet(_download(client, run_id, LOGITS_ARTIFACT))
        info = json.loads(open(_download(client, run_id, PRIOR_ARTIFACT)).read())
        z, ps = z.double(), torch.tensor(info["source_prior"], dtype=torch.float64)
        rule = row["posthoc"].split(" ")[0]
        if rule in ("adjusted", "tau_norm"):
            zv, yv = read_logits_parquet(_download(client, run_id, VAL_LOGITS_ARTIFACT))
            if rule == "adjusted":
                transform = lambda v, t: v - t * ps.log()  # noqa: E731
            else:
                state = torch.load(_download(client, run_id, STATE_DICT_ARTIFACT), weights_only=True)
                w, b = state["fc.weight"].double(), state["fc.bias"].double()
                transform = lambda v, t: (v - b) / w.norm(dim=1) ** t  # noqa: E731
            val = [float((transform(zv.double(), t).argmax(1) == yv).double().mean()) for t in TAU_GRID]
            tau = TAU_GRID[int(np.argmax(val))]
            assert row["posthoc"] == f"{rule} (τ={tau:g})"
            z = transform(z, tau)
        for target in protocol_targets(y, info["train_counts"]):
            shift = {"raw": 0, "inject": target.prior.log(), "tau_norm": target.prior.log(),
                     "adjusted": target.prior.log(), "pc": target.prior.log() - ps.log()}[rule]
            idx = torch.as_tensor(target.indices)
            top1 = float(((z[idx] + shift).argmax(1) == y[idx]).double().mean())
            assert row[target.name] == pytest.approx(top1, abs=1e-9), (row["run"], rule, target.name)
    logged = client.search_runs([client.get_experiment_by_name("lade-compare").experiment_id],
                                order_by=["attributes.start_time DESC"])[0]
    assert {"compare.md", "compare.csv", "compare.png"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert not math.isnan(table.loc[0, "uniform"])


def test_expert_runs_store_their_views_and_evaluate_and_compare_aggregate_from_them(peers, capsys):
    """A multi-expert run stores each expert's logits on the clean test and validation images (whose 1/E average
    plus the head's offset is exactly the stored test logits) and on two augmented views; ``evaluate.py --aggregate
    self-supervised`` learns SADE's weights per target from those views alone, logs its rows and weights, and
    ``compare.py --aggregate`` adds the row; a run without expert views is refused by name."""
    from conftest import Script
    from lade_core.math.aggregation import aggregate, learn_expert_weights

    uri, client, runs, _ = peers
    rid = runs["sade"].info.run_id
    z, y = read_logits_parquet(_download(client, rid, LOGITS_ARTIFACT))
    views = read_expert_views_parquet(_download(client, rid, VIEWS_ARTIFACT))
    assert views.logits.shape == (len(y), 3, 3, z.shape[1]) and torch.equal(views.labels, y)
    clean, view_a, view_b = views.logits.unbind(1)
    torch.testing.assert_close(clean.mean(1) + views.eval_offset, z, atol=1e-4, rtol=1e-5)
    assert (view_a - clean).abs().max() > 1e-2 and (view_a - view_b).abs().max() > 1e-2  # augmented, not clean
    _, yv = read_logits_parquet(_download(client, rid, VAL_LOGITS_ARTIFACT))
    assert torch.equal(read_expert_views_parquet(_download(client, rid, VAL_VIEWS_ARTIFACT)).labels, yv)

    evaluate = Script("evaluate")
    assert evaluate.main(["--run-id", rid, "--mlflow-uri", uri, "--no-figures", "--aggregate", "self-supervised"]) == 0
    assert "expert weights learned on each target's unlabeled views" in capsys.readouterr().out
    metrics = client.get_run(rid).data.metrics
    info = json.loads(open(_download(client, rid, PRIOR_ARTIFACT)).read())
    targets = protocol_targets(y, info["train_counts"], knockouts=True)  # the 11 priors and the 6 knock-outs
    for t in targets:
        idx = torch.as_tensor(t.indices)
        w, _ = learn_expert_weights(view_a[idx].double(), view_b[idx].double())
        top1 = float(((aggregate(clean[idx].double(), w) + views.eval_offset.double()).argmax(1) == y[idx])
                     .double().mean())
        assert metrics[f"shift/{t.name}/aggregate/top1"] == pytest.approx(top1, abs=1e-9), t.name
    weights = pd.read_json(_download(client, rid, "eval/aggregate_weights.json"), orient="split")
    assert len(weights) == len(targets) and np.allclose(weights[["w0", "w1", "w2"]].sum(axis=1), 1)

    table = _compare_csv(uri, [runs[m].info.run_id for m in EXPERTS] + ["--aggregate", "self-supervised"])
    agg = table[table["posthoc"] == "aggregate (self-supervised)"]
    assert list(agg["loss"]) == ["sade", "balpoe"]
    assert float(agg.iloc[0]["uniform"]) == pytest.approx(metrics["shift/uniform/aggregate/top1"], abs=1e-6)

    # Beside other methods, only the multi-expert runs get the row; asked of runs without views, one clear error.
    table = _compare_csv(uri, [runs["lade"].info.run_id, rid, "--aggregate", "self-supervised"])
    assert list(table[table["posthoc"] == "aggregate (self-supervised)"]["loss"]) == ["sade"]
    lade = runs["lade"].info.run_id
    for script, argv in (("compare", ["--run-ids", lade, "--no-log"]), ("evaluate", ["--run-id", lade])):
        assert Script(script).main([*argv, "--mlflow-uri", uri, "--aggregate", "self-supervised"]) == 2
        err = capsys.readouterr().err
        assert f"r-lade, loss lade) has no {VIEWS_ARTIFACT}: test-time aggregation needs a multi-expert model" in err


def test_predict_aggregates_a_multi_expert_model_on_the_images_own_views(peers, tmp_path):
    """``predict.py --aggregate self-supervised`` over a SADE run's test split, its views seeded with the run's seed:
    they are the views the run stored, so its weights are those SADE's loop learns from the stored views, its
    predictions the softmax of the weighted experts (no prior injected), written beside the predictions and logged
    to lade-predict; a model without experts, or a prior beside the aggregation, is refused by name."""
    from conftest import run_predict
    from lade_core.math.aggregation import aggregate, learn_expert_weights

    uri, client, runs, workdir = peers
    run = runs["sade"]
    views = read_expert_views_parquet(_download(client, run.info.run_id, VIEWS_ARTIFACT))
    clean, view_a, view_b = views.logits.double().unbind(1)
    seed, data = run.data.params["seed"], str(workdir / "data" / "synthetic_smoke")
    args = ("--input", data, "--split", "test", "--aggregate", "self-supervised", "--seed", seed)
    p = run_predict(tmp_path, uri, "--model", "models:/model-sade/1", "--output", str(tmp_path / "agg.parquet"), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "expert weights learned on the images' two augmented views" in p.stdout
    info = json.loads((tmp_path / "agg.aggregate.json").read_text())
    w, want = learn_expert_weights(view_a, view_b, seed=int(seed))
    assert info["images"] == len(views.labels) and info["epochs"] == want["epochs"]
    np.testing.assert_allclose(info["weights"], w.numpy(), atol=1e-4)
    out = pq.read_table(tmp_path / "agg.parquet").to_pandas()
    assert out["row"].tolist() == list(range(len(views.labels)))
    prob = torch.softmax(aggregate(clean, w) + views.eval_offset.double(), dim=1)
    np.testing.assert_allclose(out["probability"], prob.max(1).values.numpy(), atol=2e-4)
    assert (out["label"].to_numpy() == prob.argmax(1).numpy()).mean() > 0.98
    logged = client.search_runs([client.get_experiment_by_name("lade-predict").experiment_id],
                                "params.method = 'aggregate (self-supervised)'")
    assert len(logged) == 1 and logged[0].data.metrics["aggregate/w1"] == pytest.approx(info["weights"][1])

    p = run_predict(tmp_path, uri, "--model", "models:/model-lade/1", "--output", str(tmp_path / "no.parquet"), *args)
    assert p.returncode == 2 and ("--aggregate self-supervised needs a multi-expert model (sade, balpoe); "
                                  "models:/model-lade/1 is a lade model") in p.stderr, p.stderr[-2000:]
    p = run_predict(tmp_path, uri, "--model", "models:/model-sade/1", "--output", str(tmp_path / "no.parquet"), *args,
                    "--target-prior", "estimate")
    assert p.returncode == 2 and "--aggregate learns the experts' weights from the images and injects no prior" \
        in p.stderr
    assert not (tmp_path / "no.parquet").exists()
