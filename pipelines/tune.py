"""Search LADE's α, λ, the class weights α_c ∝ p_s^power and the learning rate with Ray Tune, or the loss itself with
each method's own hyperparameters (--methods); every trial in MLflow.

  python pipelines/tune.py --smoke-test                                   # 4 trials x 2 epochs, tiny data
  python pipelines/tune.py --space cifar100_lt --methods lade causal_norm logit_adjusted --objective shift_mean
  python pipelines/tune.py --space cifar100_lt --dataset data/cifar100_lt --objective shift_mean --register lade-c100

Ray Train V2 under Tune: each trial runs a driver function that fits a TorchTrainer (DDP workers); ASHA stops
poor trials early on epochs. Objective: validation top-1 under the uniform prior (`uniform`) or the mean top-1
over the 11 shifted priors with the loss's post-hoc rule (`shift_mean`). MLflow: a parent run named after the
experiment, one nested child run per trial, the search summary on the parent; the best trial's model is
registered under --register with the alias `champion`. Rerunning with the same --experiment resumes the search.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

import pandas as pd

import tune_spaces
from lade_core.checkpoint import join_path
from lade_core.config import json_or_name, resolve_config, validate_config
from lade_core.data import DataError
from lade_core.locks import lock_for, maybe_exclusive
from lade_core.losses import LOSSES
from lade_core.report import format_table
from lade_core.runs import SMOKE, check_against_dataset, dataset_class_names, finalize, load_dataset, storage_uri
from lade_core.runtime import check_job_locations, init_ray, local_num_cpus, quiet_logging
from lade_core.serving import check_alias_classes
from lade_core.tracking import end_run, log_table_once, resolve_tracking_uri, start_or_resume_run
from lade_core.tuning import (
    OBJECTIVES,
    SEARCH_DIGEST_TAG,
    EpochASHA,
    TrialEpochLogger,
    check_search_digest,
    search_digest,
    select_method,
    summary_rows,
    trial_driver,
    trial_run,
    trial_run_name,
)

REPO = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
# A trial's driver only waits on its TorchTrainer, which reserves the real CPUs; Tune refuses an empty request.
DRIVER_CPUS = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", choices=tune_spaces.FAMILIES, help="search space family (default: synthetic; smoke "
                    "with --smoke-test)")
    ap.add_argument("--config", help="base training config (default: the space's)")
    ap.add_argument("--methods", nargs="+", metavar="LOSS", help="search over these losses too, each with its own "
                    "hyperparameters (LADE: the space's ranges; others: their declared ranges, "
                    "tune_spaces.method_space)")
    ap.add_argument("--dataset", help="prepared dataset directory (default: the config's)")
    ap.add_argument("--epochs", type=int, help="epochs per trial = ASHA's max_t (default: the space's)")
    ap.add_argument("--augment", type=json_or_name, help="every trial's training augmentation: a preset or a JSON list "
                    "of torchvision.transforms.v2 entries (as train.py --augment)")
    ap.add_argument("--normalize", type=json_or_name, help="dataset, a family name, or JSON {mean, std}")
    ap.add_argument("--num-workers", type=int, default=1, help="training workers per trial")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--num-samples", type=int, help="trials (random) or repeats of the grid (grid)")
    ap.add_argument("--max-concurrent-trials", type=int, help="default: as many as the cluster's CPUs fit")
    ap.add_argument("--search", choices=("random", "grid"), default="random")
    ap.add_argument("--grid-points", type=int, default=3, help="points per range with --search grid")
    ap.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    ap.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/r at each rung")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="uniform")
    ap.add_argument("--experiment", default="lade-tune", help="MLflow experiment and Tune run name; rerun to resume")
    ap.add_argument("--register", help="register the best trial's model under this name, alias 'champion'")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--storage-path", help="Tune and trial checkpoints: a path or a URI such as s3://bucket/tune "
                    "(default ./outputs/tune)")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--seed", type=int, default=0, help="random search seed")
    ap.add_argument("--smoke-test", action="store_true", help="tiny data, the smoke space, 4 trials x 2 epochs")
    ap.add_argument("--verbose", action="store_true", help="show Ray's INFO logs")
    return ap.parse_args(argv)


def check_args(args) -> None:
    """What the flags alone can get wrong, before any data or Ray: each one clear error."""
    # The experiment names the search's folder under --storage-path (Tune's run name): one path component.
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", args.experiment):
        raise ValueError(f"--experiment {args.experiment!r}: use letters, digits, '_', '-' and '.' (it names the "
                         "search's folder in --storage-path and its MLflow experiment)")
    for name in ("epochs", "num_samples", "grace_period", "num_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.reduction_factor < 2:
        raise ValueError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")


# --smoke-test data: like train.py's smoke set but with enough steps per epoch (~15) for trials to differ.
TUNE_SMOKE = {**SMOKE, "dataset": "data/synthetic_tune_smoke",
              "synthetic": {**SMOKE["synthetic"], "max_count": 200, "val_per_class": 40}}


def base_config(args, defaults: dict) -> dict:
    """The training config every trial starts from: the space's config file <- the flags given here."""
    overrides = {"num_workers": args.num_workers, "use_gpu": args.use_gpu, "experiment": args.experiment,
                 "mlflow_uri": resolve_tracking_uri(args.mlflow_uri), "epochs": args.epochs or defaults["epochs"],
                 "register": args.register, "max_failures": 0, "progress": False}
    if args.smoke_test:
        overrides = {**TUNE_SMOKE, **overrides, "num_workers": args.num_workers}
    if args.dataset:
        overrides.update(dataset=args.dataset, synthetic=None)  # a named dataset is opened, never generated
    overrides.update({k: getattr(args, k) for k in ("augment", "normalize") if getattr(args, k) is not None})
    return resolve_config(args.config or REPO / defaults["config"], overrides)


def concurrency(args, config: dict) -> int:
    """Trials that fit at once, keeping one CPU for Ray Data's read/decode tasks (else they starve and hang)."""
    import ray

    res = ray.cluster_resources()
    per_trial = config["num_workers"] * config["cpus_per_worker"] + DRIVER_CPUS
    # A whole CPU must stay free for Ray Data: 3 trials of 1 + 0.01 on 4 CPUs leave 0.97, and every read waits.
    fit = int((res.get("CPU", 0) - 1) // per_trial)
    if config["use_gpu"]:
        fit = min(fit, int(res.get("GPU", 0) // config["num_workers"]))
    if fit < 1:
        raise RuntimeError(f"one trial needs {per_trial:g} "
                           f"CPUs{' and ' + str(config['num_workers']) + ' GPUs' if config['use_gpu'] else ''} "
                           f"plus 1 CPU for Ray Data; the cluster has {res.get('CPU', 0):g} CPUs, "
                           f"{res.get('GPU', 0):g} GPUs")
    if args.max_concurrent_trials is None:
        return fit
    if args.max_concurrent_trials < 1 or args.max_concurrent_trials > fit:
        raise RuntimeError(f"--max-concurrent-trials {args.max_concurrent_trials} cannot fit the cluster: each trial "
                           f"needs "
                           f"{per_trial:g} CPUs and Ray Data 1 more; {res.get('CPU', 0):g} CPUs fit at most {fit}")
    return args.max_concurrent_trials


def build_tuner(args, config: dict, space: dict, defaults: dict, storage: str, max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    metric = OBJECTIVES[args.objective]
    trainable = tune.with_resources(trial_driver, {"CPU": DRIVER_CPUS})
    path = join_path(storage, args.experiment)
    if tune.Tuner.can_restore(path):
        print(f"resuming search {args.experiment} from {path} (its space and settings are the saved ones)")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    scheduler = (EpochASHA(max_t=config["epochs"], grace_period=args.grace_period or defaults["grace_period"],
                           reduction_factor=args.reduction_factor, mlflow_uri=config["mlflow_uri"],
                           experiment=config["experiment"], search=config["search"],
                           storage=config["search_storage"])
                 if args.scheduler == "asha" else FIFOScheduler())
    samples = args.num_samples or (1 if args.search == "grid" else defaults["num_samples"])
    return tune.Tuner(
        trainable,
        param_space={**config, **tune_spaces.to_param_space(space, args.search, args.grid_points)},
        # The generator itself caps concurrency: TuneConfig(max_concurrent_trials=) is ignored with a generator.
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, num_samples=samples,
                                    search_alg=BasicVariantGenerator(random_state=args.seed,
                                                                     max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name=args.experiment, storage_path=storage, callbacks=[TrialEpochLogger(
            mlflow_uri=config["mlflow_uri"], experiment=config["experiment"], search=config["search"],
            storage=config["search_storage"])]),
    )


def register_champion(client, best, prepared, name: str) -> str:
    """Finalize the best trial (test logits, model) and register its model once (reruns reuse it); point the alias
    ``champion`` at it."""
    from ray.train import Checkpoint

    run_name = trial_run_name(best.config["search"], best.metrics["trial_id"])
    run = trial_run(client.tracking_uri, best.config["experiment"], best.config["search"], best.metrics["trial_id"])
    config = {**select_method(best.config), "run_name": run_name, "mlflow_run_id": run.info.run_id, "register": name}
    check_alias_classes(config["mlflow_uri"], name, CHAMPION, dataset_class_names(prepared))
    finalize(config, prepared, Checkpoint(best.metrics["checkpoint_path"]))  # idempotent: reruns add nothing
    (version,) = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'") if v.name == name]
    client.set_registered_model_alias(name, CHAMPION, version.version)  # moves the alias if it exists
    return f"models:/{name}@{CHAMPION} -> version {version.version} (run {run_name})"


def close_trial_runs(client, results, epochs: TrialEpochLogger) -> None:
    """Each trial's MLflow run holds every epoch of its last result Tune recorded (``epochs.log_result``: a trial
    that finished just before a kill had that result saved by Tune, maybe not yet logged), then ends FINISHED
    (trained to the end or stopped early by the scheduler) or FAILED (the trial errored)."""
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id")
        if trial_id is None:
            continue
        epochs.log_result(trial_id, r.metrics)
        run = trial_run(client.tracking_uri, r.config["experiment"], r.config["search"], trial_id)
        if run is not None:
            client.set_terminated(run.info.run_id, "FAILED" if r.error is not None else "FINISHED")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet_logging(args.verbose)
    with contextlib.ExitStack() as held:  # the search's lock, until this driver ends
        return search(args, held)


def search(args, held: contextlib.ExitStack) -> int:
    """The search of one command line, under its lock (held by ``held``): one driver per search."""
    family = args.space or ("smoke" if args.smoke_test else "synthetic")
    try:
        check_args(args)
        check_job_locations(mlflow_uri=args.mlflow_uri, storage_path=args.storage_path)
        storage = storage_uri(args.storage_path, "outputs/tune")
        held.enter_context(maybe_exclusive(lock_for(storage, f"search-{args.experiment}"),
                                           f"search {args.experiment!r}"))
        space, defaults = tune_spaces.load_family(family)
        if args.methods:
            space = tune_spaces.with_methods(space, args.methods)
            tune_spaces.validate_space(space, family)
        if args.smoke_test and args.num_samples is None:
            args.num_samples = defaults["num_samples"]
        config = base_config(args, defaults)
        validate_config(config)
        grace = args.grace_period or defaults["grace_period"]
        if args.scheduler == "asha" and grace > config["epochs"]:
            given = "--grace-period" if args.grace_period else f"the {family} space's default"
            raise ValueError(f"ASHA's grace period {grace} ({given}) exceeds the {config['epochs']} epochs per "
                             f"trial; pass --grace-period <= {config['epochs']}")
        num_cpus = local_num_cpus(args.num_cpus, config["num_workers"] * config["cpus_per_worker"])
        prepared = load_dataset(config, num_cpus)
        config = check_against_dataset(config, prepared)  # trials are selected on val, never on test
        if args.objective == "shift_mean" and 0 in prepared.class_counts("val"):
            raise ValueError("objective shift_mean needs every class in the val split; use --objective uniform")
        # The search's identity: its data, objective, space and schedule (not where it runs or how many at once).
        digest = search_digest({"dataset": config["dataset"], "objective": args.objective, "family": family,
                                "space": space, "methods": args.methods, "search": args.search,
                                "grid_points": args.grid_points, "scheduler": args.scheduler,
                                "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                                "epochs": config["epochs"], "num_samples": args.num_samples, "seed": args.seed,
                                "loss": config["loss"], "augment": config["augment"], "normalize": config["normalize"]})
        check_search_digest(config["mlflow_uri"], args.experiment, digest)
        if args.register:
            check_alias_classes(config["mlflow_uri"], args.register, CHAMPION, dataset_class_names(prepared))
        init_ray(num_cpus=num_cpus)
        max_concurrent = concurrency(args, config)
    except (ValueError, FileNotFoundError, DataError, RuntimeError) as e:  # LockHeld is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    import mlflow

    config.update(source_prior=prepared.source_prior.tolist(), train_counts=prepared.class_counts("train"),
                  search=args.experiment, search_storage=join_path(storage, args.experiment),
                  search_base_loss=config["loss"], epoch_logging="driver")  # tuning.TrialEpochLogger
    parent_id, _ = start_or_resume_run(config["mlflow_uri"], args.experiment, args.experiment,
                                       {**config, "space": family, "objective": args.objective,
                                        "search_alg": args.search,
                                        "scheduler": args.scheduler},
                                       tags={"lade.kind": "search", SEARCH_DIGEST_TAG: digest})
    config["parent_run_id"] = parent_id
    print(f"search {args.experiment}: space {family}, objective {OBJECTIVES[args.objective]}, {args.scheduler}, "
          f"up to {max_concurrent} trials at once; MLflow parent run {parent_id}")
    try:
        results = build_tuner(args, config, space, defaults, storage, max_concurrent).fit()
    except BaseException:
        end_run(config["mlflow_uri"], parent_id, failed=True)
        raise
    metric = OBJECTIVES[args.objective]
    rows = summary_rows(results, list(space), metric, config["epochs"])
    client = mlflow.MlflowClient(config["mlflow_uri"])
    close_trial_runs(client, results, TrialEpochLogger(mlflow_uri=config["mlflow_uri"], experiment=config["experiment"],
                                                       search=config["search"], storage=config["search_storage"]))
    log_table_once(client, parent_id, pd.DataFrame(rows), "search/summary.json")
    print(format_table(rows, list(rows[0]) if rows else []), end="")
    ok = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    if not ok:
        print("error: no trial reported the objective", file=sys.stderr)
        end_run(config["mlflow_uri"], parent_id, failed=True)
        return 1
    best = results.get_best_result(metric=metric, mode="max", scope="last", filter_nan_and_inf=True)
    client.log_metric(parent_id, f"best/{metric}", float(best.metrics[metric]))
    client.set_tag(parent_id, "lade.best_trial", trial_run_name(best.config["search"], best.metrics["trial_id"]))
    chosen = select_method(best.config)
    print(f"best trial: {trial_run_name(best.config['search'], best.metrics['trial_id'])}  {metric} "
          f"{best.metrics[metric]:.4f}  loss={chosen['loss']}  " + "  ".join(
              f"{k}={v:.4g}" for k, v in chosen.items()
              if isinstance(v, float) and (k in space or "/" in str(k) or k in LOSSES[chosen['loss']].hyperparameters)))
    if args.register:
        print(register_champion(client, best, prepared, args.register))
    end_run(config["mlflow_uri"], parent_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
