"""pipelines/tune.py: a real smoke search (Ray Tune + Ray Train V2 + ASHA) into a real sqlite MLflow store,
resumed by rerunning; and the search-space checks of tune_spaces."""
import os
import subprocess
import sys

import mlflow
import pytest

import tune_spaces
from conftest import REPO

CMD = [sys.executable, str(REPO / "pipelines" / "tune.py"), "--smoke-test", "--num-cpus", "4",
       "--max-concurrent-trials", "2", "--register", "champ", "--experiment", "smoke-search",
       "--reduction-factor", "4"]  # keep the top quarter at each rung: a stop is near certain with 4 trials


def run_tune(workdir, *args):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*CMD, "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--storage-path",
                           str(workdir / "tune"), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def _last(client, run_id, key):
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step) if history else None


def test_smoke_search_tracks_trials_registers_champion_and_resumes(tmp_path):
    p = run_tune(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke-search")
    (parent,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'smoke-search'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # every trial is a nested child run
    epochs = {}
    for child in children:
        assert {"alpha", "lam", "tau", "lr"} <= set(child.data.params)
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/top1"))
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= 2  # each epoch once
        epochs[child.info.run_id] = len(steps)
    assert min(epochs.values()) < 2, "ASHA (grace period 1, reduction 4) stopped no trial early"
    # The champion is the trial with the best last val/top1.
    last = {rid: _last(client, rid, "val/top1").value for rid in epochs}
    champion = client.get_model_version_by_alias("champ", "champion")
    assert last[champion.run_id] == max(last.values())
    assert parent.data.metrics["best/val/top1"] == pytest.approx(max(last.values()))
    assert "search/summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    # The champion run carries test logits, so evaluate.py --model models:/champ@champion works on it.
    assert "eval/test_logits.parquet" in {a.path for a in client.list_artifacts(champion.run_id, "eval")}

    # Rerunning the same command resumes the finished search: no new trial, no new model version.
    again = run_tune(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming search smoke-search" in again.stdout
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4
    assert [v.version for v in client.search_model_versions("name = 'champ'")] == [champion.version]
    assert client.get_model_version_by_alias("champ", "champion").version == champion.version


def test_concurrency_that_cannot_fit_is_refused_before_trials(tmp_path):
    p = run_tune(tmp_path, "--max-concurrent-trials", "8")
    assert p.returncode == 2 and "--max-concurrent-trials 8 cannot fit the cluster" in p.stderr, p.stderr[-2000:]
    assert "Trial" not in p.stdout


def test_search_never_selects_on_the_test_split(tmp_path):
    """A dataset prepared before every dataset had a val split: tune.py (and train.py) refuse it rather than
    validating, selecting trials and choosing the champion on test."""
    import json
    import shutil

    from conftest import run_prepare, run_train

    old = tmp_path / "old"
    prep = run_prepare(tmp_path, "synthetic", "--num-classes", "3", "--max-count", "8", "--imbalance-ratio", "2",
                       "--test-per-class", "2", "--out", str(old))
    assert prep.returncode == 0, prep.stderr[-3000:]
    manifest = json.loads((old / "dataset.json").read_text())
    del manifest["splits"]["val"]
    (old / "dataset.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "val")
    for p in (run_tune(tmp_path, "--dataset", str(old)), run_train(tmp_path, "--dataset", str(old))):
        assert p.returncode == 2, p.stderr[-2000:]
        assert "has no validation split (prepared by an older lade)" in p.stderr and "Trial" not in p.stdout


def test_unknown_objective_is_rejected_by_the_cli(tmp_path):
    p = run_tune(tmp_path, "--objective", "median")
    assert p.returncode == 2 and "invalid choice: 'median'" in p.stderr


def test_every_family_space_is_valid_and_tau_is_in_range():
    for family in tune_spaces.FAMILIES:
        space, defaults = tune_spaces.load_family(family)
        assert {"alpha", "lam", "tau"} <= set(space) and defaults["epochs"] >= 1
        assert space["tau"] == ("uniform", 0.0, 1.0)
    assert tune_spaces.grid_points(("loguniform", 0.01, 1.0), 3) == pytest.approx([0.01, 0.1, 1.0])
    grid = tune_spaces.to_param_space({"alpha": ("loguniform", 0.01, 1.0), "tau": ("choice", [0.0, 1.0])}, "grid", 2)
    assert grid == {"alpha": {"grid_search": pytest.approx([0.01, 1.0])}, "tau": {"grid_search": [0.0, 1.0]}}


@pytest.mark.parametrize("space, message", [
    ({}, "is empty"),
    ({"alpha": ("loguniform", 1.0, 0.1)}, "lower bound 1.0 is not below upper bound 0.1"),
    ({"tau": ("uniform", 0.0, 1.5)}, "tau range [0.0, 1.5] outside [0.0, 1.0]"),
    ({"tau": ("choice", [0.5, 2.0])}, "tau values [2.0] outside"),
    ({"lam": ("loguniform", 0.0, 1.0)}, "loguniform needs low > 0"),
    ({"alpha": ("normal", 0.0, 1.0)}, "unknown kind"),
    ({"not_a_key": ("uniform", 0.0, 1.0)}, "not a training config key"),
])
def test_bad_space_is_one_clear_error(space, message):
    with pytest.raises(ValueError) as e:
        tune_spaces.validate_space(space, "mine")
    assert message in str(e.value)
