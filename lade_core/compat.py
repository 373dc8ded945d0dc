"""Every place lade relies on a library's private API, gathered so that an upgrade is checked here.

Written against (and tested with) torch 2.14, Ray 2.60 (Train V2, Tune, Data), MLflow 3.17, pyarrow 25. Each entry
says what it touches, why no public API does it, and what breaks if it changes. Module level imports nothing heavy:
``lade_core.runtime.local_ray`` imports it in every process of a local Ray (its worker setup hook), Ray's own actors
included; torch and Ray are imported inside the functions that need them.

- torch: in ``lade_core.math.torch_private``, so that the math tier imports nothing outside itself.
- Ray core: ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, switched off while a local Ray starts so that its
  servers bind loopback only (``loopback_node``).
- Ray Train: the logger of its placement-group cleaner actor, which polls the dashboard's state API every second
  and warns each time it finds none (``RAY_TRAIN_PG_CLEANER_LOGGER``, silenced on a local Ray without dashboard).
- Ray Data: the logger ``ray.data._internal.progress`` (its "progress bars disabled" notice), and
  ``DataContext.use_datasource_v2``, a global switch read when a read is planned (``datasource_v1``).
- Ray Tune: ``ASHAScheduler``'s ``_trial_info`` (trial -> bracket), ``_Bracket._rungs`` ([(milestone, {trial:
  value})]), ``_metric_op`` (+1 max / -1 min) and ``_num_stopped``: a resumed search refills the rungs Tune does
  not save (``lade_core.tune.trials.EpochASHA``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

# --- Ray core and Ray Data -------------------------------------------------------------------------------------

# Ray Data's logger of the once-per-process "Progress bars disabled. To enable, set ..." notice.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray Train V2's detached placement-group cleaner (one per run): it asks the state API each second whether the
# run's controller lives, and logs "Failed to query Ray Train Controller actor state" when there is no dashboard.
RAY_TRAIN_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# The raylet's notice that its node has started more Python worker processes than 4x its startup concurrency
# (min(cores, logical CPUs): 2 on a 2-core laptop), pushed to the driver as an error message. A single Ray Train +
# Ray Data job starts that many on a small machine by design (controller, workers, Data's actors and tasks).
RAY_WORKER_POOL_NOTICE = "worker processes have been started on node"


_DROPPED_RAYLET_LINES: set[str] = set()


def drop_raylet_notice(marker: str) -> None:
    """The driver stops printing raylet error messages that contain ``marker``. Ray 2.60's listener thread
    (``ray._private.worker.listen_error_messages``) prints each through the module's ``print_to_stdstream``, looked
    up at each call; the workers' own output goes through a handler bound at ``ray.init`` and is not touched."""
    import ray._private.worker as ray_worker

    _DROPPED_RAYLET_LINES.add(marker)
    printer = ray_worker.print_to_stdstream
    if getattr(printer, "lade_filtered", False):  # wrapped by an earlier init_ray in this process
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        lines = [line for line in data.get("lines", []) if not any(m in line for m in _DROPPED_RAYLET_LINES)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream.lade_filtered = True
    ray_worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """A local Ray started inside binds every server of its node to 127.0.0.1, never the network: Ray's own
    single-machine mode (macOS, Windows; ``ray_constants.ENABLE_RAY_CLUSTER`` False), for this start only."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def datasource_v1(context) -> Iterator[None]:
    """Ray Data's V1 Parquet datasource for the reads planned inside (``DataContext.use_datasource_v2`` False),
    restored after."""
    before = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = before


# --- Ray Tune's ASHA -------------------------------------------------------------------------------------------

def asha_bracket(scheduler, trial_id: str):
    """The ASHA bracket a trial was assigned to (``_trial_info``), or None before ``on_trial_add`` / after
    completion."""
    return scheduler._trial_info.get(trial_id)


def asha_rungs(bracket) -> list[tuple[float, dict]]:
    """[(milestone, {trial_id: recorded value})] of a bracket, highest milestone first (``_Bracket._rungs``)."""
    return bracket._rungs


def asha_metric_sign(scheduler) -> float:
    """+1 when the scheduler maximizes its metric, -1 when it minimizes (``_metric_op``)."""
    return scheduler._metric_op


def asha_count_stop(scheduler) -> None:
    """Count one stopped trial in the scheduler's statistics (``_num_stopped``)."""
    scheduler._num_stopped += 1
