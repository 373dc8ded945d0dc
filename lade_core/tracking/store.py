"""MLflow glue: absolute tracking URIs, one run per training run name (RUNNING / FINISHED / FAILED), exactly-once
epoch metrics, registration once. What a run stores, and how it is read back, is ``lade_core.tracking.artifacts``; the
logged model is ``lade_core.tracking.model``. Those three modules (and the pyfunc's entry file) are the only ones that
import ``mlflow`` (tested): the rest of lade reaches MLflow through them."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lade_core.tracking.artifacts import PRIOR_ARTIFACT, write_source_info


def resolve_tracking_uri(uri: str | None, workdir: str | Path = ".") -> str:
    """Default: a sqlite store under the working dir, as an absolute URI (Ray workers run in another cwd)."""
    if uri is None:
        return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain directory path
        return Path(uri).resolve().as_uri()
    return uri


def mlflow_client(uri: str):
    """The ``MlflowClient`` of the store at ``uri`` (an absolute URI, ``resolve_tracking_uri``)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def download_artifact(uri: str, run_id: str, path: str) -> str:
    """One artifact of a run, downloaded to a local path."""
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)


@contextlib.contextmanager
def active_run(uri: str, run_id: str):
    """Run ``run_id`` as MLflow's active run, for the APIs that log into the active run (``pyfunc.log_model``)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_result_run(uri: str, experiment: str, run_name: str | None = None, *, params: dict | None = None,
                   metrics: dict | None = None, tags: dict | None = None, files: tuple = (),
                   tables: dict | None = None) -> str:
    """A new, finished run holding one result (a comparison, a prior estimate): its params, metrics, tags, the
    ``files`` as artifacts and ``tables`` ({artifact file: DataFrame}) as MLflow tables. Returns its id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    # On a tracking server MLflow writes "View run … at: URL" to stdout when the run ends: to stderr here, so that
    # a script's stdout stays its result (compare.py --format csv > table.csv).
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(params or {})
        mlflow.log_metrics(metrics or {})
        mlflow.set_tags(tags or {})
        for f in files:
            mlflow.log_artifact(str(f))
        for name, table in (tables or {}).items():
            mlflow.log_table(table, name)
    return run.info.run_id


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({e}); start it or fix "
                                  "--mlflow-uri") from e


def wait_reachable(uri: str, timeout_s: float, what: str) -> None:
    """Wait up to ``timeout_s`` for the tracking server at ``uri`` to answer (sqlite and file stores: at once), saying
    so once; a ConnectionError naming ``what`` if it does not come back."""
    import time

    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            check_reachable(uri)
            return
        except ConnectionError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"{e}; {what}") from e
            if not said:
                print(f"warning: MLflow tracking server {uri} is unreachable; waiting up to {timeout_s:.0f} s for it "
                      f"({what})", file=sys.stderr, flush=True)
                said = True
            time.sleep(2)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) or len(str(v)) < 500 else f"<{len(v)} values>"
    return out


# A run is found again by this tag (a hash of its name), never by building a filter string from the name itself:
# a name with a quote cannot break (or widen) the search.
RUN_KEY_TAG = "lade.run_key"
# Where the run's Ray Train checkpoints live: resuming the name elsewhere would restart at epoch 0 and log twice.
STORAGE_TAG = "lade.storage"


def run_key(run_name: str) -> str:
    return hashlib.sha256(run_name.encode()).hexdigest()


def find_run(client, experiment_id: str, run_name: str):
    """The run named ``run_name`` in the experiment, or None."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(run_name)}'",
                               max_results=1)
    return found[0] if found else None


# The training config's digest (train.py), set when the run is created: a rerun resumes only the same experiment.
CONFIG_DIGEST_TAG = "lade.config_digest"
# The digest of the config without its seed: runs that differ only in seed share it (compare.py's mean ± std).
SEED_GROUP_TAG = "lade.seed_group"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a seed's run under its group's parent run


@dataclass(frozen=True)
class RunRecord:
    """A run found or created by ``open_run``: its id, whether it existed, the state it had then, its tags."""

    run_id: str
    resumed: bool
    status: str
    tags: dict


def open_run(uri: str, experiment: str, run_name: str, config: dict, tags: dict | None = None,
             storage: str | None = None) -> RunRecord:
    """The run named ``run_name`` in ``experiment``: created (state RUNNING) with ``tags`` set atomically with it
    (what a rerun checks: the run key, the checkpoint storage, a config digest), then its params, resolved config and
    source prior; or found again, its state left as it was, so that the caller's checks can refuse the rerun without
    rewriting it (``mark_running`` moves it on). A found run that lacks its inputs (a driver killed right after
    creating it) gets them now.

    ``storage`` is where the run's checkpoints live; a run found again with other storage is refused, since
    training there would start over at epoch 0 under a name whose epochs are already logged.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = mlflow.set_experiment(experiment)
    run = find_run(client, exp.experiment_id, run_name)
    if run is not None:
        stored = run.data.tags.get(STORAGE_TAG)
        if storage is not None and stored is not None and stored != storage:
            raise ValueError(f"run {run_name!r} keeps its checkpoints under {stored}, not {storage}: resume it with "
                             f"--storage-path {stored}, or pass another --run-name")
        folder = str(Path(PRIOR_ARTIFACT).parent)
        if PRIOR_ARTIFACT not in {a.path for a in client.list_artifacts(run.info.run_id, folder)}:
            _record_inputs(client, run.info.run_id, config)
        return RunRecord(run.info.run_id, True, run.info.status, dict(run.data.tags))
    run_tags = {**(tags or {}), RUN_KEY_TAG: run_key(run_name), **({STORAGE_TAG: storage} if storage else {})}
    run_id = client.create_run(exp.experiment_id, run_name=run_name, tags=run_tags).info.run_id  # RUNNING
    _record_inputs(client, run_id, config)
    return RunRecord(run_id, False, "RUNNING", run_tags)


def _record_inputs(client, run_id: str, config: dict) -> None:
    """Params (the flattened config), ``config.yaml`` and the source prior of a run; idempotent (MLflow keeps a
    param logged twice with the same value)."""
    import mlflow
    import yaml

    params = _flatten({k: v for k, v in config.items() if k not in ("source_prior", "train_counts")})
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        client.log_artifact(run_id, str(Path(d) / "config.yaml"))
        write_source_info(Path(d) / Path(PRIOR_ARTIFACT).name, config["source_prior"], config["train_counts"])
        client.log_artifact(run_id, str(Path(d) / Path(PRIOR_ARTIFACT).name), str(Path(PRIOR_ARTIFACT).parent))


def mark_running(uri: str, run: RunRecord) -> None:
    """A found run moves on to RUNNING, unless it is FINISHED: a state only moves forward."""
    if run.resumed and run.status != "FINISHED":
        mlflow_client(uri).update_run(run.run_id, status="RUNNING")


def named_run(uri: str, experiment: str, run_name: str):
    """The run named ``run_name`` in ``experiment`` of the store at ``uri``, or None (no such experiment or run)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return find_run(client, exp.experiment_id, run_name) if exp else None


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict, tags: dict | None = None,
                        storage: str | None = None) -> tuple[str, bool]:
    """``open_run`` and ``mark_running`` in one step, for callers with nothing to check in between (Tune's search
    and trial runs): (run id, whether it existed)."""
    run = open_run(uri, experiment, run_name, config, tags, storage)
    mark_running(uri, run)
    return run.run_id, run.resumed


def end_run(uri: str, run_id: str, failed: bool = False) -> None:
    """Mark the run FINISHED, or FAILED (a run that raised); a run whose driver was killed stays RUNNING until a
    rerun resumes and ends it."""
    mlflow_client(uri).set_terminated(run_id, "FAILED" if failed else "FINISHED")


class EpochLogger:
    """Per-epoch metrics into one MLflow run, each (metric, epoch) exactly once across restarts: it reads the steps
    the run already holds and never writes one twice (a worker group restarted before Ray registered rank 0's last
    checkpoint trains that epoch again; its second result is not logged)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id, self._stale = MlflowClient(uri), run_id, False
        self.logged: dict[str, set[int]] = self._read_logged()

    def log_epoch(self, metrics: dict) -> int:
        """Log the epoch's finite metrics not yet in the run; returns how many were written."""
        import mlflow.entities

        step = int(metrics["epoch"])
        batch = [mlflow.entities.Metric(k, float(v), 0, step) for k, v in metrics.items()
                 if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)
                 and step not in self.logged.get(k, ())]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
        for m in batch:
            self.logged.setdefault(m.key, set()).add(step)
        return len(batch)

    def backfill(self, history: list[dict]) -> None:
        """Epochs checkpointed before a crash but not yet in MLflow."""
        for metrics in history:
            self.log_epoch(metrics)

    def log_history(self, history: list[dict]) -> bool:
        """Every epoch of ``history`` (a run's per-epoch metrics so far) not yet in the run. If MLflow cannot be
        reached, warns and returns False instead of raising: training goes on, and the next call writes what was
        missed. After a failed write the run's steps are read again first, since the server may have stored the
        batch whose answer was lost: no step is written twice."""
        from mlflow.exceptions import MlflowException

        try:
            if self._stale:
                self.logged = self._read_logged()
                self._stale = False
            self.backfill(history)
            return True
        except (MlflowException, OSError) as e:
            if not self._stale:  # once per outage; to the process's own stderr, which Ray forwards to the driver
                print(f"warning: MLflow is unreachable ({str(e).splitlines()[0][:160]}); training goes on, and "
                      "the epochs are logged once it answers", file=sys.__stderr__, flush=True)
            self._stale = True
            return False

    def _read_logged(self) -> dict[str, set[int]]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in keys}


def logged_model_uri(client, run_id: str, name: str) -> str | None:
    """``models:/<model_id>`` of the model ``name`` the run logged completely (status READY), or None.

    A driver killed inside ``log_model`` leaves a PENDING model whose files may be partial; it is marked FAILED here
    (so that nothing reuses or registers it) and the caller logs the model again."""
    from mlflow.entities import LoggedModelStatus

    exp = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
             if m.name == name]  # the name is compared here, not spliced into the filter
    for m in found:
        if m.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def register_once(client, run_id: str, name: str, model_uri: str):
    """The registry version of ``name`` that holds this run's model, created only if there is none: rerunning a
    finished run registers nothing new."""
    import mlflow

    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    if versions:
        return max(versions, key=lambda v: int(v.version))
    return mlflow.register_model(model_uri, name)


def log_metrics_once(client, run_id: str, metrics: dict[str, float]) -> int:
    """Log metrics at step 0, skipping keys the run already holds with the same value: reruns add no history.

    Returns how many keys were written.
    """
    import mlflow.entities

    current = client.get_run(run_id).data.metrics
    fresh = [mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()
             if math.isfinite(v) and not (k in current
                                          and math.isclose(current[k], float(v), rel_tol=0, abs_tol=1e-12))]
    for i in range(0, len(fresh), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=fresh[i:i + 1000])
    return len(fresh)  # NaN (an empty Many/Medium/Few group) is never logged


def log_table_once(client, run_id: str, table, artifact_file: str) -> bool:
    """``log_table`` that replaces rather than appends: unchanged -> nothing written, changed -> overwritten.

    Returns whether anything was written.
    """
    import mlflow
    import pandas as pd

    parent = Path(artifact_file).parent
    folder = None if parent == Path(".") else str(parent)  # MLflow refuses "." as an artifact path
    if artifact_file in {a.path for a in client.list_artifacts(run_id, folder)}:
        old = pd.read_json(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file,
                                                               tracking_uri=client.tracking_uri), orient="split")
        try:  # both sides through the same JSON round trip, so float formatting cannot differ
            new = pd.read_json(io.StringIO(table.to_json(orient="split", index=False)), orient="split")
            pd.testing.assert_frame_equal(old, new, check_dtype=False, rtol=1e-9)
            return False
        except AssertionError:
            pass
        with tempfile.TemporaryDirectory() as d:  # log_table would append to the old rows
            path = Path(d) / Path(artifact_file).name
            path.write_text(table.to_json(orient="split", index=False))
            client.log_artifact(run_id, str(path), folder)
        return True
    client.log_table(run_id, table, artifact_file)
    return True
