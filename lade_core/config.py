"""Training config: YAML file (with ``base:`` inheritance) -> CLI overrides -> validated flat dict.

The resolved dict is the Ray Train ``train_loop_config`` (and doubles as a Tune search space); it is saved with
every checkpoint and logged to MLflow.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from .data.sources import check_image_size
from .losses import ESTIMATORS, LOSSES
from .models import MODELS

SCHEDULES = ("cosine", "multistep", "step", "constant")

DEFAULTS: dict = {
    "dataset": None,
    "synthetic": None,  # generation options: prepare `dataset` from them if it is absent
    "model": "resnet32",
    "weights_path": None,
    "image_size": None,  # crop size for training and evaluation; None: the prepared dataset's (its manifest)
    "loss": "lade",
    "alpha": 0.1,
    "lam": 0.1,
    "class_weights": None,  # alpha_c; None = p_s
    "tau": None,  # alpha_c = p_s(c)^tau / sum_k p_s(k)^tau (tau=1: p_s, the paper; tau=0: uniform); excludes class_weights
    "estimator": "released",
    "epochs": 10,
    "batch_size": 128,  # global: split evenly across workers
    "lr": 0.1,
    "backbone_lr": None,  # None = same as lr
    "momentum": 0.9,
    "weight_decay": 5.0e-4,
    "schedule": {"name": "cosine", "warmup_epochs": 0},
    "amp": True,  # bf16 autocast on GPU; ignored on CPU
    "num_workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 1,
    "seed": 0,
    "experiment": "lade",
    "run_name": None,
    "mlflow_uri": None,
    "register": None,
    "storage_path": None,
    "max_failures": 1,
    "progress": True,  # per-epoch progress bar on the driver's console (train.py turns it off when not a terminal)
    "fail_at_epoch": None,  # test-only failure injection: a worker dies mid-epoch once
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping")
    base = data.pop("base", None)
    return _merge(load_config_file(path.parent / base), data) if base else data


def resolve_config(path: str | Path | None, overrides: dict) -> dict:
    """DEFAULTS <- config file <- overrides (only the flags the user actually passed)."""
    cfg = _merge(DEFAULTS, load_config_file(path) if path else {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    return _merge(cfg, overrides)


def validate_config(cfg: dict, num_classes: int | None = None) -> None:
    """Every user error that would otherwise surface inside a worker, raised before any worker starts."""
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"unknown loss {cfg['loss']!r}; choose one of {sorted(LOSSES)}")
    if cfg["model"] not in MODELS:
        raise ValueError(f"unknown model {cfg['model']!r}; choose one of {sorted(MODELS)}")
    if cfg["estimator"] not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg['estimator']!r}; choose one of {ESTIMATORS}")
    for key in ("alpha", "lam", "lr", "weight_decay", "momentum"):
        v = cfg[key]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
    if not isinstance(cfg["progress"], bool):
        raise ValueError(f"progress must be true or false, got {cfg['progress']!r}")
    for key in ("epochs", "batch_size", "num_workers"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    check_image_size(cfg["image_size"], "image_size")
    if cfg["batch_size"] < cfg["num_workers"]:
        raise ValueError(f"batch_size {cfg['batch_size']} is smaller than num_workers {cfg['num_workers']}")
    if cfg["schedule"].get("name") not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg['schedule'].get('name')!r}; choose one of {SCHEDULES}")
    w = cfg["class_weights"]
    if w is not None:
        if num_classes is not None and len(w) != num_classes:
            raise ValueError(f"class_weights has wrong length: {len(w)} entries for {num_classes} classes")
        bad = [i for i, x in enumerate(w) if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0)]
        if bad:
            raise ValueError(f"class_weights are negative or not finite at class indices {bad[:20]}")
    tau = cfg["tau"]
    if tau is not None:
        if not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
            raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
        if w is not None:
            raise ValueError("set class_weights or tau, not both: tau derives alpha_c from the source prior")
    if not cfg["dataset"]:
        raise ValueError("no dataset: set `dataset` (a prepared dataset directory) in the config or with --dataset")
