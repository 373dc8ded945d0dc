"""Process-level setup shared by the pipelines: Ray connection and how much Ray says on the console."""
from __future__ import annotations

import logging
import os

from lade_core.compat import (
    RAY_DATA_PROGRESS_LOGGER,
    RAY_TRAIN_PG_CLEANER_LOGGER,
    RAY_WORKER_POOL_NOTICE,
    drop_raylet_notice,
    loopback_node,
)

_VERBOSE = False
# Loggers that print INFO lines on every run: Ray's (dataset plans, operator progress, controller state) and
# MLflow's (store migrations, experiment creation).
_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow")
# Ray Data warns once per process that its progress bars are off ("Progress bars disabled. To enable, set ..."):
# lade turns them off on purpose (epoch lines and lade's own bars instead), so unless verbose it is not shown.
_PROGRESS_NOTICE_LOGGER = RAY_DATA_PROGRESS_LOGGER


def quiet_logging(verbose: bool = False) -> None:
    """Ray's (and MLflow's) INFO logging off unless ``verbose``: a run's console shows the pipeline's own lines and
    progress bars.

    Applies to this process now and, through ``init_ray``'s ``LoggingConfig``, to every Ray worker of the job.
    """
    global _VERBOSE
    _VERBOSE = verbose
    level = log_level()
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger(_PROGRESS_NOTICE_LOGGER).setLevel(logging.INFO if verbose else logging.ERROR)
    # Ray Data configures its loggers in every process that runs it from this variable; a local Ray's workers
    # inherit it from this process (on a cluster, set it in the job's runtime env).
    os.environ["RAY_DATA_LOG_LEVEL"] = level
    os.environ["MLFLOW_LOGGING_LEVEL"] = level  # MLflow sets its logger's level from this when first imported
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if verbose else "false"  # per-download bars
    os.environ["LADE_LOG_LEVEL"] = level  # read by quiet_worker_logging in this job's local Ray workers


def log_level() -> str:
    return "INFO" if _VERBOSE else "WARNING"


def train_logging_config():
    """Ray Train's own log level (controller and workers), for ``RunConfig(logging_config=...)``."""
    import ray.train

    return ray.train.LoggingConfig(log_level=log_level())


def worker_env() -> dict:
    """Environment for the training workers on any cluster (``RunConfig(worker_runtime_env=...)``): the log levels
    this process runs with."""
    return {"env_vars": {"RAY_DATA_LOG_LEVEL": log_level(), "LADE_LOG_LEVEL": log_level()}}


def quiet_worker_logging() -> None:
    """In a Ray worker that runs lade code (a training worker, a Tune trial's driver): the root logger at the
    driver's level (Ray Train sends worker logs through it at INFO, some of its own records too, which its
    ``LoggingConfig`` does not filter) and Ray Data's progress bars only when verbose."""
    import warnings

    import ray.data

    level = os.environ.get("LADE_LOG_LEVEL", "INFO")
    logging.getLogger().setLevel(level)
    # Ray Data's iter_torch_batches wraps its read-only (zero-copy) arrays with torch.as_tensor, and torch warns
    # once that writing to them would be undefined. Nothing in lade writes to a batch's tensors: the image is
    # converted to a new float tensor (transforms.normalize), labels and indices are only read.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    logging.getLogger(_PROGRESS_NOTICE_LOGGER).setLevel(logging.INFO if level == "INFO" else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = level == "INFO"


def init_ray(num_cpus: int | None = None, address: str | None = None, dashboard: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS / ``address`` (as under ``ray job submit``) or start a local Ray.

    A local Ray gets ``num_cpus`` logical CPUs: on small machines give it more than the training workers reserve,
    or Ray Data's read/decode tasks get no CPU and the pipeline stalls. It starts Ray's dashboard only with
    ``dashboard``: its state API is how Ray Train V2's placement-group cleaner sees that a run's controller died,
    which matters where trainer runs outlive one another in one Ray (a search: a stopped trial's leaked workers
    starve the next); a single run's controller ends with its driver and this local Ray. On 2 cores the dashboard's
    processes cost 13-33 CPU seconds of a smoke run (bench/README.md). Whoever starts Ray first decides.
    """
    import ray

    # Ray >= 2.59 may enable token auth by default; a local dev cluster runs without unless the user set it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    level = log_level()
    logs = dict(logging_level=level, logging_config=ray.LoggingConfig(log_level=level), log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **logs)
    else:
        # A local Ray's node is never drained by an autoscaler or a spot reclaim: Ray Train's preemption watcher
        # (an actor per run, whose start logs a core_worker error about its restartable constructor arguments)
        # has nothing to watch. The user's setting wins; a cluster (RAY_ADDRESS) keeps Ray's default.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller polls its workers every 2 s (a cluster's default), so a finished run waited up to
        # 2 s more to be seen finished: 3.5 s -> 1.1 s from the last epoch to fit() returning on 2 cores.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Without a dashboard, Train's placement-group cleaner warns every second that it cannot ask (quiet_pg_cleaner).
        hook = {} if dashboard else {"runtime_env": {"worker_process_setup_hook": f"{__name__}.quiet_pg_cleaner"}}
        if not _VERBOSE:  # on one machine nothing to act on: its cores, not the job, set the raylet's threshold
            drop_raylet_notice(RAY_WORKER_POOL_NOTICE)
        with loopback_node():  # every server of the local node on 127.0.0.1 (lade_core.compat)
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     _system_config={"num_workers_soft_limit": worker_soft_limit(num_cpus)}, **hook, **logs)
    import ray.data

    # Ray Data's per-operator bars: useful while preparing, noise between the epoch lines of a training run.
    ray.data.DataContext.get_current().enable_progress_bars = _VERBOSE


def shutdown_ray() -> None:
    """Disconnect from Ray now, stopping the local Ray this process started: at interpreter exit Ray's own hook
    first sleeps 0.5 s for the log lines of tasks, which a finished job has none of left."""
    import ray

    ray.shutdown()


def quiet_pg_cleaner() -> None:
    """The worker process setup hook of a local Ray started without a dashboard (``init_ray``): Ray Train's
    placement-group cleaner there logs only errors. Runs in every worker of the job, Ray's own actors included,
    before its first task, so this module imports nothing heavy."""
    logging.getLogger(RAY_TRAIN_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def worker_soft_limit(num_cpus: int | None) -> int:
    """Idle worker processes a raylet keeps for reuse (Ray's ``num_workers_soft_limit``).

    Why: Ray's default is the node's CPU count. A training epoch's Ray Data tasks (the split's read/decode, and
    each worker's validation pass, started from the training actors) use more worker processes than that on a
    small node, and every idle one over the limit is killed a second later: each epoch then starts fresh Python
    processes that import torch again, ~13 s of a small epoch's 15 s on 2 cores (bench/README.md). Twice the
    CPUs plus room for the actors keeps them warm from epoch to epoch. A cluster's raylets take the same setting
    from ``RAY_num_workers_soft_limit`` (cluster/)."""
    cpus = num_cpus or os.cpu_count() or 1
    return 2 * cpus + 4


def local_num_cpus(requested: int | None, reserved: float) -> int:
    """Logical CPUs for a local Ray: ``requested`` if given, else this machine's cores (at least what training
    ``reserved``) plus 2, so Ray Data's read/decode tasks always have CPUs beside the training workers.

    Decide it once, before anything starts Ray: the first ``init_ray`` fixes the cluster's size.
    """
    return int(requested or max(os.cpu_count() or 1, reserved) + 2)


def job_working_dir() -> str | None:
    """The runtime-env working directory this process runs in when it is the entry point of ``ray job submit
    --working-dir``, else None. Ray passes the job's runtime env to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        working_dir = (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if working_dir else None


def check_job_locations(**locations: str | None) -> None:
    """Under ``ray job submit --working-dir``, refuse default or relative locations for what must outlast the job.

    The entry point's working directory is Ray's unpacked copy of the package, named after its content hash and
    garbage-collected by Ray: an ``./mlflow.db`` or ``./outputs`` there is lost, and a rerun of changed code lands in
    another directory, so "rerun to resume" silently starts over. ``locations``: flag name -> the value given."""
    cwd = job_working_dir()
    if cwd is None:
        return
    bad = [flag for flag, value in locations.items()
           if value is None or ("://" not in value and not os.path.isabs(value))
           or (value.startswith("sqlite:///") and not value.startswith("sqlite:////"))]
    if bad:
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in bad)
        raise ValueError(f"this is a Ray job whose working directory ({cwd}) is Ray's temporary copy of the package: "
                         f"pass {flags} with an absolute path or a URI on storage every node reaches (e.g. "
                         "--mlflow-uri http://mlflow.internal:5000 --storage-path /shared/ray_results), or the runs "
                         "are lost when Ray cleans it up")
