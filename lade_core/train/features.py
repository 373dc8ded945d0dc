"""Cached features of a frozen backbone (``peft: linear``), and the head trained on them: a hyperparameter search
over α, λ, α_c, the learning rate or the loss itself then costs a head's training per trial, not a backbone's
forward over every image every epoch (``tune.py --cache-features``).

1. ``cache_features``: the backbone's features of every image of train, val and test under the evaluation
   transform, by Ray Data batch inference (actors that build the backbone once), stored as Parquet beside the
   prepared data: ``<dataset>/features/<key>/<split>/``, ``key`` a digest of what the features depend on (the
   model, its weights, the seed of a randomly initialised one, the text projection, the crop, the normalization,
   the dataset's fingerprint). A second search on the same backbone and data reuses them.
2. ``fit_head``: a trial's head trained on them, with the run's loss, optimizer and schedule, exactly as the
   training loop trains a linear probe (same initial head, same SGD; batches of the cached features instead of
   images, which is why the features must be of the evaluation view: no augmentation).
3. ``full_model_state``: the trained head plus the backbone as one state dict, what ``runs.finalize`` logs and
   registers as the model (the backbone rebuilt as the features were computed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lade_core import __version__
from lade_core.config.context import RunContext, flat_config, split_flat_config
from lade_core.config.schema import TrainConfig
from lade_core.train.loop import build_optimizer, build_run_model, evaluate

FEATURES_DIR = "features"
FEATURES_MANIFEST = "features.json"


def _file_identity(path: str | None) -> dict | None:
    if not path:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def feature_key(config: TrainConfig, prepared) -> str:
    """What the cached features depend on, digested: the backbone (model, pretrained weights, a local file by path,
    size and time, the seed where it is initialised at random), its text projection, the crop and normalization,
    and the prepared data (its fingerprint)."""
    m = config.model
    seeded = m.pretrained is None and m.pretrained_file is None and m.weights_path is None
    identity = {"model": m.model, "pretrained": m.pretrained, "pretrained_file": _file_identity(m.pretrained_file),
                "weights_path": _file_identity(m.weights_path), "seed": config.runtime.seed if seeded else None,
                "text_init": m.text_init, "crop": prepared.crop_size(config.data.image_size),
                "normalize": config.augment.normalize, "data": prepared.manifest.get("fingerprint"),
                "lade": __version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_cacheable(config: TrainConfig) -> None:
    """Features can stand in for images only where the backbone never changes and sees each image once."""
    if config.model.peft != "linear":
        raise ValueError(f"--cache-features trains the head alone on a frozen backbone's features: it needs peft "
                         f"linear (--peft linear or `peft: linear` in the config), got peft {config.model.peft}")
    for key in ("mixup", "cutmix"):
        if getattr(config.augment, key) is not None:
            raise ValueError(f"--cache-features: {key} mixes images, which cached features cannot; drop it")


class _FeatureActor:
    """A Ray Data actor: builds the frozen backbone once, then maps uint8 image batches to its features."""

    def __init__(self, loop_config: dict, stats: dict, use_gpu: bool):
        from lade_core.models.backbones import memory_format

        config, run = split_flat_config(loop_config)
        model, _ = build_run_model(config, run)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.layout = memory_format(model)
        self.backbone = model.backbone.to(self.device, memory_format=self.layout).eval()
        self.stats = stats

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from lade_core.data.transforms import normalize

        image = np.require(batch["image"], requirements="W")  # uint8 [B, 3, S, S], read-only from Ray
        x = normalize(torch.from_numpy(image).to(self.device), self.stats).contiguous(memory_format=self.layout)
        feature = self.backbone(x).float().cpu().numpy()  # [B, D]
        return {"feature": list(feature), "label": batch["label"], "index": batch["index"]}


def feature_splits(prepared) -> list[str]:
    return list(dict.fromkeys(("train", "val", prepared.test_split)))


def cache_features(config: TrainConfig, run: RunContext, prepared, *, num_actors: int, use_gpu: bool) -> Path:
    """The folder of the backbone's cached features (``FEATURES_DIR/<feature_key>`` in the dataset), computed now
    if it is not there: one Ray Data pass per split over a pool of ``num_actors`` actors. Written into a temporary
    folder renamed into place at the end, so a killed job or a second search at the same time never leaves a
    partial cache that looks complete."""
    from ray.data import ActorPoolStrategy

    check_cacheable(config)
    key = feature_key(config, prepared)
    folder = prepared.root / FEATURES_DIR / key
    if (folder / FEATURES_MANIFEST).is_file():
        return folder
    partial = folder.with_name(f".{key}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0, counts, dim = time.perf_counter(), {}, None
    for split in feature_splits(prepared):
        ds = prepared.ray_dataset(split, prepared.eval_transform(config.data.image_size)).map_batches(
            _FeatureActor, batch_format="numpy", batch_size=256, compute=ActorPoolStrategy(size=num_actors),
            num_gpus=1 if use_gpu else 0, num_cpus=config.runtime.cpus_per_worker,
            fn_constructor_kwargs={"loop_config": flat_config(config, run), "stats": config.augment.normalize,
                                   "use_gpu": use_gpu})
        ds.write_parquet(str(partial / split))
        features, _ = read_features(partial, split)
        counts[split], dim = len(features), features.shape[1]
    (partial / FEATURES_MANIFEST).write_text(json.dumps(
        {"key": key, "model": config.model.model, "dim": dim, "splits": counts,
         "seconds": round(time.perf_counter() - t0, 1), "lade_version": __version__}, indent=1))
    try:
        partial.rename(folder)
    except OSError:  # another job put the same features there first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def read_features(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) of ``split``, in split order (by the rows' ``index``)."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(Path(folder) / split))
    index = t.column("index").to_numpy()
    order = np.argsort(index, kind="stable")
    features = np.stack(t.column("feature").to_numpy(zero_copy_only=False))[order].astype(np.float32)
    return torch.from_numpy(features), torch.from_numpy(t.column("label").to_numpy()[order].astype(np.int64))


def fit_head(config: TrainConfig, run: RunContext, folder: str | Path, test_split: str,
             class_names: list[str] | None = None, state: dict | None = None,
             on_epoch: Callable[[dict, dict, dict | None], None] | None = None) -> nn.Module:
    """Train the run's head on cached features: per epoch, the training features in batches of ``batch_size``
    (a fresh order each epoch, seeded by (seed, epoch)), the run's loss, optimizer and schedule; then the
    validation metrics of the training loop (``training.evaluate``). ``state``: a checkpoint's ``head``,
    ``optimizer``, ``scheduler``, ``epoch`` and ``history`` to resume from. ``on_epoch(metrics, state, final)``
    after each epoch, ``final`` holding the last epoch's {split: (logits, labels)}. Returns the trained head."""
    from lade_core.train.schedules import build_scheduler

    opt = config.optimizer
    model, criterion = build_run_model(config, run, class_names)
    head = model.fc
    optimizer = build_optimizer(model, opt)  # the backbone's group is empty: peft linear freezes all of it
    scheduler = build_scheduler(optimizer, opt.epochs, config.schedule.to_dict())
    start, history = 0, []
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["epoch"] + 1, list(state["history"])
    train_x, train_y = read_features(folder, "train")
    val = read_features(folder, "val")
    source_prior = torch.tensor(run.source_prior, dtype=torch.float64)
    for epoch in range(start, opt.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.runtime.seed + epoch)
        order = torch.from_numpy(np.random.default_rng([config.runtime.seed, epoch]).permutation(len(train_y)))
        criterion.set_epoch(epoch)
        head.train()
        sums: dict[str, float] = {}
        batches = list(order.split(opt.batch_size))
        for rows in batches:
            loss = criterion(head(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {"loss": loss.detach(), **criterion.last_terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        metrics = {f"train/{k}": v / len(batches) for k, v in sums.items()}
        metrics["train/classes_per_batch"] = float(np.mean([train_y[r].unique().numel() for r in batches]))
        metrics["images_per_s"] = len(train_y) / max(time.perf_counter() - t0, 1e-9)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics["epoch"] = epoch
        head.eval()
        with torch.no_grad():
            logits = {"val": (head(val[0]).float(), val[1])}
            final = None
            if epoch == opt.epochs - 1:
                if test_split != "val":
                    x, y = read_features(folder, test_split)
                    logits[test_split] = (head(x).float(), y)
                final = logits
        metrics.update(evaluate(*logits["val"], config.loss.loss, source_prior, run.train_counts))
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, {"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, final)
    return head


def full_model_state(config: TrainConfig, run: RunContext, head_state: dict) -> dict:
    """The model's state dict: the backbone as the cached features were computed (``training.build_run_model``)
    and the head trained on them."""
    model, _ = build_run_model(config, run)
    model.fc.load_state_dict(head_state)
    return model.state_dict()


def head_trial(config: TrainConfig, run: RunContext, prepared) -> None:
    """A Tune trial on cached features (``tuning.trial_driver``): ``fit_head`` in this process, each epoch's
    checkpoint (the head, its optimizer, the history; the final logits in the last) written where a Ray Train
    trial's would be, so resuming, the scheduler's bookkeeping and ``runs.finalize`` treat both alike."""
    import tempfile

    from ray import tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from lade_core.train.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        publish_checkpoint,
        save_checkpoint,
        save_final_logits,
    )

    rt = config.runtime
    run_dir = f"{rt.storage_path.rstrip('/')}/{rt.run_name}"
    latest, state = latest_checkpoint(run_dir), None
    if latest is not None:
        from ray.train import Checkpoint

        with Checkpoint(latest.path).as_directory() as d:
            state = load_checkpoint(d)
    loop_config = flat_config(config, run)

    def on_epoch(metrics: dict, st: dict, final: dict | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d), {k: v for k, v in st.items() if k != "history"}, loop_config, st["history"])
            if final is not None:
                save_final_logits(Path(d), final)
            path = publish_checkpoint(Path(d), run_dir, metrics)
        tune.report({**metrics, CHECKPOINT_PATH_KEY: path})

    fit_head(config, run, run.search.features, prepared.test_split, prepared.manifest.get("class_names"), state,
             on_epoch)
