"""Train a long-tailed classifier with Ray Train (DDP) and track it in MLflow — the main job of lade.

  python pipelines/train.py                                   # embedded default: synthetic data, local Ray
  python pipelines/train.py --config configs/cifar100_lt/lade.yaml --num-workers 4 --use-gpu
  ray job submit --working-dir . -- python pipelines/train.py --smoke-test

Config file -> CLI overrides (only flags you pass override). Rerunning with the same --run-name resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path

from lade_core.artifacts import MODEL_NAME
from lade_core.checkpoint import join_path, latest_checkpoint
from lade_core.config import add_loss_arguments, json_or_name, resolve_config, validate_config
from lade_core.data import DataError
from lade_core.locks import LockHeld, lock_for, maybe_exclusive
from lade_core.losses import LOSSES
from lade_core.runs import SMOKE, check_against_dataset, finalize, load_dataset, storage_uri
from lade_core.runtime import check_job_locations, init_ray, local_num_cpus, quiet_logging
from lade_core.tracking import (
    CONFIG_DIGEST_TAG,
    PARENT_RUN_TAG,
    SEED_GROUP_TAG,
    RunRecord,
    check_reachable,
    end_run,
    logged_model_uri,
    mark_running,
    open_run,
    register_once,
    resolve_tracking_uri,
    run_key,
)
from lade_core.training import build_trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic" / "lade.yaml"
# Keys that may change between a run and its resumption without making it a different experiment.
RUNTIME_KEYS = {"progress", "run_name", "register", "max_failures", "mlflow_uri", "storage_path", "num_workers",
                "use_gpu", "cpus_per_worker", "worker_resources", "mlflow_run_id", "experiment"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the synthetic LADE recipe)")
    ap.add_argument("--dataset", help="prepared dataset directory")
    ap.add_argument("--loss", choices=sorted(LOSSES))
    ap.add_argument("--model", help="resnet32 (lade's), any torchvision classification model (e.g. resnet50, "
                    "convnext_tiny, vit_b_16), or timm:NAME with lade[timm]")
    ap.add_argument("--pretrained", nargs="?", const="DEFAULT",
                    help="the library's pretrained backbone: torchvision weights name (default DEFAULT) or timm tag")
    ap.add_argument("--weights-path", dest="weights_path", help="local state dict to initialize the model from "
                    "(a lade, torchvision or timm checkpoint; a classifier of another class count is left out)")
    ap.add_argument("--augment", type=json_or_name, help="training augmentation: a preset (cifar, imagenet) or a "
                    "JSON list of torchvision.transforms.v2 entries, e.g. '[{\"RandomCrop\": {\"size\": 32, "
                    "\"padding\": 4}}]'")
    ap.add_argument("--normalize", type=json_or_name,
                    help="dataset, a family name, or JSON {\"mean\": [..], \"std\": [..]}")
    ap.add_argument("--mixup", type=lambda a: {"alpha": float(a)}, metavar="ALPHA", help="mixup, Beta(α, α)")
    ap.add_argument("--cutmix", type=lambda a: {"alpha": float(a)}, metavar="ALPHA", help="CutMix, Beta(α, α)")
    add_loss_arguments(ap)  # --alpha, --tau, ...: each loss's own, from its declaration (lade_core.losses)
    ap.add_argument("--image-size", dest="image_size", type=int,
                    help="crop size for training and evaluation (default: the prepared dataset's)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--num-workers", dest="num_workers", type=int)
    ap.add_argument("--use-gpu", dest="use_gpu", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", help="one run per seed, under a parent run (compare.py reports "
                    "mean ± std over them)")
    ap.add_argument("--experiment")
    ap.add_argument("--run-name", dest="run_name")
    ap.add_argument("--mlflow-uri", dest="mlflow_uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--register", help="register the final model under this name")
    ap.add_argument("--storage-path", dest="storage_path",
                    help="Ray Train checkpoints: a path or a URI such as s3://bucket/runs (default "
                         "./outputs/ray_results)")
    ap.add_argument("--max-failures", dest="max_failures", type=int)
    ap.add_argument("--num-cpus", dest="num_cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--smoke-test", dest="smoke_test", action="store_true", help="tiny data, 1 epoch")
    ap.add_argument("--verbose", action="store_true", help="show Ray's INFO logs")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no per-epoch progress bar (the default when stderr is not a terminal)")
    return ap.parse_args(argv)


def config_digest(config: dict) -> str:
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
    from mlflow import MlflowClient

    logged = run.tags.get(CONFIG_DIGEST_TAG) or MlflowClient(config["mlflow_uri"]).get_run(
        run.run_id).data.params.get("config_digest")
    if logged is None:
        raise ValueError(f"run name {config['run_name']!r} exists in experiment {config['experiment']!r} without a "
                         "config digest (not started by train.py); pass another --run-name")
    if logged != digest:
        raise ValueError(f"run name {config['run_name']!r} exists with a different config; pass another --run-name")


def main(argv=None) -> int:
    args = vars(parse_args(argv))
    config_path, num_cpus, smoke = args.pop("config"), args.pop("num_cpus", None), args.pop("smoke_test", False)
    quiet_logging(args.pop("verbose", False))
    overrides = {**(SMOKE if smoke else {}), **args}
    if not sys.stderr.isatty():  # bars redrawn into a log file are noise; the epoch lines say it all
        overrides["progress"] = False
    if "dataset" in args:  # a dataset the user named is opened, never generated from a recipe in the config
        overrides["synthetic"] = None
    seeds = overrides.pop("seeds", None)
    if seeds:
        if "seed" in overrides:
            print("error: pass --seed or --seeds, not both", file=sys.stderr)
            return 2
        return train_seeds(config_path, overrides, num_cpus, seeds)
    with contextlib.ExitStack() as held:  # the run's lock, taken once its name is known, until this driver ends
        return train(config_path, overrides, num_cpus, held)


def train_seeds(config_path: str, overrides: dict, num_cpus: int | None, seeds: list[int]) -> int:
    """One run per seed, in turn, each under a parent run named after the group (MLflow's parentRunId tag); a rerun
    resumes or skips each as ``train`` does. The parent is FINISHED when every seed's run is."""
    if len(set(seeds)) != len(seeds):
        print(f"error: --seeds repeats a seed: {seeds}", file=sys.stderr)
        return 2
    parent = {}
    for seed in seeds:
        with contextlib.ExitStack() as held:
            rc = train(config_path, {**overrides, "seed": seed}, num_cpus, held, parent)
        if rc:
            return rc
    end_run(parent["mlflow_uri"], parent["run_id"])
    print(f"seeds {seeds}: parent run {parent['name']} (MLflow run {parent['run_id']}); "
          f"python pipelines/compare.py --experiment {parent['experiment']} reports mean ± std over them")
    return 0


def train(config_path: str, overrides: dict, num_cpus: int | None, held: contextlib.ExitStack,
          parent: dict | None = None) -> int:
    """The run of one resolved command line, under the run's lock (held by ``held``) once its name is known.
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
    from mlflow import MlflowClient

    run_id = config["mlflow_run_id"] = run.run_id
    client = MlflowClient(config["mlflow_uri"])
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


if __name__ == "__main__":
    sys.exit(main())
