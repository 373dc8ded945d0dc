"""The Ray Train worker loop: ``train_loop_per_worker(config)``, with ``train_one_epoch`` and ``evaluate``.

One ``config`` dict (see lade_core.config) drives everything; the driver adds the dataset's ``source_prior``,
``train_counts`` and ``mlflow_run_id``. Rank 0 checkpoints through ``ray.train.report`` and logs to MLflow.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import METRICS, Target, evaluate_targets, protocol_mean_top1
from .losses import BalancedSoftmaxLoss, LADELoss
from .models import build_model, classifier_parameters
from .posthoc import POSTHOC_MODES
from .priors import tempered_class_weights, uniform_prior
from .schedules import build_scheduler

CHECKPOINT_FILE = "checkpoint.pt"


class SoftmaxLoss(nn.Module):
    """Plain cross-entropy, with the same ``forward(logits, targets)`` contract as the LADE losses."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)


def build_criterion(config: dict, source_prior: torch.Tensor) -> nn.Module:
    if config["loss"] == "softmax":
        return SoftmaxLoss()
    if config["loss"] == "balanced_softmax":
        return BalancedSoftmaxLoss(source_prior)
    weights = config["class_weights"]
    if config.get("tau") is not None:
        weights = tempered_class_weights(source_prior, config["tau"])
    return LADELoss(source_prior, alpha=config["alpha"], lam=config["lam"], class_weights=weights,
                    estimator=config["estimator"])


def build_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    head = {id(p) for p in classifier_parameters(model)}
    backbone = [p for p in model.parameters() if id(p) not in head]
    groups = [{"params": classifier_parameters(model), "lr": config["lr"]},
              {"params": backbone, "lr": config["backbone_lr"] if config["backbone_lr"] is not None else config["lr"]}]
    return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_one_epoch(model, criterion, optimizer, batches, device, amp: bool, on_batch=None) -> dict:
    model.train()
    sums, n_images, n_batches, t0 = {"loss": 0.0, "lade_ce": 0.0, "lader": 0.0}, 0, 0, time.perf_counter()
    for i, batch in enumerate(batches):
        x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)  # [B, C]
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] += loss.item()
        for k, v in getattr(criterion, "last_terms", {}).items():
            if k in sums:
                sums[k] += float(v)
        n_images += len(y)
        n_batches += 1
        if on_batch:
            on_batch(i)
    out = {f"train/{k}": v / max(n_batches, 1) for k, v in sums.items()}
    out["images_per_s"] = n_images / max(time.perf_counter() - t0, 1e-9)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU) and labels [N] over an iterable of {"image", "label"} batches."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(logits), torch.cat(labels)


def evaluate(logits: torch.Tensor, labels: torch.Tensor, loss: str, source_prior, train_counts, prefix="val") -> dict:
    """Top-1, Many/Medium/Few, NLL and ECE under the uniform target prior, and the mean top-1 over the shifted
    protocol, with the post-hoc rule the loss calls for (softmax -> PC compensation; LADE / Balanced Softmax ->
    prior injection)."""
    mode = POSTHOC_MODES[loss][0]
    uniform = Target("uniform", np.arange(len(labels)), uniform_prior(logits.shape[1]))
    (row,) = evaluate_targets(logits, labels, source_prior, train_counts, (mode,), [uniform])
    out = {f"{prefix}/{k}": row[k] for k in METRICS}
    # Mean top-1 over the 11 shifted priors: the Tune objective for users whose target distribution is unknown.
    out[f"{prefix}/shift_mean_top1"] = protocol_mean_top1(logits, labels, source_prior, train_counts, mode)
    return out


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from .tracking import EpochLogger

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    random.seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    source_prior = torch.tensor(config["source_prior"], dtype=torch.float64)

    model = build_model(config["model"], len(source_prior), config["weights_path"])
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config["epochs"], config["schedule"])
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    model = ray.train.torch.prepare_model(model)  # device placement + DDP (gloo on CPU, NCCL on GPU)
    criterion = build_criterion(config, source_prior).to(device)
    logger = EpochLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if logger:
        logger.backfill(history)  # epochs checkpointed before a crash but not yet in MLflow

    per_worker_batch = config["batch_size"] // world
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        on_batch = None
        if config.get("fail_at_epoch") == epoch and rank == world - 1:
            marker = Path(config["fail_marker"])

            def on_batch(i, marker=marker):
                if i == 1 and not marker.exists():  # die once, mid-epoch, like a preempted node
                    marker.touch()
                    os._exit(1)

        batches = train_shard.iter_torch_batches(batch_size=per_worker_batch)
        metrics = train_one_epoch(model, criterion, optimizer, batches, device, config["amp"], on_batch)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics["epoch"] = epoch
        if rank == 0:
            val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=256)
            logits, labels = predict_logits(unwrap(model), val_batches, device)
            metrics.update(evaluate(logits, labels, config["loss"], source_prior, config["train_counts"]))
            history.append(metrics)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                            "rng": [_rng_state()], "config": config}, Path(d) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            logger.log_epoch(metrics)  # after the checkpoint is durable: a crash in between is backfilled
            print(f"epoch {epoch + 1}/{config['epochs']}  loss {metrics['train/loss']:.4f}  "
                  f"lade_ce {metrics['train/lade_ce']:.4f}  lader {metrics['train/lader']:.4f}  "
                  f"val top1 {metrics['val/top1']:.4f} (many {metrics['val/many']:.3f} medium {metrics['val/medium']:.3f} "
                  f"few {metrics['val/few']:.3f})  {metrics['images_per_s'] * world:.0f} img/s", flush=True)
        else:
            ray.train.report(metrics)


def build_trainer(config: dict, prepared, callbacks: list | None = None):
    """The Ray Train V2 ``TorchTrainer`` for one training run: DDP workers fed by Ray Data shards.

    ``config["run_name"]`` and ``config["storage_path"]`` name the run's checkpoint folder, so fitting a trainer
    built from the same config again resumes from its last checkpoint.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    val_split = "val" if "val" in prepared.splits else "test"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config["num_workers"], use_gpu=config["use_gpu"],
                                     resources_per_worker={"CPU": config["cpus_per_worker"]}),
        run_config=RunConfig(name=config["run_name"], storage_path=config["storage_path"],
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets={"train": prepared.ray_dataset("train"), "val": prepared.ray_dataset(val_split, train=False)},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker sees the whole val split
    )
