"""MLflow glue: absolute tracking URIs, one run per training run name, exactly-once epoch metrics, artifacts."""
from __future__ import annotations

import io
import json
import math
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

LOGITS_ARTIFACT = "eval/test_logits.parquet"
PRIOR_ARTIFACT = "data/source_prior.json"


def resolve_tracking_uri(uri: str | None, workdir: str | Path = ".") -> str:
    """Default: a sqlite store under the working dir, as an absolute URI (Ray workers run in another cwd)."""
    if uri is None:
        return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain directory path
        return Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({e}); start it or fix --mlflow-uri") from e


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) or len(str(v)) < 500 else f"<{len(v)} values>"
    return out


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict,
                        tags: dict | None = None) -> tuple[str, bool]:
    """The run named ``run_name`` in ``experiment``: created with params (and ``tags``, e.g. a parent run id that
    nests it), or found again (resume)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id, True
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(_flatten({k: v for k, v in config.items() if k not in ("source_prior", "train_counts")}))
        with tempfile.TemporaryDirectory() as d:
            import yaml

            (Path(d) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
            mlflow.log_artifact(str(Path(d) / "config.yaml"))
            (Path(d) / "source_prior.json").write_text(
                json.dumps({"source_prior": config["source_prior"], "train_counts": config["train_counts"]}))
            mlflow.log_artifact(str(Path(d) / "source_prior.json"), artifact_path="data")
    return run.info.run_id, False


class EpochLogger:
    """Per-epoch metrics into one MLflow run, each epoch exactly once across restarts."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def _logged_steps(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, "val/top1")}

    def log_epoch(self, metrics: dict) -> None:
        import mlflow.entities

        step = int(metrics["epoch"])
        batch = [mlflow.entities.Metric(k, float(v), 0, step) for k, v in metrics.items()
                 if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)

    def backfill(self, history: list[dict]) -> None:
        logged = self._logged_steps()
        for metrics in history:
            if int(metrics["epoch"]) not in logged:
                self.log_epoch(metrics)


def write_logits_parquet(path: str | Path, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Test logits [N, C] float32 as a fixed-size-list column plus int64 labels."""
    n, c = logits.shape
    flat = pa.array(logits.float().numpy().reshape(-1), pa.float32())
    table = pa.table({"label": pa.array(labels.numpy().astype(np.int64)),
                      "logits": pa.FixedSizeListArray.from_arrays(flat, c)})
    pq.write_table(table, str(path))


def read_logits_parquet(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(str(path))
    col = table.column("logits").combine_chunks()
    c = col.type.list_size
    logits = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(-1, c).copy())
    return logits, torch.from_numpy(table.column("label").to_numpy().copy())


# --- Reading a finished run back (evaluation, comparison, tuning) ----------------------------------------------

@dataclass(frozen=True)
class RunLogits:
    """What evaluation needs from a training run: test logits [N, C], labels [N], p_s [C], train counts, loss."""

    run_id: str
    run_name: str
    loss: str
    logits: torch.Tensor
    labels: torch.Tensor
    source_prior: torch.Tensor
    train_counts: list[int]


def run_for_model(client, model_uri: str) -> str:
    """The training run behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/") or model_uri.count("/") not in (1, 2):
        raise ValueError(f"model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    ref = model_uri[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(f"{model_uri!r} names no alias or version: use models:/{ref}@ALIAS or models:/{ref}/VERSION")
    except MlflowException as e:
        raise ValueError(f"unknown model {model_uri!r}: {e.message}") from e
    if not version.run_id:
        raise ValueError(f"{model_uri} (version {version.version}) is not linked to a training run")
    return version.run_id


def load_run_logits(client, run_id: str) -> RunLogits:
    """Download the run's test logits and source prior; errors name what is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"unknown run id {run_id!r} in {client.tracking_uri}") from e
    have = {a.path for d in (Path(LOGITS_ARTIFACT).parent, Path(PRIOR_ARTIFACT).parent)
            for a in client.list_artifacts(run_id, str(d))}
    for needed in (LOGITS_ARTIFACT, PRIOR_ARTIFACT):
        if needed not in have:
            raise ValueError(f"run {run_id} ({run.info.run_name}) has no {needed} artifact: only runs trained to the "
                             "end by pipelines/train.py store test logits")
    logits, labels = read_logits_parquet(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=LOGITS_ARTIFACT, tracking_uri=client.tracking_uri))
    source_prior, train_counts = read_source_info(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=PRIOR_ARTIFACT, tracking_uri=client.tracking_uri))
    return RunLogits(run_id, run.info.run_name, run.data.params.get("loss", "lade"), logits, labels,
                     source_prior, train_counts)


def read_source_info(path: str | Path) -> tuple[torch.Tensor, list[int]]:
    """A run's ``data/source_prior.json``: the source prior float64 [C] and the training class counts."""
    info = json.loads(Path(path).read_text())
    return torch.tensor(info["source_prior"], dtype=torch.float64), list(info["train_counts"])


def log_metrics_once(client, run_id: str, metrics: dict[str, float]) -> int:
    """Log metrics at step 0, skipping keys the run already holds with the same value: reruns add no history.

    Returns how many keys were written.
    """
    import mlflow.entities

    current = client.get_run(run_id).data.metrics
    fresh = [mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()
             if math.isfinite(v) and not (k in current and math.isclose(current[k], float(v), rel_tol=0, abs_tol=1e-12))]
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
