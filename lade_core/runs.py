"""The two ends of a training run that every entry point shares: open (or generate) its dataset, and finalize it
(test logits, metrics, model) into MLflow. ``pipelines/train.py`` and ``pipelines/tune.py`` both call these."""
from __future__ import annotations

import math
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
from .tracking import LOGITS_ARTIFACT, write_logits_parquet
from .training import CHECKPOINT_FILE, load_checkpoint, predict_logits

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


def finalize(config: dict, prepared, checkpoint_dir: Path) -> dict:
    """Test logits -> MLflow (Parquet artifact + metrics), the model (optionally registered), and a summary table."""
    import mlflow

    state = load_checkpoint(checkpoint_dir / CHECKPOINT_FILE)
    model = build_model(config["model"], prepared.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    test_split, size = prepared.test_split, config["image_size"]
    batches = prepared.ray_dataset(test_split, train=False, image_size=size).iter_torch_batches(batch_size=256)
    n_test = prepared.manifest["splits"][test_split]["num_samples"]
    batches = tqdm(batches, total=-(-n_test // 256), desc=f"{test_split} inference", unit="batch", file=sys.stderr)
    first: list[torch.Tensor] = []  # two test images [2, 3, H, W] kept for the model's input example

    def keep_example(batches):
        for batch in batches:
            if not first:
                first.append(batch["image"][:2].clone())
            yield batch

    logits, labels = predict_logits(model, keep_example(batches), torch.device("cpu"))
    source_prior, counts = prepared.source_prior, prepared.class_counts("train")
    mode = posthoc_rules(config["loss"])[0]
    targets = {t.name: t for t in protocol_targets(labels, counts)}
    rows = evaluate_targets(logits, labels, source_prior, counts, (mode,),
                            [targets[name] for name in ("uniform", "forward_10", "backward_10")])
    table = {r["target"]: r for r in rows}
    u = table["uniform"]

    mlflow.set_tracking_uri(config["mlflow_uri"])
    with mlflow.start_run(run_id=config["mlflow_run_id"]):
        test_metrics = {"test/top1": u["top1"], "test/many": u["many"], "test/medium": u["medium"],
                        "test/few": u["few"], "test/nll": u["nll"], "test/ece": u["ece"],
                        **{f"test/{name}/top1": table[name]["top1"] for name in ("forward_10", "backward_10")}}
        mlflow.log_metrics({k: v for k, v in test_metrics.items() if math.isfinite(v)})  # NaN: an empty shot group
        with tempfile.TemporaryDirectory() as d:
            write_logits_parquet(Path(d) / Path(LOGITS_ARTIFACT).name, logits, labels)
            mlflow.log_artifact(str(Path(d) / Path(LOGITS_ARTIFACT).name), artifact_path=str(Path(LOGITS_ARTIFACT).parent))
            torch.save(state["model"], Path(d) / "state_dict.pt")
            mlflow.log_artifact(str(Path(d) / "state_dict.pt"), artifact_path="checkpoint")
        mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", input_example=first[0].numpy(),
                                 registered_model_name=config["register"])
    print(f"\nrun {config['run_name']} ({config['loss']}, post-hoc: {mode}) — MLflow run {config['mlflow_run_id']}")
    print(format_table(rows, ["target", "n", "top1", "many", "medium", "few", "nll", "ece"]), end="")
    return table


