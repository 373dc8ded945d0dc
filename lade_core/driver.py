"""The driver side of a training run (``pipelines/train.py`` is its command line): the run's identity (its config
digest), the checks before Ray starts, resuming or finalizing a run found in MLflow, and seed groups.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys

from .artifacts import MODEL_NAME
from .checkpoint import join_path, latest_checkpoint
from .config import resolve_config, validate_config
from .data import DataError
from .locks import LockHeld, lock_for, maybe_exclusive
from .runs import check_against_dataset, finalize, load_dataset, storage_uri
from .runtime import check_job_locations, init_ray, local_num_cpus
from .tracking import (
    CONFIG_DIGEST_TAG,
    PARENT_RUN_TAG,
    SEED_GROUP_TAG,
    RunRecord,
    check_reachable,
    end_run,
    logged_model_uri,
    mark_running,
    mlflow_client,
    open_run,
    register_once,
    resolve_tracking_uri,
    run_key,
)
from .training import build_trainer

# Keys that may change between a run and its resumption without making it a different experiment.
RUNTIME_KEYS = {"progress", "run_name", "register", "max_failures", "mlflow_uri", "storage_path", "num_workers",
                "use_gpu", "cpus_per_worker", "worker_resources", "mlflow_run_id", "experiment"}


def config_digest(config: dict) -> str:
    """A run's identity: the digest of its config without the keys that may change on resumption (``RUNTIME_KEYS``)."""
    core = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:10]


def check_cluster_fits(config: dict) -> None:
    import ray

    res = ray.cluster_resources()
    need_cpu = config["num_workers"] * config["cpus_per_worker"]
    if res.get("CPU", 0) < need_cpu:
        raise RuntimeError(f"num_workers={config['num_workers']} needs {need_cpu:g} CPUs; the cluster has "
                           f"{res.get('CPU', 0):g}")
    if config["use_gpu"] and res.get("GPU", 0) < config["num_workers"]:
        raise RuntimeError(f"num_workers={config['num_workers']} with --use-gpu needs that many GPUs; the cluster has "
                           f"{res.get('GPU', 0):g}")
    for name, amount in (config["worker_resources"] or {}).items():
        if res.get(name, 0) < amount * config["num_workers"]:
            raise RuntimeError(f"num_workers={config['num_workers']} needs {amount * config['num_workers']:g} of "
                               f"resource {name!r} (worker_resources); the cluster has {res.get(name, 0):g}")


def check_same_run(config: dict, run: RunRecord, digest: str) -> None:
    """A found run is resumed only with the config it was started with (its digest, a tag set at creation; a param
    for runs of older lade); a run with none was not started by train.py and is never taken over silently."""
    logged = run.tags.get(CONFIG_DIGEST_TAG) or mlflow_client(config["mlflow_uri"]).get_run(
        run.run_id).data.params.get("config_digest")
    if logged is None:
        raise ValueError(f"run name {config['run_name']!r} exists in experiment {config['experiment']!r} without a "
                         "config digest (not started by train.py); pass another --run-name")
    if logged != digest:
        raise ValueError(f"run name {config['run_name']!r} exists with a different config; pass another --run-name")


def train_seeds(config_path: str | None, overrides: dict, num_cpus: int | None, seeds: list[int]) -> int:
    """One run per seed, in turn, each under a parent run named after the group (MLflow's parentRunId tag); a rerun
    resumes or skips each as ``train_run`` does. The parent is FINISHED when every seed's run is."""
    if len(set(seeds)) != len(seeds):
        print(f"error: --seeds repeats a seed: {seeds}", file=sys.stderr)
        return 2
    parent = {}
    for seed in seeds:
        with contextlib.ExitStack() as held:
            rc = train_run(config_path, {**overrides, "seed": seed}, num_cpus, held, parent)
        if rc:
            return rc
    end_run(parent["mlflow_uri"], parent["run_id"])
    print(f"seeds {seeds}: parent run {parent['name']} (MLflow run {parent['run_id']}); "
          f"python pipelines/compare.py --experiment {parent['experiment']} reports mean ± std over them")
    return 0


def train_run(config_path: str | None, overrides: dict, num_cpus: int | None, held: contextlib.ExitStack,
              parent: dict | None = None) -> int:
    """The run of one resolved command line (config file ``config_path`` <- ``overrides``): resolve and check the
    config, open or resume its MLflow run, then train (resuming from the latest checkpoint), finalize, or, for a run
    trained to the end before, finalize without retraining. Under the run's lock (held by ``held``) once its name is
    known. Returns the exit status: 0, or 2 with one error line on stderr for bad input.
    ``parent`` (from ``train_seeds``): the seed group's parent run, opened by its first seed's call and filled in
    here."""
    try:
        config = resolve_config(config_path, overrides)
        check_job_locations(mlflow_uri=config["mlflow_uri"], storage_path=config["storage_path"])
        config["mlflow_uri"] = resolve_tracking_uri(config["mlflow_uri"])
        check_reachable(config["mlflow_uri"])
        num_cpus = local_num_cpus(num_cpus, config["num_workers"] * config["cpus_per_worker"])
        validate_config(config)
        prepared = load_dataset(config, num_cpus)
        config = check_against_dataset(config, prepared)
        config["source_prior"] = prepared.source_prior.tolist()
        config["train_counts"] = prepared.class_counts("train")
        config["storage_path"] = storage_uri(config["storage_path"], "outputs/ray_results")
        digest = config_digest(config)
        group = config_digest({**config, "seed": None})  # the runs that differ from this one only in seed
        tags = {CONFIG_DIGEST_TAG: digest, SEED_GROUP_TAG: group}
        if parent is not None:
            base = config["run_name"] or f"{prepared.name}-{config['loss']}-{group}"
            if not parent:
                record = open_run(config["mlflow_uri"], config["experiment"], base, {**config, "seed": None},
                                  tags={SEED_GROUP_TAG: group}, storage=config["storage_path"])
                parent.update(run_id=record.run_id, name=base, mlflow_uri=config["mlflow_uri"],
                              experiment=config["experiment"])
            config["run_name"] = f"{base}-seed{config['seed']}"
            tags[PARENT_RUN_TAG] = parent["run_id"]
        config["run_name"] = config["run_name"] or f"{prepared.name}-{config['loss']}-{digest}"
        held.enter_context(maybe_exclusive(lock_for(config["storage_path"], f"run-{run_key(config['run_name'])}"),
                                           f"run {config['run_name']!r}"))  # one driver per run (lade_core.locks)
        run = open_run(config["mlflow_uri"], config["experiment"], config["run_name"], config, tags=tags,
                       storage=config["storage_path"])
        if run.resumed:
            check_same_run(config, run, digest)  # before anything touches the run: a refusal leaves its state
    except (ValueError, FileNotFoundError, ConnectionError, DataError, LockHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray.train

    run_id = config["mlflow_run_id"] = run.run_id
    client = mlflow_client(config["mlflow_uri"])
    if run.status == "FINISHED":
        # Finalized before: nothing to train or log, no Ray to start. A --register added now is done from MLflow.
        if config["register"]:
            register_once(client, run_id, config["register"], logged_model_uri(client, run_id, MODEL_NAME))
        print(f"run {config['run_name']} is finished (MLflow run {run_id}); nothing to do")
        return 0
    if not run.resumed:
        client.log_param(run_id, "config_digest", digest)  # also as a param, to compare runs by it in the UI
    else:
        print(f"resuming run {config['run_name']} (MLflow run {run_id})")
    try:
        init_ray(num_cpus=num_cpus)
        check_cluster_fits(config)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        if not run.resumed:  # a run of this invocation's own; a found run keeps the state it had
            end_run(config["mlflow_uri"], run_id, failed=True)
        return 2
    mark_running(config["mlflow_uri"], run)
    try:
        latest = latest_checkpoint(join_path(config["storage_path"], config["run_name"]))
        if latest and latest.epoch + 1 >= config["epochs"]:
            # Trained to the end before (the driver may have died before finalizing): finalize, never retrain.
            print(f"run {config['run_name']}: all {config['epochs']} epochs are checkpointed; finalizing")
            checkpoint = ray.train.Checkpoint(latest.path)
        else:
            checkpoint = build_trainer(config, prepared).fit().checkpoint
        finalize(config, prepared, checkpoint)
    except BaseException:
        end_run(config["mlflow_uri"], run_id, failed=True)  # a crashed run shows FAILED, not FINISHED
        raise
    return 0
