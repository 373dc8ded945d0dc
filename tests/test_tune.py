"""pipelines/tune.py: a real smoke search (Ray Tune + Ray Train V2 + ASHA) against a real MLflow tracking server,
killed mid-way and resumed by rerunning; and the search-space checks of tune_spaces."""
import io
import os
import re
import signal
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from conftest import REPO
from lade_core.tune import spaces as tune_spaces

CMD = [sys.executable, str(REPO / "pipelines" / "tune.py"), "--smoke-test", "--num-cpus", "4",
       "--max-concurrent-trials", "2", "--register", "champ", "--experiment", "smoke-search",
       "--reduction-factor", "4"]  # keep the top quarter at each rung: a stop is near certain with 4 trials


def _env(**extra: str):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_tune(workdir, *args, mlflow_uri=None, env=None):
    return subprocess.run([*CMD, "--mlflow-uri", mlflow_uri or f"sqlite:///{workdir / 'mlflow.db'}", "--storage-path",
                           str(workdir / "tune"), *args], cwd=workdir, env=env or _env(), capture_output=True,
                          text=True, timeout=900)


# Ray Train's controller collects a worker's report every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a smoke epoch
# is shorter, so a worker trains (and would log) its next epoch before Tune acts on the last. A longer poll makes
# that the rule instead of a race: the summary and MLflow disagreed whenever ASHA stopped a trial.
SLOW_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "6"}


def _last(client, run_id, key):
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step) if history else None


# Four trials at once (6 logical CPUs: 4 trials of 1.01 and one for Ray Data) writing to one tracking server on
# PostgreSQL: a team's setup, and the concurrency where a sqlite file's single writer lock bites.
ALL_AT_ONCE = ("--num-cpus", "6", "--max-concurrent-trials", "4")


def test_search_killed_midway_resumes_on_a_tracking_server_with_every_trial_once(tmp_path, team_tracking):
    """A smoke search (4 trials, all at once) against a real tracking server on PostgreSQL, SIGKILLed mid-way with
    its local Ray, then rerun: every trial is one child run with each epoch once, the champion is the best trial, a
    third run adds nothing, and the server never reported a database error."""
    import time

    from lade_core.tracking.store import find_run

    uri, server_log = team_tracking.uri, team_tracking.log
    said_before = server_log.stat().st_size  # the session's server: only what it says during this test counts
    cmd = [*CMD, *ALL_AT_ONCE, "--mlflow-uri", uri, "--storage-path", str(tmp_path / "tune")]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(**SLOW_POLL), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True,
                             start_new_session=True)
    client = mlflow.MlflowClient(uri)
    deadline = time.time() + 600
    while time.time() < deadline:  # mid-way: Tune has saved its state and some trial has logged an epoch
        assert first.poll() is None, first.communicate()[1][-3000:]
        exp = client.get_experiment_by_name("smoke-search")
        children = client.search_runs([exp.experiment_id], "tags.`lade.search` = 'smoke-search'") if exp else []
        if list((tmp_path / "tune" / "smoke-search").glob("experiment_state*.json")) and any(
                "val/top1" in c.data.metrics for c in children):
            break
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert len(children) < 4 or any(c.info.status == "RUNNING" for c in children)  # really killed mid-way
    children = client.search_runs([exp.experiment_id], "tags.`lade.search` = 'smoke-search'")
    logged = {c.data.tags["lade.trial_id"] for c in children if "val/top1" in c.data.metrics}

    p = run_tune(tmp_path, *ALL_AT_ONCE, mlflow_uri=uri, env=_env(**SLOW_POLL))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming search smoke-search" in p.stdout
    # Tune forgets the scheduler's rungs on restore: every trial that had logged an epoch gets them back from MLflow.
    assert set(re.findall(r"ASHA: trial (\S+) resumes with", p.stdout)) == logged
    exp = client.get_experiment_by_name("smoke-search")
    parent = find_run(client, exp.experiment_id, "smoke-search")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and len({c.info.run_name for c in children}) == 4  # every trial once
    epochs = {}
    for child in children:
        assert {"alpha", "lam", "class_weight_power", "lr"} <= set(child.data.params)
        assert child.info.status == "FINISHED"  # trained to the end or stopped early, none left RUNNING
        for key in ("val/top1", "train/loss", "lr"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(len(steps))) and 1 <= len(steps) <= 2, (key, steps)  # each epoch once
        epochs[child.info.run_id] = len(steps)
    # A trial stopped after its first epoch (ASHA, grace period 1) was below another trial's first epoch. Whether
    # any is stopped depends on the order trials reach the rung, so that is left to the scheduler's unit test.
    first_top1 = {rid: min(client.get_metric_history(rid, "val/top1"), key=lambda m: m.step).value for rid in epochs}
    for rid in (r for r, n in epochs.items() if n == 1):
        assert max(first_top1.values()) > first_top1[rid], (first_top1, epochs)
    summary = pd.read_json(io.StringIO(open(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="search/summary.json", tracking_uri=uri)).read()), orient="split")
    names = {client.get_run(rid).info.run_name: n for rid, n in epochs.items()}
    assert dict(zip(summary["trial"], summary["epochs"])) == names  # epochs, not Tune's restarted iterations
    assert list(summary["stopped_early"]) == [names[t] < 2 for t in summary["trial"]]
    # The champion is the trial Tune found best on its last val/top1. MLflow's record of that metric can differ:
    # a trial killed after logging an epoch but before Tune saved its result trains that epoch again on resume,
    # and the exactly-once logger keeps the first value (seen once in CI: 0.79 logged, 0.42 retrained).
    last = {rid: _last(client, rid, "val/top1").value for rid in epochs}
    champion = client.get_model_version_by_alias("champ", "champion")
    parent = client.get_run(parent.info.run_id)
    assert client.get_run(champion.run_id).info.run_name == parent.data.tags["lade.best_trial"]
    assert 0 < parent.data.metrics["best/val/top1"] <= 1 and set(last) >= {champion.run_id}
    assert parent.info.status == "FINISHED"
    assert "search/summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    # The champion run carries test logits, so evaluate.py --model models:/champ@champion works on it.
    assert "eval/test_logits.parquet" in {a.path for a in client.list_artifacts(champion.run_id, "eval")}

    # Rerunning the finished search: no new trial, no new model version, no metric written twice.
    again = run_tune(tmp_path, *ALL_AT_ONCE, mlflow_uri=uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming search smoke-search" in again.stdout
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4
    assert [v.version for v in client.search_model_versions("name = 'champ'")] == [champion.version]
    assert len(client.get_metric_history(champion.run_id, "test/top1")) == 1
    server_said = server_log.read_text()[said_before:]
    assert not [e for e in ("database is locked", "OperationalError", "IntegrityError") if e in server_said], \
        server_said[-3000:]
    assert "database is locked" not in p.stderr + again.stderr


@pytest.mark.slow
def test_concurrency_that_cannot_fit_is_refused_before_trials(tmp_path):
    p = run_tune(tmp_path, "--max-concurrent-trials", "8")
    assert p.returncode == 2 and "--max-concurrent-trials 8 cannot fit the cluster" in p.stderr, p.stderr[-2000:]
    assert "Trial" not in p.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_objective_is_rejected_by_the_cli(tmp_path):
    p = run_tune(tmp_path, "--objective", "median")
    assert p.returncode == 2 and "invalid choice: 'median'" in p.stderr


def test_every_family_space_is_valid_and_the_class_weight_power_is_in_range():
    for family in tune_spaces.FAMILIES:
        space, defaults = tune_spaces.load_family(family)
        assert {"alpha", "lam", "class_weight_power"} <= set(space) and defaults["epochs"] >= 1
        assert space["class_weight_power"] == ("uniform", 0.0, 1.0)
    assert tune_spaces.grid_points(("loguniform", 0.01, 1.0), 3) == pytest.approx([0.01, 0.1, 1.0])
    grid = tune_spaces.to_param_space({"alpha": ("loguniform", 0.01, 1.0),
                                       "class_weight_power": ("choice", [0.0, 1.0])},
                                      "grid", 2)
    assert grid == {"alpha": {"grid_search": pytest.approx([0.01, 1.0])},
                    "class_weight_power": {"grid_search": [0.0, 1.0]}}


@pytest.mark.parametrize("space, message", [
    ({}, "is empty"),
    ({"alpha": ("loguniform", 1.0, 0.1)}, "lower bound 1.0 is not below upper bound 0.1"),
    ({"class_weight_power": ("uniform", 0.0, 1.5)}, "class_weight_power range [0.0, 1.5] outside [0.0, 1.0]"),
    ({"class_weight_power": ("choice", [0.5, 2.0])}, "class_weight_power values [2.0] outside"),
    ({"loss": ("methods", {"fancy": {}})}, "unknown method 'fancy'"),
    ({"loss": ("methods", {"focal": {"alpha": ("uniform", 0.0, 1.0)}})},
     "loss focal takes no hyperparameters ['alpha']"),
    ({"loss": ("methods", {"focal": {"gamma": ("uniform", -1.0, 1.0)}})}, "gamma range [-1.0, 1.0] outside"),
    ({"lam": ("loguniform", 0.0, 1.0)}, "loguniform needs low > 0"),
    ({"alpha": ("normal", 0.0, 1.0)}, "unknown kind"),
    ({"not_a_key": ("uniform", 0.0, 1.0)}, "not a training config key"),
])
def test_bad_space_is_one_clear_error(space, message):
    with pytest.raises(ValueError) as e:
        tune_spaces.validate_space(space, "mine")
    assert message in str(e.value)


def test_a_search_over_the_loss_draws_each_method_with_its_own_hyperparameters():
    from ray.tune.search.sample import Categorical, Float

    from lade_core.config.schema import DEFAULTS, validate_config
    from lade_core.tune.trials import select_method

    space, _ = tune_spaces.load_family("smoke")
    space = tune_spaces.with_methods(space, ["lade", "focal", "causal_norm", "softmax"])
    tune_spaces.validate_space(space, "smoke")
    assert space["loss"][1]["lade"] == {k: space_k for k, space_k in tune_spaces.load_family("smoke")[0].items()
                                        if k in ("alpha", "lam", "class_weight_power")}
    assert "alpha" not in space and space["lr"] == ("loguniform", 0.001, 0.5)  # shared keys stay shared
    random = tune_spaces.to_param_space(space)
    assert isinstance(random["loss"], Categorical)
    assert random["loss"].categories == ["lade", "focal", "causal_norm", "softmax"]
    assert isinstance(random["focal/gamma"], Float) and isinstance(random["causal_norm/alpha"], Float)
    # A LADE base config (its defaults filled in, as the driver's check does), then one trial per method.
    base = {**DEFAULTS, "dataset": "d", "alpha": 0.1, "lam": 0.01, "estimator": "released", "search_base_loss": "lade",
            "lade/alpha": 0.5, "lade/lam": 0.2, "lade/class_weight_power": 0.3, "focal/gamma": 1.5,
            "causal_norm/alpha": 2.5}
    cn = validate_config(select_method({**base, "loss": "causal_norm"}))
    assert (cn["alpha"], cn["tau"], cn["heads"], cn["lam"], cn["gamma"]) == (2.5, 16.0, 2, None, 0.03125)
    assert not [k for k in cn if "/" in k]
    focal = validate_config(select_method({**base, "loss": "focal"}))
    assert (focal["gamma"], focal["alpha"], focal["lam"]) == (1.5, None, None)
    lade = validate_config(select_method({**{k: v for k, v in base.items() if k != "lade/lam"}, "loss": "lade"}))
    assert (lade["alpha"], lade["lam"], lade["class_weight_power"]) == (0.5, 0.01, 0.3)  # base lam kept for LADE
    softmax = validate_config(select_method({**base, "loss": "softmax"}))
    assert all(softmax[k] is None for k in ("alpha", "lam", "gamma", "tau"))
    # Grid: one setting per method and grid point, never one method crossed with another's values.
    grid = tune_spaces.to_param_space({"loss": ("methods", {"focal": {"gamma": ("uniform", 0.0, 2.0)},
                                                            "softmax": {}})}, "grid", 3)
    settings = grid["loss"]["grid_search"]
    assert settings == [{"loss": "focal", "gamma": 0.0}, {"loss": "focal", "gamma": 1.0},
                        {"loss": "focal", "gamma": 2.0}, {"loss": "softmax"}]
    assert validate_config(select_method({**base, "loss": settings[1]}))["gamma"] == 1.0


def test_ray_tune_resolves_a_methods_space_into_valid_trial_configs():
    """The space as Ray Tune itself resolves it (its variant generator, as BasicVariantGenerator uses): every drawn
    trial is a valid training config of its own method, random and grid alike."""
    from ray.tune.search.variant_generator import generate_variants

    from lade_core.config.schema import DEFAULTS, validate_config
    from lade_core.methods import LOSSES
    from lade_core.tune.trials import select_method

    space = tune_spaces.with_methods(tune_spaces.load_family("smoke")[0], ["lade", "focal", "causal_norm", "ldam_drw"])
    base = {**DEFAULTS, "dataset": "d", "alpha": 0.1, "lam": 0.01, "estimator": "released", "search_base_loss": "lade"}
    seen = set()
    for search in ("random", "grid"):
        param_space = tune_spaces.to_param_space(space, search, 2)
        for _ in range(12 if search == "random" else 1):
            for _, drawn in generate_variants({"config": param_space}):
                trial = validate_config(select_method({**base, **drawn["config"]}))
                loss = trial["loss"]
                seen.add(loss)
                own = {k: v for k, v in drawn["config"].items() if k.startswith(f"{loss}/")}
                assert all(trial[k.split("/", 1)[1]] == v for k, v in own.items()), (loss, own, trial)
                given = {k for k in ("alpha", "lam", "tau", "gamma", "heads", "max_margin", "scale", "beta")
                         if trial[k] is not None}
                assert given <= set(LOSSES[loss].hyperparameters), (loss, given)
    assert seen == {"lade", "focal", "causal_norm", "ldam_drw"}


def test_asha_stops_the_same_trials_after_a_search_is_killed_and_resumed(tmp_path):
    """EpochASHA against a real MLflow store: a search killed after two trials' first epoch and resumed (Tune
    unpickles the scheduler built at the start, and a resumed trial's training_iteration starts again at 1) makes
    the same stop decisions as the search that was never killed."""
    import pickle
    from types import SimpleNamespace

    import mlflow

    from lade_core.tracking.store import start_or_resume_run
    from lade_core.tune.trials import EpochASHA, trial_run_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    top1 = {"a": [0.9, 0.95], "b": [0.5, 0.6], "c": [0.6, 0.8], "d": [0.2, 0.3]}  # val/top1 after epochs 1, 2

    def scheduler():
        s = EpochASHA(max_t=2, grace_period=1, reduction_factor=2, mlflow_uri=uri, experiment="exp", search="s")
        s.set_search_properties("val/top1", "max")
        return s

    def report(s, trial, epoch, iteration):
        """What Tune hands the scheduler, and what rank 0 logs to the trial's MLflow run."""
        run_id, _ = start_or_resume_run(uri, "exp", trial_run_name("s", trial.trial_id),
                                        {"source_prior": [0.5, 0.5], "train_counts": [2, 2]})
        mlflow.MlflowClient(uri).log_metric(run_id, "val/top1", top1[trial.trial_id][epoch], step=epoch)
        return s.on_trial_result(None, trial, {"epoch": epoch, "training_iteration": iteration,
                                               "val/top1": top1[trial.trial_id][epoch]})

    trials = {t: SimpleNamespace(trial_id=t) for t in top1}
    never_killed = scheduler()
    for t in trials.values():
        never_killed.on_trial_add(None, t)
    expected = {t: never_killed.on_trial_result(None, trials[t], {"epoch": 0, "training_iteration": 1,
                                                                  "val/top1": v[0]}) for t, v in top1.items()}
    assert expected == {"a": "CONTINUE", "b": "STOP", "c": "STOP", "d": "STOP"}  # each below the median so far

    started = pickle.dumps(scheduler())  # tuner.pkl: the scheduler as the search started
    first = pickle.loads(started)
    for t in trials.values():
        first.on_trial_add(None, t)
    got = {t: report(first, trials[t], 0, 1) for t in ("a", "b")}  # killed here
    resumed = pickle.loads(started)
    for t in trials.values():  # Tune adds every trial back: a, b restored from their checkpoints, c, d new
        resumed.on_trial_add(None, t)
    assert report(resumed, trials["a"], 1, 1) == "STOP"  # a's second epoch is its last (max_t), not a rung-1 result
    got.update({t: report(resumed, trials[t], 0, 1) for t in ("c", "d")})
    assert got == expected


def test_asha_records_epochs_a_resumed_trial_skipped_at_their_own_rungs(tmp_path):
    """A trial killed after its checkpoints but before Tune collected their results resumes and first reports its
    last epoch. EpochASHA files the first epoch's value (from the checkpoint's
    history) at rung 1, not the second epoch's: the decisions equal a search that was never killed."""
    import json
    from types import SimpleNamespace

    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from lade_core.train.checkpoint import HISTORY_FILE
    from lade_core.tune.trials import EpochASHA

    def scheduler():
        # As in the smoke search: 2 epochs, reduction factor 4, so rung 1 (epoch 1) is the only rung.
        s = EpochASHA(max_t=2, grace_period=1, reduction_factor=4, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}",
                      experiment="exp", search="s", storage=str(tmp_path))
        s.set_search_properties("val/top1", "max")
        return s

    top1 = {"a": [0.9, 0.95], "x": [0.3, 0.99], "y": [0.92, 0.93]}
    trials = {t: SimpleNamespace(trial_id=t) for t in top1}
    never_killed = scheduler()
    for t in trials.values():
        never_killed.on_trial_add(None, t)
    expected = {t: never_killed.on_trial_result(None, trials[t], {"epoch": 0, "val/top1": v[0]})
                for t, v in top1.items()}
    assert expected == {"a": "CONTINUE", "x": "STOP", "y": "CONTINUE"}

    checkpoint = tmp_path / "trials" / "x" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / HISTORY_FILE).write_text(json.dumps([{"epoch": e, "val/top1": v} for e, v in enumerate(top1["x"])]))
    resumed = scheduler()
    for t in trials.values():
        resumed.on_trial_add(None, t)
    got = {"a": resumed.on_trial_result(None, trials["a"], {"epoch": 0, "val/top1": 0.9})}
    # x's first result after the kill is its last epoch, which names the checkpoint holding both; it is the last
    # (max_t), so x stops and completes, and ASHA files that result at the highest rung x has no record at.
    last = {"epoch": 1, "val/top1": 0.99, CHECKPOINT_PATH_KEY: str(checkpoint)}
    got["x"] = resumed.on_trial_result(None, trials["x"], last)
    resumed.on_trial_complete(None, trials["x"], last)
    got["y"] = resumed.on_trial_result(None, trials["y"], {"epoch": 0, "val/top1": 0.92})
    assert got == expected  # without the history, rung 1 held x's 0.99 and y (0.92, better than x's 0.3) stopped
