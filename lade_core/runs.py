"""The two ends of a training run that every entry point shares: open (or generate) its dataset, and finalize it
(test logits, metrics, model) into MLflow. ``pipelines/train.py`` and ``pipelines/tune.py`` both call these."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import open_prepared
from .data.prepare import prepare_dataset, summary_line
from .data.synthetic import make_synthetic
from .evaluation import evaluate_targets, protocol_targets
from .losses import posthoc_rules
from .models import build_model
from .report import format_table
from .runtime import init_ray
from .tracking import (LOGITS_ARTIFACT, MODEL_NAME, end_run, log_metrics_once, logged_model_uri, read_logits_parquet,
                       register_once, write_logits_parquet)
from .training import load_checkpoint, predict_logits

# --smoke-test: a tiny generated dataset (class-sorted, like real data) and one epoch.
SMOKE = {"dataset": "data/synthetic_smoke", "epochs": 1, "batch_size": 32, "num_workers": 2,
         "synthetic": {"num_classes": 4, "image_size": 16, "max_count": 40, "imbalance_ratio": 4,
                       "test_per_class": 20, "seed": 0}}
def load_dataset(config: dict, num_cpus: int | None):
    path = Path(config["dataset"])
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not (path / "dataset.json").exists() and config.get("synthetic"):
        init_ray(num_cpus=num_cpus)
        print(summary_line(prepare_dataset(make_synthetic(**config["synthetic"]), path, num_cpus=num_cpus)))
    config["dataset"] = str(path.resolve())
    return open_prepared(path)


def storage_uri(path: str | None, default: str) -> str:
    """Where Ray keeps checkpoints: a URI (``s3://``, ``gs://``, ...) unchanged, a local path made absolute."""
    path = path or default
    return path if "://" in path else str(Path(path).resolve())


def finalize(config: dict, prepared, checkpoint_dir: Path) -> dict:
    """Test logits -> MLflow (Parquet artifact + metrics), the model (optionally registered), a summary table, and
    the run marked FINISHED.

    Idempotent, step by step: a rerun after a driver died halfway does only what is missing (stored test logits
    are read back, not recomputed), and a rerun of a finished run logs and registers nothing new.
    """
    import mlflow

    client, run_id = mlflow.MlflowClient(config["mlflow_uri"]), config["mlflow_run_id"]
    state = load_checkpoint(checkpoint_dir)
    model = build_model(config["model"], prepared.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    have = {a.path for d in ("eval", "checkpoint") for a in client.list_artifacts(run_id, d)}
    example: list[torch.Tensor] = []  # two test images [2, 3, H, W] for the model's input example
    if LOGITS_ARTIFACT in have:
        logits, labels = read_logits_parquet(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=LOGITS_ARTIFACT, tracking_uri=config["mlflow_uri"]))
    else:
        logits, labels = _test_logits(config, prepared, model, example)
        with tempfile.TemporaryDirectory() as d:
            write_logits_parquet(Path(d) / Path(LOGITS_ARTIFACT).name, logits, labels)
            client.log_artifact(run_id, str(Path(d) / Path(LOGITS_ARTIFACT).name), str(Path(LOGITS_ARTIFACT).parent))
    source_prior, counts = prepared.source_prior, prepared.class_counts("train")
    mode = posthoc_rules(config["loss"])[0]
    targets = {t.name: t for t in protocol_targets(labels, counts)}
    rows = evaluate_targets(logits, labels, source_prior, counts, (mode,),
                            [targets[name] for name in ("uniform", "forward_10", "backward_10")])
    table = {r["target"]: r for r in rows}
    u = table["uniform"]
    log_metrics_once(client, run_id, {"test/top1": u["top1"], "test/many": u["many"], "test/medium": u["medium"],
                                      "test/few": u["few"], "test/nll": u["nll"], "test/ece": u["ece"],
                                      **{f"test/{name}/top1": table[name]["top1"] for name in ("forward_10", "backward_10")}})
    if "checkpoint/state_dict.pt" not in have:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state["model"], Path(d) / "state_dict.pt")
            client.log_artifact(run_id, str(Path(d) / "state_dict.pt"), "checkpoint")
    model_uri = logged_model_uri(client, run_id, MODEL_NAME)
    if model_uri is None:
        if not example:
            batch = next(iter(prepared.ray_dataset(prepared.test_split, train=False, image_size=config["image_size"])
                              .iter_torch_batches(batch_size=2)))
            example.append(batch["image"][:2])
        mlflow.set_tracking_uri(config["mlflow_uri"])
        with mlflow.start_run(run_id=run_id):
            model_uri = mlflow.pytorch.log_model(model, name=MODEL_NAME, serialization_format="pt2",
                                                 input_example=example[0].numpy()).model_uri
    if config["register"]:
        register_once(client, run_id, config["register"], model_uri)
    end_run(config["mlflow_uri"], run_id)
    print(f"\nrun {config['run_name']} ({config['loss']}, post-hoc: {mode}) — MLflow run {run_id}")
    print(format_table(rows, ["target", "n", "top1", "many", "medium", "few", "nll", "ece"]), end="")
    return table


def _test_logits(config: dict, prepared, model, example: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and labels [N] of the test split; keeps its first two images in ``example``."""
    test_split = prepared.test_split
    batches = prepared.ray_dataset(test_split, train=False, image_size=config["image_size"]).iter_torch_batches(batch_size=256)
    n_test = prepared.manifest["splits"][test_split]["num_samples"]
    batches = tqdm(batches, total=-(-n_test // 256), desc=f"{test_split} inference", unit="batch", file=sys.stderr)

    def keep_example(batches):
        for batch in batches:
            if not example:
                example.append(batch["image"][:2].clone())
            yield batch

    return predict_logits(model, keep_example(batches), torch.device("cpu"))
