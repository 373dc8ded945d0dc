"""pipelines/train.py end to end: real local Ray (2 gloo DDP workers), real sqlite MLflow store."""
import json

import mlflow
import numpy as np
import pytest
import torch

from conftest import run_train
from lade_core.methods import classifier_head
from lade_core.models.backbones import build_model
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, PRIOR_ARTIFACT, VAL_LOGITS_ARTIFACT, read_logits_parquet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(train_workdir):
    return train_workdir


def _client(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def _run(client, name):
    exp = client.get_experiment_by_name("lade")
    (run,) = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    return run


# Balanced Softmax is logit adjustment at tau = 1 (its end-to-end run is logit_adjusted's, at tau = 0.5). Focal loss
# takes softmax's path (linear head, PC) with another loss function, tested in test_peers.py: left out for CI time.
@pytest.mark.parametrize("loss", ["softmax", "lade", "logit_adjusted", "ldam_drw", "causal_norm", "sade", "balpoe"])
def test_ddp_training_tracks_everything_in_mlflow(workdir, smoke_run, loss):
    p = smoke_run(loss)
    epochs = 2 if loss == "ldam_drw" else 1
    assert "forward_10" in p.stdout and "backward_10" in p.stdout
    client = _client(workdir)
    run = _run(client, f"r-{loss}")
    assert run.data.params["loss"] == loss and run.data.params["num_workers"] == "2"
    for key in ("val/top1", "val/ece", "train/loss", "train/classes_per_batch", "lr", "test/top1", "test/ece",
                "test/backward_10/top1"):
        assert key in run.data.metrics
    # Each loss logs its own terms, and only those: no 0.0 placeholders for terms a loss does not have.
    terms = {k for k in run.data.metrics if k.startswith("train/")} - {"train/loss", "train/classes_per_batch"}
    assert terms == {"softmax": {"train/ce"},
                     "lade": {"train/lade_ce", "train/lader", "train/lader_F", "train/lader_S"},
                     "logit_adjusted": {"train/adjusted_ce"}, "focal": {"train/focal"},
                     "ldam_drw": {"train/ldam", "train/drw"}, "causal_norm": {"train/ce"},
                     **dict.fromkeys(("sade", "balpoe"), {"train/expert1", "train/expert2", "train/expert3"})}[loss]
    assert all(run.data.metrics[k] != 0.0 for k in terms - {"train/drw"})
    # One line per epoch, printed once; no Ray INFO chatter; never "nan" for an empty shot group.
    assert all(p.stdout.count(f"epoch {e}/{epochs} ") == 1 for e in range(1, epochs + 1)), p.stdout
    assert "nan" not in p.stdout, p.stdout
    assert "Starting execution of Dataset" not in p.stdout + p.stderr
    # Nothing a user cannot act on: Ray Data's progress-bar notice, Ray Train's preemption-watcher actor (a local
    # Ray), its placement-group cleaner asking for a dashboard a single run's local Ray does not start, NumPy's
    # read-only-array warning, the raylet's count of worker processes against a small machine's cores.
    for noise in ("Progress bars disabled", "PreemptionWatcher", "core_worker.cc", "Failed to query Ray Train",
                  "not writable", "worker processes have been started"):
        assert noise not in p.stdout + p.stderr, noise
    assert " INFO " not in p.stdout + p.stderr, [line for line in p.stderr.splitlines() if " INFO " in line]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == list(range(epochs))
    # What a restart of this run would resume from, read from the snapshot Ray Train wrote (its real format).
    from lade_core.train.checkpoint import resume_epoch

    assert resume_epoch(str(workdir / "ray_results" / f"r-{loss}")) == epochs
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("eval", "data", "checkpoint") for a in client.list_artifacts(run.info.run_id, d)}
    assert {LOGITS_ARTIFACT, "data/source_prior.json", "config.yaml", "checkpoint/state_dict.pt"} <= arts
    logits, labels = read_logits_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                             artifact_path=LOGITS_ARTIFACT))
    assert logits.shape == (80, 4) and np.bincount(labels.numpy()).tolist() == [20] * 4
    # The last epoch's workers computed the final model's test and validation logits and the last checkpoint
    # carries them: they are what the run stored (no model loaded again for it).
    from ray.train import Checkpoint

    from lade_core.train.checkpoint import final_logits, latest_checkpoint

    last = latest_checkpoint(str(workdir / "ray_results" / f"r-{loss}"))
    stored = final_logits(Checkpoint(last.path), ["test", "val"])
    assert sorted(stored) == ["test", "val"] and torch.equal(stored["test"][0], logits)
    val_logits, _ = read_logits_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                            artifact_path=VAL_LOGITS_ARTIFACT))
    assert torch.equal(stored["test"][1], labels) and torch.equal(stored["val"][0], val_logits)
    # test/top1 is the uniform-prior accuracy under the rule the loss calls for: PC for softmax and focal, else
    # injection.
    prior = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path=PRIOR_ARTIFACT)).read())
    ps = torch.tensor(prior["source_prior"], dtype=torch.float64)
    z = logits.double() - (ps.log() if loss in ("softmax", "focal") else 0)  # + log(1/C): no-op
    assert run.data.metrics["test/top1"] == pytest.approx(float((z.argmax(1) == labels).double().mean()))
    # The registered model reproduces the checkpoint's logits, with the head the loss trained and its state.
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                           artifact_path="checkpoint/state_dict.pt"))
    if loss == "logit_adjusted":  # the inference offset (tau - 1) log p_s at the run's tau = 0.5
        torch.testing.assert_close(state["fc.eval_offset"].double(), -0.5 * ps.log(), atol=1e-6, rtol=0)
    if loss == "causal_norm":  # the moving-average feature direction TDE needs, accumulated and saved
        assert float(state["fc.feature_direction"].norm()) > 0
    if loss == "ldam_drw":  # deferred re-weighting: off in epoch 0, on from --drw-epoch 1
        drw = sorted(client.get_metric_history(run.info.run_id, "train/drw"), key=lambda m: m.step)
        assert [m.value for m in drw] == [0.0, 1.0]
    ref = build_model(run.data.params["model"], 4, head=classifier_head(loss, ps, train_counts=prior["train_counts"]))
    ref.load_state_dict(state)
    ref.eval()
    loaded = mlflow.pyfunc.load_model(f"models:/model-{loss}/1")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = loaded.predict(x.numpy(), params={"output": "logits", "posthoc": "raw"})
        assert np.allclose(np.stack(out["logits"]), ref(x).numpy(), atol=1e-4)


def test_run_name_with_another_config_is_refused(workdir, smoke_run):
    smoke_run("lade")
    clash = run_train(workdir, "--loss", "softmax", "--run-name", "r-lade")
    assert clash.returncode == 2 and "exists with a different config" in clash.stderr, clash.stderr[-2000:]
    client = _client(workdir)
    assert _run(client, "r-lade").info.status == "FINISHED"  # the finished run is left as it was


def test_run_states_only_move_forward(workdir, smoke_run):
    """A finished run rerun is left FINISHED without starting Ray, even with settings its cluster cannot fit; a
    FAILED run rerun with another config stays FAILED (it used to be closed FINISHED); a run of that name without
    a config digest (not started by train.py) is refused, untouched."""
    from lade_core.tracking.store import CONFIG_DIGEST_TAG, open_run

    smoke_run("lade")
    client = _client(workdir)
    finished = _run(client, "r-lade")
    steps = len(client.get_metric_history(finished.info.run_id, "val/top1"))
    # Even with settings its cluster cannot fit (which used to turn it FAILED): nothing to do, no Ray started.
    again = run_train(workdir, "--loss", "lade", "--run-name", "r-lade", "--register", "model-lade",
                      "--num-workers", "3", num_cpus="2")  # 3 workers on 2 CPUs: check_cluster_fits fails
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "is finished" in again.stdout and "nothing to do" in again.stdout and "epoch 1/" not in again.stdout
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(finished.info.run_id, "val/top1")) == steps
    assert len(client.search_model_versions("name = 'model-lade'")) == 1

    config = {"source_prior": [0.5, 0.5], "train_counts": [1, 1]}
    failed = open_run(f"sqlite:///{workdir / 'mlflow.db'}", "lade", "was-failed", config,
                      tags={CONFIG_DIGEST_TAG: "0123456789"}, storage=str(workdir / "ray_results"))
    client.log_metric(failed.run_id, "val/top1", 0.5, step=0)
    client.set_terminated(failed.run_id, "FAILED")
    clash = run_train(workdir, "--loss", "lade", "--run-name", "was-failed")
    assert clash.returncode == 2 and "exists with a different config" in clash.stderr, clash.stderr[-2000:]
    assert client.get_run(failed.run_id).info.status == "FAILED"
    foreign = open_run(f"sqlite:///{workdir / 'mlflow.db'}", "lade", "no-digest", config)
    client.set_terminated(foreign.run_id, "KILLED")
    refused = run_train(workdir, "--loss", "lade", "--run-name", "no-digest")
    assert refused.returncode == 2 and "without a config digest" in refused.stderr, refused.stderr[-2000:]
    assert client.get_run(foreign.run_id).info.status == "KILLED"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "-0.5"], "command line: alpha must be >= 0, got -0.5"),
        (["--lam", "-1"], "command line: lam must be >= 0, got -1"),
        (["--class-weights", "[0.5, 0.5]"], "class_weights has wrong length: 2 entries for 4 classes"),
        (["--class-weights", "[0.5, -0.5, 0.5, 0.5]"], "class_weights[1] must be >= 0"),
        (["--epochs", "0"], "command line: epochs must be >= 1, got 0"),
        (["--run-name", "../../etc"], "run_name must be a non-empty name without path separators"),
        (["--weights-path", "/no/such.pt"], "weights_path is not an existing file"),
        (["--mlflow-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--num-workers", "64", "--batch-size", "256"], "needs 64 CPUs"),
        (["--dataset", "no_such_prepared_dataset"], "dataset.json is missing"),
        (["--image-size", "4"], "image_size must be >= 8, got 4"),
    ],
)
def test_bad_input_fails_before_workers_start(workdir, args, message):
    p = run_train(workdir, *args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert "RayTrainWorker" not in p.stdout + p.stderr


def test_unknown_loss_is_rejected_by_the_cli(workdir):
    p = run_train(workdir, "--loss", "fancy")
    assert p.returncode == 2 and "invalid choice: 'fancy'" in p.stderr


def test_fresh_directory_default_local_ray_does_not_starve_ray_data(tmp_path):
    # No --num-cpus and no prepared data yet: the local Ray the run starts must be sized for the training workers
    # plus Ray Data's decode tasks (a 2-CPU Ray here hung once both workers took a CPU each).
    p = run_train(tmp_path, "--run-name", "fresh", "--decode", "ray_data", num_cpus=None, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "data" / "synthetic_smoke" / "dataset.json").exists() and "backward_10" in p.stdout


def test_a_run_that_decodes_on_its_device_trains_and_a_list_it_cannot_run_is_refused_first(tmp_path):
    """``decode: device`` end to end on the CPU as the device (a GPU worker's path with nvJPEG swapped for the CPU
    decoder): the imagenet preset's batches decoded and augmented in the worker, a run trained and evaluated; the
    cifar preset with ``decode: device`` refused by name before any worker starts."""
    p = run_train(tmp_path, "--run-name", "dev", "--decode", "device", "--augment", "imagenet")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "epoch 1/1" in p.stdout and "backward_10" in p.stdout
    refused = run_train(tmp_path, "--run-name", "refused", "--decode", "device")
    assert refused.returncode == 2
    assert "decode: device runs a bilinear RandomResizedCrop" in refused.stderr, refused.stderr[-2000:]
    assert "RayTrainWorker" not in refused.stdout + refused.stderr
