"""Train a long-tailed classifier with Ray Train (DDP) and track it in MLflow — the main job of lade.

  python pipelines/train.py                                   # embedded default: synthetic data, local Ray
  python pipelines/train.py --config configs/cifar100_lt/lade.yaml --num-workers 4 --use-gpu
  ray job submit --working-dir . -- python pipelines/train.py --smoke-test

Config file -> CLI overrides (only flags you pass override). Rerunning with the same --run-name resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from lade_core.config import LOSSES, resolve_config, validate_config
from lade_core.data import DataError, open_prepared
from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.synthetic import make_synthetic
from lade_core.models import MODELS, build_model
from lade_core.posthoc import POSTHOC_MODES, posthoc_logits
from lade_core.priors import shifted_subset
from lade_core.runtime import init_ray
from lade_core.tracking import (LOGITS_ARTIFACT, check_reachable, resolve_tracking_uri, start_or_resume_run,
                                write_logits_parquet)
from lade_core.training import CHECKPOINT_FILE, evaluate, predict_logits, train_loop_per_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic" / "lade.yaml"
SMOKE = {"dataset": "data/synthetic_smoke", "epochs": 1, "batch_size": 32, "num_workers": 2,
         "synthetic": {"num_classes": 4, "image_size": 16, "max_count": 40, "imbalance_ratio": 4,
                       "test_per_class": 20, "seed": 0}}
# Keys that may change between a run and its resumption without making it a different experiment.
RUNTIME_KEYS = {"run_name", "register", "max_failures", "fail_at_epoch", "fail_marker", "mlflow_uri", "storage_path",
                "num_workers", "use_gpu", "cpus_per_worker", "mlflow_run_id", "experiment"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the synthetic LADE recipe)")
    ap.add_argument("--dataset", help="prepared dataset directory")
    ap.add_argument("--loss", choices=LOSSES)
    ap.add_argument("--model", choices=sorted(MODELS))
    ap.add_argument("--weights-path", dest="weights_path", help="local state dict to initialize the model from")
    ap.add_argument("--alpha", type=float, help="LADER weight α")
    ap.add_argument("--lam", type=float, help="LADER regularizer λ")
    ap.add_argument("--class-weights", dest="class_weights", type=json.loads, help="α_c as a JSON list")
    ap.add_argument("--estimator", choices=["released", "paper"])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--num-workers", dest="num_workers", type=int)
    ap.add_argument("--use-gpu", dest="use_gpu", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--experiment")
    ap.add_argument("--run-name", dest="run_name")
    ap.add_argument("--mlflow-uri", dest="mlflow_uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--register", help="register the final model under this name")
    ap.add_argument("--storage-path", dest="storage_path", help="Ray Train checkpoints (default ./outputs/ray_results)")
    ap.add_argument("--max-failures", dest="max_failures", type=int)
    ap.add_argument("--fail-at-epoch", dest="fail_at_epoch", type=int, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--num-cpus", dest="num_cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--smoke-test", dest="smoke_test", action="store_true", help="tiny data, 1 epoch")
    return ap.parse_args(argv)


def config_digest(config: dict) -> str:
    core = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_dataset(config: dict, num_cpus: int | None):
    path = Path(config["dataset"])
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not (path / "dataset.json").exists() and config.get("synthetic"):
        init_ray(num_cpus=num_cpus)
        print(summary_line(prepare_dataset(make_synthetic(**config["synthetic"]), path, num_cpus=num_cpus)))
    config["dataset"] = str(path.resolve())
    return open_prepared(path)


def check_cluster_fits(config: dict) -> None:
    import ray

    res = ray.cluster_resources()
    need_cpu = config["num_workers"] * config["cpus_per_worker"]
    if res.get("CPU", 0) < need_cpu:
        raise RuntimeError(f"num_workers={config['num_workers']} needs {need_cpu} CPUs; the cluster has {res.get('CPU', 0):g}")
    if config["use_gpu"] and res.get("GPU", 0) < config["num_workers"]:
        raise RuntimeError(f"num_workers={config['num_workers']} with --use-gpu needs that many GPUs; the cluster has {res.get('GPU', 0):g}")


def fit(config: dict, prepared):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    val_split = "val" if "val" in prepared.splits else "test"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config["num_workers"], use_gpu=config["use_gpu"],
                                     resources_per_worker={"CPU": config["cpus_per_worker"]}),
        run_config=RunConfig(name=config["run_name"], storage_path=config["storage_path"],
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": prepared.ray_dataset("train"), "val": prepared.ray_dataset(val_split, train=False)},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker sees the whole val split
    )
    return trainer.fit()


def finalize(config: dict, prepared, checkpoint_dir: Path) -> dict:
    """Test logits -> MLflow (Parquet artifact + metrics), the model (optionally registered), and a summary table."""
    import mlflow

    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model = build_model(config["model"], prepared.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    test_split = "test" if "test" in prepared.splits else "val"
    logits, labels = predict_logits(model, prepared.ray_dataset(test_split, train=False).iter_torch_batches(batch_size=256),
                                    torch.device("cpu"))
    source_prior, counts = prepared.source_prior, prepared.class_counts("train")
    mode = POSTHOC_MODES[config["loss"]][0]
    per_class = min(prepared.class_counts(test_split))
    table = {"uniform": evaluate(logits, labels, config["loss"], source_prior, counts, prefix="test")}
    for direction in ("forward", "backward"):
        idx = torch.as_tensor(shifted_subset(labels, counts, per_class, 10, direction))
        counts_t = torch.bincount(labels[idx], minlength=prepared.num_classes).double()
        p_t = counts_t / counts_t.sum()  # a target prior may rule classes out: zeros are valid here
        z = posthoc_logits(logits[idx].double(), mode, source_prior, p_t)
        table[f"{direction}_10"] = {"test/top1": float((z.argmax(1) == labels[idx]).double().mean())}

    mlflow.set_tracking_uri(config["mlflow_uri"])
    with mlflow.start_run(run_id=config["mlflow_run_id"]):
        mlflow.log_metrics({**table["uniform"], "test/forward_10/top1": table["forward_10"]["test/top1"],
                            "test/backward_10/top1": table["backward_10"]["test/top1"]})
        with tempfile.TemporaryDirectory() as d:
            write_logits_parquet(Path(d) / Path(LOGITS_ARTIFACT).name, logits, labels)
            mlflow.log_artifact(str(Path(d) / Path(LOGITS_ARTIFACT).name), artifact_path=str(Path(LOGITS_ARTIFACT).parent))
            torch.save(state["model"], Path(d) / "state_dict.pt")
            mlflow.log_artifact(str(Path(d) / "state_dict.pt"), artifact_path="checkpoint")
        example = next(iter(prepared.ray_dataset(test_split, train=False).iter_torch_batches(batch_size=2)))["image"]
        mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", input_example=example.numpy(),
                                 registered_model_name=config["register"])
    print(f"\nrun {config['run_name']} ({config['loss']}, post-hoc: {mode}) — MLflow run {config['mlflow_run_id']}")
    print(f"{'target prior':>14} {'top-1':>7}")
    for name, m in table.items():
        print(f"{name:>14} {m['test/top1']:>7.4f}")
    u = table["uniform"]
    print(f"uniform many/medium/few: {u['test/many']:.4f} / {u['test/medium']:.4f} / {u['test/few']:.4f}")
    return table


def main(argv=None) -> int:
    args = vars(parse_args(argv))
    config_path, num_cpus, smoke = args.pop("config"), args.pop("num_cpus", None), args.pop("smoke_test", False)
    overrides = {**(SMOKE if smoke else {}), **args}
    if "dataset" in args:  # a dataset the user named is opened, never generated from a recipe in the config
        overrides["synthetic"] = None
    try:
        config = resolve_config(config_path, overrides)
        validate_config(config)
        config["mlflow_uri"] = resolve_tracking_uri(config["mlflow_uri"])
        check_reachable(config["mlflow_uri"])
        prepared = load_dataset(config, num_cpus)
        validate_config(config, prepared.num_classes)
    except (ValueError, FileNotFoundError, ConnectionError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config["source_prior"] = prepared.source_prior.tolist()
    config["train_counts"] = prepared.class_counts("train")
    config["storage_path"] = str(Path(config["storage_path"] or "outputs/ray_results").resolve())
    config["run_name"] = config["run_name"] or f"{prepared.name}-{config['loss']}-{config_digest(config)}"
    config["fail_marker"] = str(Path(config["storage_path"]) / config["run_name"] / ".fail_injected")
    run_id, resumed = start_or_resume_run(config["mlflow_uri"], config["experiment"], config["run_name"], config)
    config["mlflow_run_id"] = run_id
    import mlflow

    if resumed:
        logged = mlflow.MlflowClient(config["mlflow_uri"]).get_run(run_id).data.params.get("config_digest")
        if logged and logged != config_digest(config):
            print(f"error: run name {config['run_name']!r} exists with a different config; pass another --run-name",
                  file=sys.stderr)
            return 2
        print(f"resuming run {config['run_name']} (MLflow run {run_id})")
    else:
        mlflow.MlflowClient(config["mlflow_uri"]).log_param(run_id, "config_digest", config_digest(config))
    try:
        init_ray(num_cpus=num_cpus or max(os.cpu_count() or 1, config["num_workers"] * config["cpus_per_worker"]) + 2)
        check_cluster_fits(config)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = fit(config, prepared)
    with result.checkpoint.as_directory() as d:
        finalize(config, prepared, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
