"""Per-epoch learning-rate factors: linear warmup, then cosine / multistep / step / constant."""
from __future__ import annotations

import math

import torch


def lr_factor(epoch: int, total_epochs: int, schedule: dict) -> float:
    """Multiplier of the base lr during ``epoch`` (0-based)."""
    warm = int(schedule.get("warmup_epochs", 0))
    if epoch < warm:
        return (epoch + 1) / warm
    name = schedule["name"]
    if name == "cosine":
        span = max(total_epochs - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    gamma = float(schedule.get("gamma", 0.1))
    if name == "multistep":
        return gamma ** sum(epoch >= m for m in schedule.get("milestones", []))
    if name == "step":
        return gamma ** (epoch // int(schedule["step_size"]))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total_epochs: int, schedule: dict):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, total_epochs, schedule))
