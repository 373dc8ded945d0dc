"""The driver side of a hyperparameter search (``pipelines/tune.py`` is its command line): the checks before Ray
starts, the search's identity and resumption, the Tuner (ASHA over epochs, the MLflow epoch logger), the summary on
the parent run and the champion's registration. ``args`` is the command line's namespace (``tune.py --help``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import time

import pandas as pd

from lade_core.config.context import RunContext, SearchContext, flat_config, split_flat_config
from lade_core.config.recipes import resolve_train_config
from lade_core.config.schema import RuntimeConfig, TrainConfig, check_runnable
from lade_core.data import DataError
from lade_core.methods import LOSSES
from lade_core.report.tables import format_table
from lade_core.runtime.local_ray import check_job_locations, init_ray, local_num_cpus
from lade_core.runtime.locks import lock_for, maybe_exclusive
from lade_core.tracking.model import check_alias_classes
from lade_core.tracking.store import end_run, log_table_once, mlflow_client, resolve_tracking_uri, start_or_resume_run
from lade_core.train.checkpoint import join_path
from lade_core.train.features import cache_features, check_cacheable
from lade_core.train.runs import SMOKE, check_against_dataset, dataset_class_names, finalize, load_dataset, storage_uri
from lade_core.tune import spaces as tune_spaces
from lade_core.tune.trials import (
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

CHAMPION = "champion"
# A trial's driver only waits on its TorchTrainer, which reserves the real CPUs; Tune refuses an empty request.
DRIVER_CPUS = 0.01


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


# The model flags a search takes as train.py does (every trial's), part of the search's identity where given.
FOUNDATION_FLAGS = ("model", "pretrained", "pretrained_file", "peft", "text_init", "image_size")


def base_config(args, defaults: dict) -> TrainConfig:
    """The training config every trial starts from: the space's config file <- the flags given here."""
    overrides = {"num_workers": args.num_workers, "use_gpu": args.use_gpu, "experiment": args.experiment,
                 "mlflow_uri": resolve_tracking_uri(args.mlflow_uri), "epochs": args.epochs or defaults["epochs"],
                 "register": args.register, "max_failures": 0, "progress": False}
    if args.smoke_test:
        overrides = {**TUNE_SMOKE, **overrides, "num_workers": args.num_workers}
    if args.dataset:
        overrides.update(dataset=args.dataset, synthetic=None)  # a named dataset is opened, never generated
    overrides.update({k: getattr(args, k) for k in ("augment", "normalize", *FOUNDATION_FLAGS)
                      if getattr(args, k, None) is not None})
    return resolve_train_config(args.config or defaults["config"], overrides)


def concurrency(args, runtime: RuntimeConfig) -> int:
    """Trials that fit at once, keeping one CPU for Ray Data's read/decode tasks (else they starve and hang)."""
    import ray

    res = ray.cluster_resources()
    per_trial = runtime.num_workers * runtime.cpus_per_worker + DRIVER_CPUS
    # A whole CPU must stay free for Ray Data: 3 trials of 1 + 0.01 on 4 CPUs leave 0.97, and every read waits.
    fit = int((res.get("CPU", 0) - 1) // per_trial)
    if runtime.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // runtime.num_workers))
    if fit < 1:
        raise RuntimeError(f"one trial needs {per_trial:g} "
                           f"CPUs{' and ' + str(runtime.num_workers) + ' GPUs' if runtime.use_gpu else ''} "
                           f"plus 1 CPU for Ray Data; the cluster has {res.get('CPU', 0):g} CPUs, "
                           f"{res.get('GPU', 0):g} GPUs")
    if args.max_concurrent_trials is None:
        return fit
    if args.max_concurrent_trials < 1 or args.max_concurrent_trials > fit:
        raise RuntimeError(f"--max-concurrent-trials {args.max_concurrent_trials} cannot fit the cluster: each trial "
                           f"needs "
                           f"{per_trial:g} CPUs and Ray Data 1 more; {res.get('CPU', 0):g} CPUs fit at most {fit}")
    return args.max_concurrent_trials


def build_tuner(args, config: TrainConfig, run: RunContext, space: dict, defaults: dict, storage: str,
                max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    metric = OBJECTIVES.lookup(args.objective)
    # A trial on cached features trains its head in its own process: the CPUs a Ray Train trial's workers would.
    cpus = (config.runtime.num_workers * config.runtime.cpus_per_worker) if run.search.features else DRIVER_CPUS
    trainable = tune.with_resources(trial_driver, {"CPU": cpus})
    path = join_path(storage, args.experiment)
    if tune.Tuner.can_restore(path):
        print(f"resuming search {args.experiment} from {path} (its space and settings are the saved ones)")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    runs = {"mlflow_uri": config.runtime.mlflow_uri, "experiment": config.runtime.experiment,
            "search": run.search.name, "storage": run.search.storage}  # where the trials' runs and checkpoints are
    scheduler = (EpochASHA(max_t=config.optimizer.epochs, grace_period=args.grace_period or defaults["grace_period"],
                           reduction_factor=args.reduction_factor, **runs)
                 if args.scheduler == "asha" else FIFOScheduler())
    samples = args.num_samples or (1 if args.search == "grid" else defaults["num_samples"])
    return tune.Tuner(
        trainable,
        param_space={**flat_config(config, run), **tune_spaces.to_param_space(space, args.search, args.grid_points)},
        # The generator itself caps concurrency: TuneConfig(max_concurrent_trials=) is ignored with a generator.
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, num_samples=samples,
                                    search_alg=BasicVariantGenerator(random_state=args.seed,
                                                                     max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name=args.experiment, storage_path=storage, callbacks=[TrialEpochLogger(**runs)]),
    )


def register_champion(client, best, prepared, name: str) -> str:
    """Finalize the best trial (test logits, model) and register its model once (reruns reuse it); point the alias
    ``champion`` at it."""
    from ray.train import Checkpoint

    config, context = split_flat_config(select_method(best.config))  # Tune's flat dict -> typed
    run_name = trial_run_name(context.search.name, best.metrics["trial_id"])
    run = trial_run(client.tracking_uri, config.runtime.experiment, context.search.name, best.metrics["trial_id"])
    config = config.replace(run_name=run_name, register=name)
    check_alias_classes(config.runtime.mlflow_uri, name, CHAMPION, dataset_class_names(prepared))
    finalize(config, dataclasses.replace(context, mlflow_run_id=run.info.run_id), prepared,
             Checkpoint(best.metrics["checkpoint_path"]))  # idempotent: reruns add nothing
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
        check_runnable(config)
        epochs = config.optimizer.epochs
        grace = args.grace_period or defaults["grace_period"]
        if args.scheduler == "asha" and grace > epochs:
            given = "--grace-period" if args.grace_period else f"the {family} space's default"
            raise ValueError(f"ASHA's grace period {grace} ({given}) exceeds the {epochs} epochs per "
                             f"trial; pass --grace-period <= {epochs}")
        num_cpus = local_num_cpus(args.num_cpus, config.runtime.num_workers * config.runtime.cpus_per_worker)
        config, prepared = load_dataset(config)
        config = check_against_dataset(config, prepared)  # trials are selected on val, never on test
        if args.cache_features:
            check_cacheable(config)
        if args.objective == "shift_mean" and 0 in prepared.class_counts("val"):
            raise ValueError("objective shift_mean needs every class in the val split; use --objective uniform")
        uri = config.runtime.mlflow_uri
        # The search's identity: its data, objective, space and schedule (not where it runs or how many at once).
        digest = search_digest({"dataset": config.data.dataset, "objective": args.objective, "family": family,
                                "space": space, "methods": args.methods, "search": args.search,
                                "grid_points": args.grid_points, "scheduler": args.scheduler,
                                "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                                "epochs": epochs, "num_samples": args.num_samples, "seed": args.seed,
                                "loss": config.loss.loss, "augment": config.augment.augment,
                                "normalize": config.augment.normalize,
                                **({"cache_features": True} if args.cache_features else {}),
                                **{k: getattr(args, k) for k in FOUNDATION_FLAGS
                                   if getattr(args, k, None) is not None}})
        check_search_digest(uri, args.experiment, digest)
        if args.register:
            check_alias_classes(uri, args.register, CHAMPION, dataset_class_names(prepared))
        init_ray(num_cpus=num_cpus, dashboard=True)
        max_concurrent = concurrency(args, config.runtime)
    except (ValueError, FileNotFoundError, DataError, RuntimeError) as e:  # LockHeld is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Trials are epoch-logged by this driver (tuning.TrialEpochLogger), never by their workers.
    run = RunContext(prepared.source_prior.tolist(), prepared.class_counts("train"),
                     search=SearchContext(args.experiment, join_path(storage, args.experiment), config.loss.loss))
    if args.cache_features:
        t0 = time.perf_counter()
        folder = cache_features(config, run, prepared, num_actors=config.runtime.num_workers,
                                use_gpu=config.runtime.use_gpu)
        print(f"features of {config.model.model} (frozen, of the evaluation view: the config's augment does not "
              f"apply): {folder} ({time.perf_counter() - t0:.1f} s); each trial trains the head on them")
        run = dataclasses.replace(run, search=dataclasses.replace(run.search, features=str(folder)))
    parent_id, _ = start_or_resume_run(uri, args.experiment, args.experiment,
                                       {**flat_config(config, run), "space": family, "objective": args.objective,
                                        "search_alg": args.search, "scheduler": args.scheduler},
                                       tags={"lade.kind": "search", SEARCH_DIGEST_TAG: digest})
    run = dataclasses.replace(run, search=dataclasses.replace(run.search, parent_run_id=parent_id))
    print(f"search {args.experiment}: space {family}, objective {OBJECTIVES.lookup(args.objective)}, {args.scheduler}, "
          f"up to {max_concurrent} trials at once; MLflow parent run {parent_id}")
    try:
        results = build_tuner(args, config, run, space, defaults, storage, max_concurrent).fit()
    except BaseException:
        end_run(uri, parent_id, failed=True)
        raise
    metric = OBJECTIVES.lookup(args.objective)
    rows = summary_rows(results, list(space), metric, config.optimizer.epochs)
    client = mlflow_client(uri)
    close_trial_runs(client, results, TrialEpochLogger(mlflow_uri=uri, experiment=config.runtime.experiment,
                                                       search=run.search.name, storage=run.search.storage))
    log_table_once(client, parent_id, pd.DataFrame(rows), "search/summary.json")
    print(format_table(rows, list(rows[0]) if rows else []), end="")
    ok = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    if not ok:
        print("error: no trial reported the objective", file=sys.stderr)
        end_run(uri, parent_id, failed=True)
        return 1
    # The best last objective; ties (coarse val/top1 on small validation sets) go to the smallest trial id, so that a
    # rerun of a finished search picks the same champion: Tune's get_best_result takes the first in its result
    # grid's order, which a restore may change (a second model version registered once in CI).
    finite = sorted((r for r in ok if math.isfinite(r.metrics[metric])), key=lambda r: str(r.metrics["trial_id"]))
    if not finite:
        print("error: no trial reported a finite objective", file=sys.stderr)
        end_run(uri, parent_id, failed=True)
        return 1
    best = max(finite, key=lambda r: r.metrics[metric])  # max keeps the first of equal values
    client.log_metric(parent_id, f"best/{metric}", float(best.metrics[metric]))
    client.set_tag(parent_id, "lade.best_trial", trial_run_name(best.config["search"], best.metrics["trial_id"]))
    chosen = select_method(best.config)
    print(f"best trial: {trial_run_name(best.config['search'], best.metrics['trial_id'])}  {metric} "
          f"{best.metrics[metric]:.4f}  loss={chosen['loss']}  " + "  ".join(
              f"{k}={v:.4g}" for k, v in chosen.items()
              if isinstance(v, float) and (k in space or "/" in str(k) or k in LOSSES[chosen['loss']].hyperparameters)))
    if args.register:
        print(register_champion(client, best, prepared, args.register))
    end_run(uri, parent_id)
    return 0
