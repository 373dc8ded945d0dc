"""MLflow records against a real sqlite store: runs found by name whatever the name holds, each epoch once,
RUNNING/FAILED/FINISHED states, one home for a run's checkpoints, registration once."""
import mlflow
import pytest
import torch

from lade_core.tracking.store import (
    EpochLogger,
    end_run,
    find_run,
    logged_model_uri,
    register_once,
    start_or_resume_run,
    wait_reachable,
)

CONFIG = {"loss": "lade", "lr": 0.1, "source_prior": [0.75, 0.25], "train_counts": [3, 1]}


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("name", ["plain", "it's", 'say "hi"', "a' OR '1'='1", "tab\\back"])
def test_run_names_with_quotes_are_found_exactly(uri, name):
    run_id, resumed = start_or_resume_run(uri, "exp", name, CONFIG, storage="/ckpt")
    other, _ = start_or_resume_run(uri, "exp", name + "x", CONFIG, storage="/ckpt")
    assert not resumed and other != run_id
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("exp").experiment_id
    assert find_run(client, exp, name).info.run_id == run_id and find_run(client, exp, name).info.run_name == name
    assert start_or_resume_run(uri, "exp", name, CONFIG, storage="/ckpt") == (run_id, True)


def test_run_states_and_storage_binding(uri):
    client = mlflow.MlflowClient(uri)
    run_id, _ = start_or_resume_run(uri, "exp", "r", CONFIG, storage="s3://bucket/runs")
    assert client.get_run(run_id).info.status == "RUNNING"  # created in progress, not closed at creation
    end_run(uri, run_id, failed=True)
    assert client.get_run(run_id).info.status == "FAILED"
    assert start_or_resume_run(uri, "exp", "r", CONFIG, storage="s3://bucket/runs") == (run_id, True)
    assert client.get_run(run_id).info.status == "RUNNING"  # resumed
    end_run(uri, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="keeps its checkpoints under s3://bucket/runs, not /elsewhere"):
        start_or_resume_run(uri, "exp", "r", CONFIG, storage="/elsewhere")


def test_epoch_logger_writes_each_metric_and_epoch_once_across_restarts(uri):
    run_id, _ = start_or_resume_run(uri, "exp", "r", CONFIG)
    client = mlflow.MlflowClient(uri)
    logger = EpochLogger(uri, run_id)
    assert logger.log_epoch({"epoch": 0, "val/top1": 0.5, "lr": 0.1, "val/few": float("nan")}) == 2
    # The same epoch again (a worker group restarted before Ray registered its checkpoint): nothing written.
    assert logger.log_epoch({"epoch": 0, "val/top1": 0.6, "lr": 0.1}) == 0
    restarted = EpochLogger(uri, run_id)  # a new worker group reads what the run already holds
    restarted.backfill([{"epoch": 0, "val/top1": 0.6, "lr": 0.1, "train/loss": 2.0},
                        {"epoch": 1, "val/top1": 0.7, "lr": 0.05, "train/loss": 1.0}])
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/top1")] == [(0, 0.5), (1, 0.7)]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1]  # a new key at epoch 0 is fine
    assert client.get_metric_history(run_id, "val/few") == []  # NaN (an empty shot group) is never logged


def test_model_registration_happens_once_per_run(uri):
    run_id, _ = start_or_resume_run(uri, "exp", "r", CONFIG)
    client = mlflow.MlflowClient(uri)
    assert logged_model_uri(client, run_id, "model") is None
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        model_uri = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", serialization_format="pt2",
                                             input_example=torch.zeros(1, 2).numpy()).model_uri
    assert logged_model_uri(client, run_id, "model") == model_uri
    first = register_once(client, run_id, "it's a model", model_uri)
    again = register_once(client, run_id, "it's a model", model_uri)
    assert again.version == first.version and str(first.version) == "1" and first.run_id == run_id
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == 1


def test_a_half_logged_model_is_never_reused_or_registered(uri):
    """A driver killed inside ``log_model`` leaves a PENDING logged model (MLflow creates it first and finalizes it
    once its files are uploaded): it is marked FAILED, not returned, and the complete one is found instead."""
    from mlflow.entities import LoggedModelStatus

    run_id, _ = start_or_resume_run(uri, "exp", "r", CONFIG)
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        pending = mlflow.initialize_logged_model(name="model", source_run_id=run_id)  # what log_model starts with
    assert client.get_logged_model(pending.model_id).status == LoggedModelStatus.PENDING
    assert logged_model_uri(client, run_id, "model") is None
    assert client.get_logged_model(pending.model_id).status == LoggedModelStatus.FAILED
    with mlflow.start_run(run_id=run_id):
        model_uri = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", serialization_format="pt2",
                                             input_example=torch.zeros(1, 2).numpy()).model_uri
    assert logged_model_uri(client, run_id, "model") == model_uri != f"models:/{pending.model_id}"


def test_a_rerun_resumes_only_the_search_it_names(uri):
    """The search's digest (its dataset, objective, space, schedule) is set on its parent run when it starts; a rerun
    with the same --experiment and other settings is refused instead of finalizing a champion against them."""
    from lade_core.tune.trials import SEARCH_DIGEST_TAG, check_search_digest, search_digest

    digest = search_digest({"dataset": "/data/a", "objective": "uniform", "space": {"alpha": ("loguniform", 0.01, 1)}})
    check_search_digest(uri, "search", digest)  # nothing started yet
    start_or_resume_run(uri, "search", "search", CONFIG, tags={SEARCH_DIGEST_TAG: digest})
    check_search_digest(uri, "search", digest)  # the same search: resumes
    other = search_digest({"dataset": "/data/a", "objective": "shift_mean",
                           "space": {"alpha": ("loguniform", 0.01, 1)}})
    assert other != digest
    with pytest.raises(ValueError, match="'search' was started with another dataset, objective, space or schedule"):
        check_search_digest(uri, "search", other)
    start_or_resume_run(uri, "old", "old", CONFIG)  # a search started before digests were recorded
    with pytest.raises(ValueError, match="'old' was started by an older lade"):
        check_search_digest(uri, "old", digest)


def test_finalize_waits_for_a_tracking_server_that_comes_back(capsys):
    """A real HTTP server answering /health 3 s late: waited for, said once; one that never answers: an error that
    says training is kept."""
    import http.server
    import threading
    import time

    from conftest import free_port

    port = free_port()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    def serve_later():
        time.sleep(3)
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)

    started: list = []
    threading.Thread(target=serve_later, daemon=True).start()
    t0 = time.monotonic()
    wait_reachable(f"http://127.0.0.1:{port}", 60, "rerun to finalize")
    assert 2.5 < time.monotonic() - t0 < 30 and started
    assert capsys.readouterr().err.count("is unreachable; waiting up to 60 s") == 1
    started[0].shutdown()
    with pytest.raises(ConnectionError, match="unreachable.*rerun to finalize"):
        wait_reachable(f"http://127.0.0.1:{free_port()}", 1, "rerun to finalize")
    wait_reachable("sqlite:///nowhere.db", 0, "never waits for a local store")
