"""A training run's checkpoints: the files in a checkpoint folder (weights and optimizer state with every RNG state
of the rank that wrote it, the run's config and per-epoch history, the final model's logits), how to write and read
them (``weights_only``: shared storage never runs code), and where Ray Train keeps a run's latest checkpoint on local
or remote storage (a path or a URI). Imported by training (which writes them), inference and runs (which read
them) and tuning (which reads histories); it imports no sibling that imports it back.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lade_core.tracking.artifacts import (
    ExpertViews,
    read_expert_views_parquet,
    read_logits_parquet,
    write_expert_views_parquet,
    write_logits_parquet,
)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
# In the last epoch's checkpoint: ``<split>.parquet``, the final model's logits of the test and validation splits,
# computed by the training workers while they are warm (``runs.finalize`` stores them; no model is loaded again),
# and for a multi-expert model ``<split>_expert_views.parquet`` (``artifacts.ExpertViews``).
FINAL_LOGITS_DIR = "final_logits"
_VIEWS_SUFFIX = "_expert_views"


def rng_state() -> dict:
    """This process's RNG states as tensors and plain Python values, so a checkpoint loads with
    ``weights_only=True`` (numpy's state is an array inside a tuple, which the safe unpickler refuses)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def save_checkpoint(directory: Path, state: dict, config: dict, history: list[dict]) -> None:
    """``checkpoint.pt`` (tensors and plain values: model, optimizer, scheduler, epoch, RNG states) with the run's
    config and per-epoch history as JSON beside it, readable without torch."""
    torch.save(state, directory / CHECKPOINT_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    (directory / HISTORY_FILE).write_text(json.dumps(history))


def save_final_logits(directory: Path, logits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      views: dict[str, ExpertViews] | None = None) -> None:
    """{split: (logits [N, C], labels [N])} of the final model, and a multi-expert model's {split: expert views},
    into checkpoint folder ``directory``."""
    (directory / FINAL_LOGITS_DIR).mkdir()
    for split, (z, y) in logits.items():
        write_logits_parquet(directory / FINAL_LOGITS_DIR / f"{split}.parquet", z, y)
    for split, v in (views or {}).items():
        write_expert_views_parquet(directory / FINAL_LOGITS_DIR / f"{split}{_VIEWS_SUFFIX}.parquet", v)


def final_logits(checkpoint, splits) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (logits, labels)} of those of ``splits`` whose logits the last epoch stored in ``checkpoint`` (a
    ``ray.train.Checkpoint``); an earlier epoch's checkpoint, or one written by an older lade, has none."""
    out = {}
    for split in splits:
        try:
            out[split] = read_logits_parquet(f"{checkpoint.path.rstrip('/')}/{FINAL_LOGITS_DIR}/{split}.parquet",
                                             filesystem=checkpoint.filesystem)
        except (FileNotFoundError, OSError):
            continue
    return out


def final_expert_views(checkpoint, splits) -> dict[str, ExpertViews]:
    """``final_logits`` for a multi-expert model's expert views: {split: views} of those the last epoch stored."""
    out = {}
    for split in splits:
        try:
            out[split] = read_expert_views_parquet(
                f"{checkpoint.path.rstrip('/')}/{FINAL_LOGITS_DIR}/{split}{_VIEWS_SUFFIX}.parquet",
                filesystem=checkpoint.filesystem)
        except (FileNotFoundError, OSError):
            continue
    return out


def load_checkpoint(directory: str | Path) -> dict:
    """A checkpoint directory written by ``save_checkpoint``: the state plus ``config`` and ``history``.

    ``weights_only=True``: checkpoints live on shared storage (``--storage-path``), and loading one must never run
    code from it."""
    directory = Path(directory)
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    state["config"] = json.loads((directory / CONFIG_FILE).read_text())
    state["history"] = json.loads((directory / HISTORY_FILE).read_text())
    return state


# Ray Train V2 writes this beside a run's checkpoints; its latest entry is the checkpoint a restart resumes from.
_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


class LatestCheckpoint(NamedTuple):
    epoch: int
    path: str  # the checkpoint folder: a path or a URI
    metrics: dict  # what rank 0 reported with it (lade_core.train.loop.train_loop_per_worker)


def _storage_fs(location: str):
    """(pyarrow filesystem, path inside it) of a local path or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location if "://" in location else Path(location).resolve().as_uri())


def latest_checkpoint(run_dir: str | None) -> LatestCheckpoint | None:
    """(epoch, checkpoint path or URI, reported metrics) of the latest checkpoint Ray Train registered for the run in
    ``run_dir`` (``<storage_path>/<run_name>``, a path or a URI), or None for a new run."""
    if not run_dir:
        return None
    try:
        fs, path = _storage_fs(run_dir)
        with fs.open_input_stream(f"{path}/{_CHECKPOINT_SNAPSHOT}") as f:
            latest = json.loads(f.read())["latest_checkpoint_result"]
        if not latest:
            return None
        return LatestCheckpoint(int(latest["metrics"]["epoch"]), join_path(run_dir, latest["checkpoint_dir_name"]),
                                dict(latest["metrics"]))
    except (FileNotFoundError, OSError, KeyError, TypeError, ValueError):
        return None  # no checkpoint yet: a new run


def publish_checkpoint(local_dir: Path, run_dir: str, metrics: dict) -> str:
    """Copy a checkpoint folder written by ``save_checkpoint`` to ``run_dir`` (a path or a URI) as
    ``checkpoint_epoch_<epoch>`` and record it as the run's latest in the snapshot Ray Train keeps there
    (``latest_checkpoint`` reads it): how a trial that trains without Ray Train (``features.head_trial``) leaves
    its checkpoints as a Ray Train run does. Returns the checkpoint's path or URI."""
    import pyarrow.fs

    name = f"checkpoint_epoch_{int(metrics['epoch']):06d}"
    fs, base = _storage_fs(run_dir)
    fs.create_dir(f"{base}/{name}", recursive=True)
    pyarrow.fs.copy_files(str(local_dir), f"{base}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
    snapshot = {"latest_checkpoint_result": {"metrics": metrics, "checkpoint_dir_name": name}}
    with fs.open_output_stream(f"{base}/{_CHECKPOINT_SNAPSHOT}") as f:  # after the files: never points at a partial
        f.write(json.dumps(snapshot, default=float).encode())
    return join_path(run_dir, name)


def _read_history(fs, checkpoint_dir: str) -> list[dict]:
    """``history.json`` of a checkpoint folder in filesystem ``fs``, read alone (not the weights beside it)."""
    with fs.open_input_stream(f"{checkpoint_dir.rstrip('/')}/{HISTORY_FILE}") as f:
        return json.loads(f.read())


def saved_history(checkpoint) -> list[dict]:
    """The per-epoch history saved in a ``ray.train.Checkpoint``."""
    return _read_history(checkpoint.filesystem, checkpoint.path)


def checkpoint_history(storage: str, checkpoint_path: str) -> list[dict] | None:
    """The per-epoch history saved in a checkpoint folder, given as Ray Train names it (``Checkpoint.path``: a path
    inside the filesystem of ``storage``, the run's storage location) or as a URI, or None if it cannot be read."""
    try:
        fs, path = _storage_fs(checkpoint_path) if "://" in checkpoint_path else (_storage_fs(storage)[0],
                                                                                   checkpoint_path)
        return _read_history(fs, path)
    except (FileNotFoundError, OSError, TypeError, ValueError):
        return None


def resume_epoch(run_dir: str | None) -> int:
    """The epoch a (re)started worker group of the run in ``run_dir`` begins with: one past the epoch of the latest
    registered checkpoint, 0 for a new run."""
    latest = latest_checkpoint(run_dir)
    return latest[0] + 1 if latest else 0


def join_path(base: str, name: str) -> str:
    """``base``/``name`` for a local path or a URI (``s3://bucket/x``), never turning a URI into a local path."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)
