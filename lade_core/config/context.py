"""What a run derives at run time beside its ``TrainConfig`` (``RunContext``, and the ``SearchContext`` of a Tune
trial), and the one flat dict both cross Ray and MLflow as (``flat_config`` / ``split_flat_config``)."""
from __future__ import annotations

from dataclasses import dataclass

from lade_core.config.schema import KEY_SECTION, TrainConfig


@dataclass(frozen=True)
class SearchContext:
    """The Tune search a trial belongs to (``lade_core.tune.search``). Flat, at the Ray and MLflow boundaries, as the
    keys ``search``, ``search_storage``, ``search_base_loss`` and ``parent_run_id``."""

    name: str  # the search (its --experiment): its parent run, its trials' run names
    storage: str  # the search's folder in --storage-path; its trials' checkpoints under ``trials/``
    base_loss: str  # the base config's loss: only its trials keep the base config's loss hyperparameters
    parent_run_id: str | None = None  # the search's MLflow parent run
    features: str | None = None  # --cache-features: the backbone's cached features, each trial trains a head on them


@dataclass(frozen=True)
class RunContext:
    """What a run derives at run time beside its ``TrainConfig``, never written in a recipe: its dataset's source
    prior and training class counts, its MLflow run, and the search it is a trial of. Under a search the driver
    logs the epochs Tune acted on (``tuning.TrialEpochLogger``) and the workers log none; else rank 0 logs them.
    """

    source_prior: list[float]  # p_s(y), [C]
    train_counts: list[int]  # training images per class, [C]
    mlflow_run_id: str | None = None
    search: SearchContext | None = None

    @property
    def workers_log_epochs(self) -> bool:
        return self.search is None


# The flat keys of a RunContext (beside a TrainConfig's) in the dict Ray and MLflow get.
SEARCH_KEYS = {"search": "name", "search_storage": "storage", "search_base_loss": "base_loss",
               "parent_run_id": "parent_run_id", "search_features": "features"}
RUN_KEYS = ("source_prior", "train_counts", "mlflow_run_id", "epoch_logging", *SEARCH_KEYS)


def flat_config(config: TrainConfig, run: RunContext | None = None) -> dict:
    """The one flat dict of a run at the Ray and MLflow boundaries: Ray Train's ``train_loop_config``, Tune's param
    space, the checkpoint's ``config.json``, MLflow params and ``config.yaml``, the config digest. Keys unset in
    ``run`` are left out (a run's params and digest never held them)."""
    flat = config.to_dict()
    if run is None:
        return flat
    flat.update(source_prior=list(run.source_prior), train_counts=list(run.train_counts))
    if run.mlflow_run_id is not None:
        flat["mlflow_run_id"] = run.mlflow_run_id
    if run.search is not None:
        flat.update({key: getattr(run.search, field) for key, field in SEARCH_KEYS.items()
                     if getattr(run.search, field) is not None})
        flat["epoch_logging"] = "driver"
    return flat


def split_flat_config(flat: dict) -> tuple[TrainConfig, RunContext]:
    """``flat_config``'s inverse, where a flat dict comes back from Ray (a worker's ``train_loop_config``, a Tune
    trial's sampled config, a restored search's saved param space): the config checked again (a trial's sampled
    values are checked here like a file's) and the run's context."""
    unknown = sorted(set(flat) - set(KEY_SECTION) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(KEY_SECTION)}")
    config = TrainConfig.from_dict({k: v for k, v in flat.items() if k in KEY_SECTION})
    search = (SearchContext(**{field: flat.get(key) for key, field in SEARCH_KEYS.items()})
              if flat.get("search") is not None else None)
    return config, RunContext(flat["source_prior"], flat["train_counts"], flat.get("mlflow_run_id"), search)


