"""The user's recipe end to end (real local Ray, 2 DDP workers, sqlite MLflow): an orientation-sensitive image set
in the published list layout (lines grouped by class) where the flip preset confuses the classes that mirror into
each other and an ``augment`` without flip does not; the same command twice, once killed and resumed, giving the
same metrics; ``--seeds`` and compare.py's mean ± std. (A torchvision model outside the classic ResNets and a timm
model train, register and serve in the session's smoke runs: conftest.SMOKE_FLAGS, test_peers_pipeline.py.)"""
import csv
import io
import os
import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from conftest import REPO, run_prepare, train_worker_pids, wait_for, write_arrow_dataset
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, read_logits_parquet
from lade_core.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
NO_FLIP = '[{"RandomCrop": {"size": 16, "padding": 2}}]'
EPOCHS = "6"


def _train_args(workdir, *args):
    return [sys.executable, str(REPO / "pipelines" / "train.py"), "--num-cpus", "4", "--dataset",
            str(workdir / "data"), "--epochs", EPOCHS, "--loss", "balanced_softmax", "--lr", "0.05", "--batch-size",
            "32", "--experiment", "recipe", "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--storage-path",
            str(workdir / "ray_results"), *args]


def _env():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _train(workdir, *args):
    p = subprocess.run(_train_args(workdir, *args), cwd=workdir, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def arrows(tmp_path_factory):
    """Arrows pointing left, right, up, down (long-tailed 120/80/50/30, lists grouped by class), prepared with the
    cifar family at their native 16 px; then a run with the family's flip preset and ``--seeds 0 1`` without flip."""
    workdir = tmp_path_factory.mktemp("arrows")
    lists = write_arrow_dataset(workdir, [120, 80, 50, 30], test_per_class=30)
    prep = run_prepare(workdir, "lists", "--name", "arrows", "--image-root", str(workdir / "images"), "--train",
                       str(lists["train"]), "--test", str(lists["test"]), "--transform", "cifar", "--val-per-class",
                       "8", "--out", str(workdir / "data"))
    assert prep.returncode == 0, prep.stderr[-3000:]
    flip = _train(workdir, "--run-name", "flip")
    seeds = _train(workdir, "--augment", NO_FLIP, "--seeds", "0", "1")
    return workdir, flip, seeds


def _client(workdir):
    return mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def _runs(workdir, experiment="recipe"):
    client = _client(workdir)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _test_logits(workdir, run):
    return read_logits_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=LOGITS_ARTIFACT, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"))


def _accuracy(logits, labels, classes) -> float:
    """Top-1 (Balanced Softmax under the uniform prior: the argmax) on the test arrows of ``classes``."""
    rows = torch.isin(labels, torch.tensor(classes))
    return float((logits.argmax(1)[rows] == labels[rows]).double().mean())


def test_flip_preset_confuses_mirrored_classes_and_augment_without_flip_does_not(arrows):
    workdir, _, _ = arrows
    runs = _runs(workdir)
    children = sorted(n for n in runs if n.endswith(("-seed0", "-seed1")))
    assert len(children) == 2
    flip_z, labels = _test_logits(workdir, runs["flip"])
    plain = [_test_logits(workdir, runs[n]) for n in children]
    # The recipe the run trained with is the resolved list, in its params.
    assert "RandomHorizontalFlip" in runs["flip"].data.params["augment"]
    assert "RandomHorizontalFlip" not in runs[children[0]].data.params["augment"]
    # Lines grouped by class, mixed every epoch: a worker batch of 16 holds nearly every class of the 4.
    assert all(runs[n].data.metrics["train/classes_per_batch"] >= 3.3 for n in ["flip", *children])
    flip_top1 = runs["flip"].data.metrics["test/top1"]
    plain_top1 = np.mean([runs[n].data.metrics["test/top1"] for n in children])
    # A mirrored left arrow is a right arrow: the flip preset loses left / right (classes 0, 1), not up / down.
    assert _accuracy(flip_z, labels, [0, 1]) <= 0.6 and _accuracy(flip_z, labels, [2, 3]) >= 0.9, flip_top1
    assert all(_accuracy(z, y, [0, 1]) >= 0.9 for z, y in plain), plain_top1
    assert plain_top1 >= 0.9 and plain_top1 - flip_top1 >= 0.15, (flip_top1, plain_top1)


def test_seeds_nest_under_a_parent_and_compare_reports_their_mean_and_std(arrows):
    workdir, _, seeds = arrows
    runs = _runs(workdir)
    children = [runs[n] for n in sorted(runs) if n.endswith(("-seed0", "-seed1"))]
    (parent,) = [r for n, r in runs.items() if n == children[0].info.run_name.rsplit("-seed", 1)[0]]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert [c.data.params["seed"] for c in children] == ["0", "1"] and parent.info.status == "FINISHED"
    assert len({c.data.tags["lade.seed_group"] for c in children}) == 1
    assert runs["flip"].data.tags["lade.seed_group"] != children[0].data.tags["lade.seed_group"]
    p = subprocess.run([sys.executable, str(REPO / "pipelines" / "compare.py"), "--experiment", "recipe", "--format",
                        "csv", "--no-log", "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}"], cwd=workdir,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    (group,) = [r for r in rows if r["run"].endswith("(seeds)") and r["posthoc"] == "inject"]
    (alone,) = [r for r in rows if r["run"].startswith("flip") and r["posthoc"] == "inject"]
    assert group["n"] == "2" and alone["n"] == "1" and "±" not in alone["uniform"]
    # Directly from the stored logits: Balanced Softmax under the uniform prior is the argmax of its logits.
    top1 = [float((z.argmax(1) == y).double().mean()) for z, y in (_test_logits(workdir, c) for c in children)]
    mean, std = group["uniform"].split(" ± ")
    assert float(mean) == pytest.approx(np.mean(top1), abs=1e-6)
    assert float(std) == pytest.approx(np.std(top1, ddof=1), abs=1e-6)
    assert "mean ± std" in seeds.stdout


def test_the_same_command_killed_and_resumed_gives_the_same_metrics(arrows):
    """Seed 0 of the group again, under another name, a training worker SIGKILLed after epoch 2's checkpoint: Ray
    Train restarts the worker group from it, and every epoch's validation metrics, the training loss and the test
    logits equal those of the unkilled run, bit for bit (CPU, gloo)."""
    workdir, _, _ = arrows
    run_dir = str(workdir / "ray_results" / "again")
    proc = subprocess.Popen(_train_args(workdir, "--augment", NO_FLIP, "--seed", "0", "--run-name", "again",
                                        "--experiment", "recipe-again"),
                            cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (latest_checkpoint(run_dir) or (-1,))[0] >= 1, 600, "epoch 2's checkpoint", proc)
    os.kill(wait_for(train_worker_pids, 60, "the training workers", proc)[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    again = _runs(workdir, "recipe-again")["again"]
    (first,) = [r for n, r in _runs(workdir).items() if n.endswith("-seed0")]
    client = _client(workdir)
    for key in ("val/top1", "val/nll", "val/ece", "train/loss", "train/classes_per_batch", "lr"):
        a = [(m.step, m.value) for m in client.get_metric_history(again.info.run_id, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, key)]
        assert a == b and len(a) == int(EPOCHS), key
    za, ya = _test_logits(workdir, again)
    zb, yb = _test_logits(workdir, first)
    assert torch.equal(ya, yb) and torch.equal(za, zb)
