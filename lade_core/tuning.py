"""Ray Tune glue: the per-trial driver function (the Ray Train V2 pattern) and the search summary.

Ray Train V2 runs under Tune through a driver function: each trial calls ``trial_driver(config)``, which builds
and fits a ``TorchTrainer``; ``TuneReportCallback`` forwards rank 0's per-epoch reports to Tune, so schedulers
such as ASHA see every epoch. Each trial is an MLflow child run nested under the search's parent run.
"""
from __future__ import annotations

import math

# Tune objectives -> the validation metric each reports (see lade_core.training.evaluate).
OBJECTIVES = {"uniform": "val/top1", "shift_mean": "val/shift_mean_top1"}


def select_method(config: dict) -> dict:
    """A trial's config as a plain training config when the search is over the loss itself (``tune_spaces``'s
    ``with_methods``): the drawn method's own values in place (``<method>/<key>`` from random search, or the
    grid's {loss, key: value} setting), other methods' draws dropped. The base config's loss hyperparameters stay
    only for trials of the base config's loss (``search_base_loss``): another loss starts from its own defaults,
    never reads LADE's alpha as Causal Norm's."""
    from .losses import LOSS_KEYS

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


def trial_driver(config: dict) -> None:
    """One Tune trial. ``config`` is a training config plus ``search``, ``search_storage``, ``parent_run_id``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .data import open_prepared
    from .runtime import quiet_worker_logging
    from .config import validate_config
    from .tracking import end_run, start_or_resume_run
    from .training import build_trainer, join_path

    quiet_worker_logging()
    config = select_method(config)
    trial_id = tune.get_context().get_trial_id()
    config["run_name"] = trial_run_name(config["search"], trial_id)
    # A restored trial refits a trainer with the same name and storage: Ray Train resumes from its checkpoint.
    config["storage_path"] = join_path(config["search_storage"], "trials")
    config = {**config, **validate_config(config)}  # the sampled values, type- and range-checked like a file's
    run_id, _ = start_or_resume_run(config["mlflow_uri"], config["experiment"], config["run_name"], config,
                                    tags={"mlflow.parentRunId": config["parent_run_id"], "lade.search": config["search"],
                                          "lade.trial_id": trial_id}, storage=config["storage_path"])
    config["mlflow_run_id"] = run_id
    try:
        build_trainer(config, open_prepared(config["dataset"]), callbacks=[TuneReportCallback()]).fit()
    except Exception:
        end_run(config["mlflow_uri"], run_id, failed=True)
        raise


def summary_rows(results, space_keys: list[str], metric: str, epochs: int) -> list[dict]:
    """One row per trial of a ``ResultGrid``: sampled values, epochs run, last objective, early stop. In a search
    over the loss, ``loss`` and the drawn method's own values (``hyperparameters``)."""
    from .losses import LOSSES

    rows = []
    for r in results:
        m = r.metrics or {}
        done = int(m.get("training_iteration", 0))
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
