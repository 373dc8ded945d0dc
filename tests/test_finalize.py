"""runs.finalize as named steps, each run alone on a finished run: it does only what the run lacks. On the session's
smoke run of LADE (a real train.py run in a real MLflow store), with one stored artifact taken away."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch

from lade_core.config.context import split_flat_config
from lade_core.data import open_prepared
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, MODEL_NAME, VAL_LOGITS_ARTIFACT, read_logits_parquet
from lade_core.tracking.store import find_run, logged_model_uri
from lade_core.train.checkpoint import CONFIG_FILE, latest_checkpoint
from lade_core.train.runs import Finalizing, backfill_epochs, log_model, log_test_metrics, store_logits, store_weights


def test_each_finalize_step_alone_does_only_what_the_run_lacks(train_workdir, smoke_run):
    from ray.train import Checkpoint

    smoke_run("lade")
    uri = f"sqlite:///{train_workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = find_run(client, client.get_experiment_by_name("lade").experiment_id, "r-lade")
    last = latest_checkpoint(str(train_workdir / "ray_results" / "r-lade"))
    # The run's config and context as the checkpoint holds them (the flat dict the workers got).
    config, context = split_flat_config({**json.loads((Path(last.path) / CONFIG_FILE).read_text()),
                                         "mlflow_run_id": run.info.run_id})
    config = config.replace(mlflow_uri=uri)
    prepared = open_prepared(config.data.dataset)
    val_file = Path(urlparse(run.info.artifact_uri).path) / VAL_LOGITS_ARTIFACT
    stored_val = read_logits_parquet(val_file)
    val_file.unlink()  # as if the driver died after storing the test logits
    history = {k: len(client.get_metric_history(run.info.run_id, k)) for k in ("test/top1", "val/top1", "train/loss")}
    model = logged_model_uri(client, run.info.run_id, MODEL_NAME)

    f = Finalizing(config, context, prepared, Checkpoint(last.path))
    assert VAL_LOGITS_ARTIFACT not in f.have and LOGITS_ARTIFACT in f.have
    store_logits(f)
    assert sorted(f.computed) == ["val"]  # only the missing split, from the last epoch's checkpoint
    z, y = read_logits_parquet(val_file)
    assert torch.equal(z, stored_val[0]) and torch.equal(y, stored_val[1])
    # Every other step finds its work done: no metric written twice, no model logged again, no weights rewritten.
    backfill_epochs(f)
    rows = log_test_metrics(f)
    store_weights(f)
    assert log_model(f) == model
    assert {k: len(client.get_metric_history(run.info.run_id, k)) for k in history} == history
    assert f._state is None  # the checkpoint's weights were never read: nothing needed them
    uniform = next(r for r in rows if r["target"] == "uniform")
    assert uniform["top1"] == client.get_run(run.info.run_id).data.metrics["test/top1"]
