"""The driver side of a training run (``pipelines/train.py`` is its command line): the run's identity (its config
digest), the checks before Ray starts, resuming or finalizing a run found in MLflow, and seed groups.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys

from lade_core.config.context import RunContext, flat_config
from lade_core.config.recipes import resolve_train_config
from lade_core.config.schema import RuntimeConfig, TrainConfig, check_runnable
from lade_core.data import DataError
from lade_core.runtime.local_ray import check_job_locations, init_ray, local_num_cpus
from lade_core.runtime.locks import LockHeld, lock_for, maybe_exclusive
from lade_core.tracking.artifacts import MODEL_NAME
from lade_core.tracking.store import (
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
from lade_core.train.checkpoint import join_path, latest_checkpoint
from lade_core.train.loop import build_trainer
from lade_core.train.runs import check_against_dataset, finalize, load_dataset, storage_uri, trainable_line

# Keys that may change between a run and its resumption without making it a different experiment.
RUNTIME_KEYS = {"progress", "run_name", "register", "max_failures", "mlflow_uri", "storage_path", "num_workers",
                "use_gpu", "cpus_per_worker", "worker_resources", "mlflow_run_id", "experiment", "decode"}


# Keys added after runs already existed, left out of the digest at these defaults: a run started before them keeps
# its identity, and the default run name that holds its digest, so rerunning its command resumes or finishes it.
LATER_DEFAULTS = {"peft": "none", "peft_rank": None, "text_init": False, "pretrained_file": None,
                  "reduced_decode": False}


def config_digest(config: TrainConfig, run: RunContext) -> str:
    """A run's identity: the digest of its flat config (``flat_config``: what its params and checkpoint hold)
    without the keys that may change on resumption (``RUNTIME_KEYS``) and the later keys at their defaults."""
    core = {k: v for k, v in flat_config(config, run).items()
            if k not in RUNTIME_KEYS and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:10]


def check_cluster_fits(runtime: RuntimeConfig) -> None:
    import ray

    res = ray.cluster_resources()
    workers = runtime.num_workers
    need_cpu = workers * runtime.cpus_per_worker
    if res.get("CPU", 0) < need_cpu:
        raise RuntimeError(f"num_workers={workers} needs {need_cpu:g} CPUs; the cluster has {res.get('CPU', 0):g}")
    if runtime.use_gpu and res.get("GPU", 0) < workers:
        raise RuntimeError(f"num_workers={workers} with --use-gpu needs that many GPUs; the cluster has "
                           f"{res.get('GPU', 0):g}")
    for name, amount in (runtime.worker_resources or {}).items():
        if res.get(name, 0) < amount * workers:
            raise RuntimeError(f"num_workers={workers} needs {amount * workers:g} of resource {name!r} "
                               f"(worker_resources); the cluster has {res.get(name, 0):g}")


def check_same_run(runtime: RuntimeConfig, run: RunRecord, digest: str) -> None:
    """A found run is resumed only with the config it was started with (its digest, a tag set at creation; a param
    for runs of older lade); a run with none was not started by train.py and is never taken over silently."""
    logged = run.tags.get(CONFIG_DIGEST_TAG) or mlflow_client(runtime.mlflow_uri).get_run(
        run.run_id).data.params.get("config_digest")
    if logged is None:
        raise ValueError(f"run name {runtime.run_name!r} exists in experiment {runtime.experiment!r} without a "
                         "config digest (not started by train.py); pass another --run-name")
    if logged != digest:
        raise ValueError(f"run name {runtime.run_name!r} exists with a different config; pass another --run-name")


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
        config = resolve_train_config(config_path, overrides)
        check_job_locations(mlflow_uri=config.runtime.mlflow_uri, storage_path=config.runtime.storage_path)
        config = config.replace(mlflow_uri=resolve_tracking_uri(config.runtime.mlflow_uri))
        rt = config.runtime
        check_reachable(rt.mlflow_uri)
        num_cpus = local_num_cpus(num_cpus, rt.num_workers * rt.cpus_per_worker)
        check_runnable(config)
        config, prepared = load_dataset(config)
        config = check_against_dataset(config, prepared)
        config = config.replace(storage_path=storage_uri(rt.storage_path, "outputs/ray_results"))
        run_context = RunContext(prepared.source_prior.tolist(), prepared.class_counts("train"))
        digest = config_digest(config, run_context)
        group = config_digest(config.replace(seed=None), run_context)  # the runs that differ from it only in seed
        tags = {CONFIG_DIGEST_TAG: digest, SEED_GROUP_TAG: group}
        rt = config.runtime
        if parent is not None:
            base = rt.run_name or f"{prepared.name}-{config.loss.loss}-{group}"
            if not parent:
                record = open_run(rt.mlflow_uri, rt.experiment, base,
                                  flat_config(config.replace(seed=None), run_context), tags={SEED_GROUP_TAG: group},
                                  storage=rt.storage_path)
                parent.update(run_id=record.run_id, name=base, mlflow_uri=rt.mlflow_uri, experiment=rt.experiment)
            config = config.replace(run_name=f"{base}-seed{config.runtime.seed}")
            tags[PARENT_RUN_TAG] = parent["run_id"]
        config = config.replace(run_name=config.runtime.run_name or f"{prepared.name}-{config.loss.loss}-{digest}")
        rt = config.runtime
        held.enter_context(maybe_exclusive(lock_for(rt.storage_path, f"run-{run_key(rt.run_name)}"),
                                           f"run {rt.run_name!r}"))  # one driver per run (lade_core.runtime.locks)
        run = open_run(rt.mlflow_uri, rt.experiment, rt.run_name, flat_config(config, run_context), tags=tags,
                       storage=rt.storage_path)
        if run.resumed:
            check_same_run(rt, run, digest)  # before anything touches the run: a refusal leaves its state
    except (ValueError, FileNotFoundError, ConnectionError, DataError, LockHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray.train

    run_id = run.run_id
    run_context = dataclasses.replace(run_context, mlflow_run_id=run_id)
    client = mlflow_client(rt.mlflow_uri)
    if run.status == "FINISHED":
        # Finalized before: nothing to train or log, no Ray to start. A --register added now is done from MLflow.
        if rt.register:
            register_once(client, run_id, rt.register, logged_model_uri(client, run_id, MODEL_NAME))
        print(f"run {rt.run_name} is finished (MLflow run {run_id}); nothing to do")
        return 0
    line, fraction = trainable_line(config, prepared)
    print(line)
    if not run.resumed:
        client.log_param(run_id, "config_digest", digest)  # also as a param, to compare runs by it in the UI
        client.log_param(run_id, "trainable_fraction", f"{fraction:.6g}")
    else:
        print(f"resuming run {rt.run_name} (MLflow run {run_id})")
    try:
        init_ray(num_cpus=num_cpus)
        check_cluster_fits(rt)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        if not run.resumed:  # a run of this invocation's own; a found run keeps the state it had
            end_run(rt.mlflow_uri, run_id, failed=True)
        return 2
    mark_running(rt.mlflow_uri, run)
    try:
        epochs = config.optimizer.epochs
        latest = latest_checkpoint(join_path(rt.storage_path, rt.run_name))
        if latest and latest.epoch + 1 >= epochs:
            # Trained to the end before (the driver may have died before finalizing): finalize, never retrain.
            print(f"run {rt.run_name}: all {epochs} epochs are checkpointed; finalizing")
            checkpoint = ray.train.Checkpoint(latest.path)
        else:
            checkpoint = build_trainer(config, run_context, prepared).fit().checkpoint
        finalize(config, run_context, prepared, checkpoint)
    except BaseException:
        end_run(rt.mlflow_uri, run_id, failed=True)  # a crashed run shows FAILED, not FINISHED
        raise
    return 0
