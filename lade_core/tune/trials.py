"""Ray Tune glue: the per-trial driver function (the Ray Train V2 pattern) and the search summary.

Ray Train V2 runs under Tune through a driver function: each trial calls ``trial_driver(config)``, which builds
and fits a ``TorchTrainer``; ``TuneReportCallback`` forwards rank 0's per-epoch reports to Tune, so schedulers
such as ASHA see every epoch. Each trial is an MLflow child run nested under the search's parent run.
"""
from __future__ import annotations

import hashlib
import json
import math

from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler

from lade_core.compat import asha_bracket, asha_count_stop, asha_metric_sign, asha_rungs
from lade_core.registry import Registry

# A search's objective -> the validation metric each trial reports (lade_core.train.loop.evaluate) and Tune maximizes.
OBJECTIVES: Registry[str] = Registry("objective", {"uniform": "val/top1", "shift_mean": "val/shift_mean_top1"})


# What makes a search the same search: a rerun with the same --experiment resumes it only if this agrees.
SEARCH_DIGEST_TAG = "lade.search_digest"


def search_digest(identity: dict) -> str:
    """A digest of what identifies a search (its dataset, objective, space and schedule), set on its parent run."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_search_digest(uri: str, experiment: str, digest: str) -> None:
    """A rerun resumes the search it names, never another: Tune restores its own saved space and settings, and the
    champion would be finalized against this invocation's dataset and objective."""
    from lade_core.tracking.store import named_run

    parent = named_run(uri, experiment, experiment)
    stored = parent.data.tags.get(SEARCH_DIGEST_TAG) if parent else None
    if parent is not None and stored != digest:
        why = ("was started by an older lade" if stored is None
               else "was started with another dataset, objective, space or schedule")
        raise ValueError(f"search {experiment!r} {why}; rerun it with its original flags to resume it, or pass "
                         "another --experiment")


def select_method(config: dict) -> dict:
    """A trial's config as a plain training config when the search is over the loss itself (``tune_spaces``'s
    ``with_methods``): the drawn method's own values in place (``<method>/<key>`` from random search, or the
    grid's {loss, key: value} setting), other methods' draws dropped. The base config's loss hyperparameters stay
    only for trials of the base config's loss (``search_base_loss``): another loss starts from its own defaults,
    never reads LADE's alpha as Causal Norm's."""
    from lade_core.methods import LOSS_KEYS

    config = dict(config)
    setting = config["loss"] if isinstance(config.get("loss"), dict) else {}
    drawn = {k: v for k, v in config.items() if "/" in k}
    if not setting and not drawn:
        return config  # a search over one loss's hyperparameters
    for k in drawn:
        del config[k]
    loss = setting.get("loss", config["loss"])
    if loss != config.get("search_base_loss"):
        config.update({k: None for k in LOSS_KEYS})
    config.update({k.split("/", 1)[1]: v for k, v in drawn.items() if k.split("/", 1)[0] == loss})
    config.update({**setting, "loss": loss})
    return config


def trial_run_name(search: str, trial_id: str) -> str:
    return f"{search}-{trial_id}"


# What Tune adds to a trial's reported metrics (rank 0 reports the rest: lade_core.train.loop.train_loop_per_worker).
TUNE_RESULT_KEYS = {*AUTO_RESULT_KEYS, CHECKPOINT_PATH_KEY, "trial_id", "done", "experiment_tag", "should_checkpoint"}

# ASHA's clock: epochs a trial has completed (rank 0 reports the 0-based ``epoch``).
EPOCHS_DONE = "epochs_completed"


def epochs_completed(result: dict) -> int:
    """Epochs a trial's last result says it completed; not Tune's ``training_iteration``, which restarts at 1 when a
    trial resumes from its checkpoint."""
    return int(result["epoch"]) + 1 if "epoch" in result else 0


class EpochASHA(ASHAScheduler):
    """ASHA over completed epochs whose rungs survive a resumed search.

    Ray Tune 2.60 does not save a scheduler with the experiment: ``Tuner.restore`` unpickles the one built when
    the search started, rungs empty. Nor does it keep a resumed function trial's ``training_iteration``: it starts
    again at 1 while the trainer resumes from its checkpoint. A search killed mid-way and resumed would compare
    epoch-2 results against epoch-1 rungs that forgot every earlier trial, and stop far fewer trials. So:

    - the time attribute is the epochs completed (``epoch`` + 1), which a resumed trainer carries on counting;
    - a trial added to the scheduler gets its rung records back from its own MLflow run (``trial_run_name``),
      which holds each epoch's validation metrics exactly once. A new trial has no run yet, and gets none;
    - a result that skips epochs Tune never saw (trained and checkpointed before a kill, but not yet collected:
      the resumed trial goes on from that checkpoint, or reports it if it was the last) first gets those epochs'
      rung records from its checkpoint's history. Without them ASHA files the later epoch's value at the earlier
      rung (``on_trial_complete`` records a finished trial's last result there), and that higher value then stops
      a trial that beat every other trial's value at that rung (seen in CI: the best first epoch was stopped).
    """

    def __init__(self, *, mlflow_uri: str, experiment: str, search: str, storage: str | None = None, **kwargs):
        super().__init__(time_attr=EPOCHS_DONE, **kwargs)
        self._runs = (mlflow_uri, experiment, search)
        self._storage = storage  # where the trials' checkpoints are (Ray Train's storage), for their histories

    @staticmethod
    def _with_epochs(result: dict) -> dict:
        return {**result, EPOCHS_DONE: epochs_completed(result)} if "epoch" in result else result

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        stop_earlier = self._fill_skipped_rungs(trial, result)
        action = super().on_trial_result(tune_controller, trial, self._with_epochs(result))
        if stop_earlier and action != self.STOP:
            asha_count_stop(self)
        return self.STOP if stop_earlier else action

    def _fill_skipped_rungs(self, trial, result: dict) -> bool:
        """Record, in order, the epochs before ``result``'s at rungs the trial has no record at, from the history of
        the checkpoint the result names. True if ASHA would have stopped the trial at one of them."""
        done = epochs_completed(result)
        bracket = asha_bracket(self, trial.trial_id)
        if bracket is None or self._metric not in result or not any(
                milestone < done and trial.trial_id not in recorded for milestone, recorded in asha_rungs(bracket)):
            return False
        from lade_core.train.checkpoint import checkpoint_history

        path = result.get(CHECKPOINT_PATH_KEY)
        storage = getattr(self, "_storage", None)  # None in a scheduler pickled by an older lade (a resumed search)
        history = checkpoint_history(storage, path) if path and storage else None
        stop = False
        for m in sorted(history or [], key=lambda m: m["epoch"]):
            if m["epoch"] + 1 < done and m.get(self._metric) is not None:
                stop |= bracket.on_result(trial, m["epoch"] + 1, asha_metric_sign(self) * m[self._metric]) == self.STOP
        return stop

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        # ASHA files a finished trial's last result at the highest rung it has no record at: that must be its own.
        self._fill_skipped_rungs(trial, result)
        super().on_trial_complete(tune_controller, trial, self._with_epochs(result))

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = self._logged_history(trial.trial_id)
        bracket = asha_bracket(self, trial.trial_id)
        for m in history:  # epoch by epoch, as the trial reported them: each rung records its own epoch's value
            bracket.on_result(trial, m.step + 1, asha_metric_sign(self) * m.value)
        if history:
            print(f"ASHA: trial {trial.trial_id} resumes with {len(history)} epochs of {self._metric} from MLflow")

    def _logged_history(self, trial_id: str) -> list:
        from lade_core.tracking.store import mlflow_client

        run = trial_run(*self._runs, trial_id)
        if run is None:
            return []
        return sorted(mlflow_client(self._runs[0]).get_metric_history(run.info.run_id, self._metric),
                      key=lambda m: m.step)


def trial_run(mlflow_uri: str, experiment: str, search: str, trial_id: str):
    """The MLflow run of one trial of the search (``trial_run_name``), or None before its driver created it."""
    from lade_core.tracking.store import named_run

    return named_run(mlflow_uri, experiment, trial_run_name(search, trial_id))


class TrialEpochLogger(Callback):
    """Each trial's per-epoch metrics into its MLflow run, from the search driver, for exactly the results Tune acted
    on (a trial's ``RunContext.search`` is set: the training workers then log none).

    Why not rank 0, as in a plain training run: Ray Train's controller collects a worker's report only every couple
    of seconds (its health-check poll; the worker's result queue holds one), so a worker trains and reports up to an
    epoch ahead of what Tune has seen. When the scheduler stops a trial, that epoch was trained, and rank 0 would have
    logged it, although Tune never saw it: the trial's run said 2 epochs, the search summary 1. Logged here, MLflow
    holds what the scheduler judged and the summary reports.

    A result names its checkpoint, whose history lists every epoch up to it: epochs whose results Tune never
    processed before a kill (their checkpoints were registered) are backfilled, each epoch still exactly once.
    """

    def __init__(self, *, mlflow_uri: str, experiment: str, search: str, storage: str):
        self._runs = (mlflow_uri, experiment, search)
        self._storage = storage
        self._loggers: dict = {}

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the search; clients are rebuilt on resume
        return {**self.__dict__, "_loggers": {}}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.log_result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        # The trial's last result again: an epoch whose log a kill or an MLflow hiccup swallowed is written now.
        self.log_result(trial.trial_id, trial.last_result or {})

    def log_result(self, trial_id: str, result: dict) -> None:
        """Every epoch up to ``result``'s (a result Tune acted on) into the trial's run, each exactly once: its
        checkpoint's history fills in epochs whose results were never logged. Also called by the search driver for
        every trial at the end of a search (``pipelines/tune.py``), so a trial finished before a kill, whose last
        result reached Tune's saved state but not MLflow, is complete too."""
        from lade_core.train.checkpoint import checkpoint_history

        if "epoch" not in result:
            return
        logger = self._logger(trial_id)
        if logger is None:
            return
        path = result.get(CHECKPOINT_PATH_KEY)
        history = checkpoint_history(self._storage, path) if path else None
        if not history:  # unreadable storage: at least this epoch, without the keys Tune adds to every result
            history = [{k: v for k, v in result.items() if k not in TUNE_RESULT_KEYS}]
        logger.backfill([m for m in history if m["epoch"] <= result["epoch"]])

    def _logger(self, trial_id: str):
        from lade_core.tracking.store import EpochLogger

        if trial_id not in self._loggers:
            run = trial_run(*self._runs, trial_id)
            if run is None:  # the trial's driver creates its run before training: not yet, try again next result
                return None
            self._loggers[trial_id] = EpochLogger(self._runs[0], run.info.run_id)
        return self._loggers[trial_id]


def trial_driver(loop_config: dict) -> None:
    """One Tune trial. ``loop_config`` is the search's flat config (``config.flat_config``: a training config, the
    search's ``RunContext``) with this trial's sampled values."""
    import dataclasses

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lade_core.config.context import flat_config, split_flat_config
    from lade_core.data import open_prepared
    from lade_core.runtime.local_ray import quiet_worker_logging
    from lade_core.tracking.store import end_run, start_or_resume_run
    from lade_core.train.checkpoint import join_path, latest_checkpoint
    from lade_core.train.loop import build_trainer

    quiet_worker_logging()
    config, run = split_flat_config(select_method(loop_config))  # the sampled values, checked like a file's
    search, trial_id = run.search, tune.get_context().get_trial_id()
    # A restored trial refits a trainer with the same name and storage: Ray Train resumes from its checkpoint.
    config = config.with_loss_defaults().replace(run_name=trial_run_name(search.name, trial_id),
                                                 storage_path=join_path(search.storage, "trials"))
    rt = config.runtime
    run_id, _ = start_or_resume_run(rt.mlflow_uri, rt.experiment, rt.run_name, flat_config(config, run),
                                    tags={"mlflow.parentRunId": search.parent_run_id, "lade.search": search.name,
                                          "lade.trial_id": trial_id}, storage=rt.storage_path)
    run = dataclasses.replace(run, mlflow_run_id=run_id)
    latest = latest_checkpoint(join_path(rt.storage_path, rt.run_name))
    if latest and latest.epoch + 1 >= config.optimizer.epochs:
        # Trained to the end before the search was killed, but Tune may not have seen the last epochs: a refit
        # would train nothing and report nothing, and the trial would end on a stale result. Report the last.
        tune.report({**latest.metrics, CHECKPOINT_PATH_KEY: latest.path})
        return
    try:
        if search.features:  # --cache-features: the head alone, on the frozen backbone's features
            from lade_core.train.features import head_trial

            head_trial(config, run, open_prepared(config.data.dataset))
        else:
            build_trainer(config, run, open_prepared(config.data.dataset), callbacks=[TuneReportCallback()]).fit()
    except Exception:
        end_run(rt.mlflow_uri, run_id, failed=True)
        raise


def summary_rows(results, space_keys: list[str], metric: str, epochs: int) -> list[dict]:
    """One row per trial of a ``ResultGrid``: sampled values, epochs run, last objective, early stop. In a search
    over the loss, ``loss`` and the drawn method's own values (``hyperparameters``)."""
    from lade_core.methods import LOSSES

    rows = []
    for r in results:
        m = r.metrics or {}
        done = epochs_completed(m)
        config = select_method(r.config)
        values = {k: config.get(k) for k in space_keys}
        if "loss" in space_keys:
            values["hyperparameters"] = ", ".join(f"{k}={config[k]:.4g}" if isinstance(config[k], float) else
                                                  f"{k}={config[k]}" for k in LOSSES[config["loss"]].hyperparameters
                                                  if config.get(k) is not None)
        rows.append({"trial": trial_run_name(r.config["search"], m.get("trial_id", "?")), **values, "epochs": done,
                     metric: float(m.get(metric, math.nan)), "stopped_early": done < epochs and r.error is None,
                     "error": "" if r.error is None else type(r.error).__name__})
    return sorted(rows, key=lambda r: r["trial"])  # stable across reruns, so the logged table is not rewritten
