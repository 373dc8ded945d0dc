"""MLflow glue: absolute tracking URIs, one run per training run name, exactly-once epoch metrics, artifacts."""
from __future__ import annotations

import json
import math
import tempfile
import urllib.error
import urllib.request
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


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict) -> tuple[str, bool]:
    """The run named ``run_name`` in ``experiment``: created with params, or found again (resume)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id, True
    with mlflow.start_run(run_name=run_name) as run:
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
