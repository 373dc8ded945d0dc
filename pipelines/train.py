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
import math
import sys
import tempfile
from pathlib import Path

import torch

from lade_core.config import LOSSES, resolve_config, validate_config
from lade_core.data import DataError, open_prepared
from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.synthetic import make_synthetic
from lade_core.evaluation import evaluate_targets, protocol_targets
from lade_core.models import MODELS, build_model
from lade_core.posthoc import POSTHOC_MODES
from lade_core.report import format_table
from lade_core.runtime import init_ray, local_num_cpus
from lade_core.tracking import (LOGITS_ARTIFACT, check_reachable, resolve_tracking_uri, start_or_resume_run,
                                write_logits_parquet)
from lade_core.training import CHECKPOINT_FILE, build_trainer, predict_logits

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
        example = next(iter(prepared.ray_dataset(test_split, train=False).iter_torch_batches(batch_size=2)))["image"]
        mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", input_example=example.numpy(),
                                 registered_model_name=config["register"])
    print(f"\nrun {config['run_name']} ({config['loss']}, post-hoc: {mode}) — MLflow run {config['mlflow_run_id']}")
    print(format_table(rows, ["target", "n", "top1", "many", "medium", "few", "nll", "ece"]), end="")
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
        num_cpus = local_num_cpus(num_cpus, config["num_workers"] * config["cpus_per_worker"])
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
        init_ray(num_cpus=num_cpus)
        check_cluster_fits(config)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = build_trainer(config, prepared).fit()
    with result.checkpoint.as_directory() as d:
        finalize(config, prepared, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
