"""Running a trained model over a prepared split, where the accelerators are — never on the driver.

- During training, ``sharded_logits``: the DDP workers each run the model on a disjoint share of the split
  (``index % world == rank``) and rank 0 gathers the logits (validation, every epoch).
- After training, ``batch_logits``: Ray Data batch inference on an actor pool (one GPU per actor when the run used
  GPUs), for the test logits a finished run stores.
Both return logits in split order (by the ``index`` column), with every sample exactly once.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lade_core.data.transforms import ImageTransform, expert_view_transforms, normalize
from lade_core.models.backbones import build_model, expert_outputs, load_model_state, memory_format
from lade_core.models.foundation import Finetuning
from lade_core.tracking.artifacts import ExpertViews
from lade_core.train.checkpoint import load_checkpoint


def model_batches(batches, device: torch.device, stats: dict,
                  layout: torch.memory_format = torch.contiguous_format):
    """Ray Data batches {"image": uint8 [B, 3, H, W], "label": [B], "index": [B]} -> the same with "image" as the
    model's float32 input on ``device``, normalized with ``stats`` ({mean, std}, the run's ``normalize``), in the
    model's ``layout`` (``models.memory_format``): the conversion runs where the model runs (its GPU if any)."""
    for batch in batches:
        image = normalize(batch["image"].to(device, non_blocking=True), stats)
        yield {**batch, "image": image.contiguous(memory_format=layout)}


@torch.no_grad()
def predict_logits(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU), labels [N] and split indices [N] over batches from ``model_batches``."""
    model.eval()
    logits, labels, index = [], [], []
    for batch in batches:
        logits.append(model(batch["image"]).float().cpu())
        labels.append(batch["label"].cpu())
        index.append(batch["index"].cpu())
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels), torch.cat(index)


def merge_shards(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_samples: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shards of (logits [n_k, C], labels [n_k], index [n_k]) -> logits [N, C] and labels [N] in split order (by
    index); an error if any sample is missing or repeated."""
    parts = [p for p in parts if len(p[2])]
    logits = torch.cat([p[0] for p in parts])
    labels, index = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    order = torch.argsort(index)
    if len(index) != num_samples or bool((index[order][1:] == index[order][:-1]).any()):
        raise RuntimeError(f"sharded inference returned {len(index)} rows ({len(torch.unique(index))} distinct) for a "
                           f"split of {num_samples}: samples were dropped or repeated")
    return logits[order], labels[order]


# Decoded bytes of one worker's share of an evaluation split that ``sharded_logits`` keeps between epochs: the
# evaluation transform is deterministic, and re-reading a small split costs a Ray Data execution (~0.5 s on 2
# cores) every epoch for a few hundred images.
EVAL_CACHE_BYTES = 256 * 2**20


def sharded_logits(model: nn.Module, prepared, split: str, device: torch.device, image_size: int | None,
                   stats: dict, rank: int, world: int, cache: dict | None = None, in_worker: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Logits of ``split`` computed by all ``world`` DDP workers together: each runs ``model`` on its disjoint share
    (``index % world == rank``) and rank 0 gathers them. Returns (logits [N, C], labels [N]) in split order on
    rank 0, None on the others. Every rank must call it (a collective). ``cache``: a dict that keeps this rank's
    decoded share (uint8 batches) for the next call when it fits in EVAL_CACHE_BYTES. ``in_worker``: this process
    decodes its share (``PreparedDataset.batches``), else Ray Data's tasks do."""
    if cache is not None and split in cache:
        batches = cache[split]
    else:
        batches = prepared.batches(split, prepared.eval_transform(image_size), batch_size=256, in_worker=in_worker,
                                   shard=(rank, world) if world > 1 else None)
        crop = prepared.crop_size(image_size)
        share = -(-prepared.manifest["splits"][split]["num_samples"] // world)
        if cache is not None and share * 3 * crop * crop <= EVAL_CACHE_BYTES:
            batches = cache[split] = list(batches)
    return _gathered_logits(model, batches, prepared.manifest["splits"][split]["num_samples"], device, stats, rank,
                            world)


def _gathered_logits(model: nn.Module, batches, num_samples: int, device: torch.device, stats: dict, rank: int,
                     world: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's ``predict_logits`` over its ``batches``, gathered on rank 0 in split order (a collective)."""
    part = predict_logits(model, model_batches(batches, device, stats, memory_format(model)))
    parts = [part]
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    return merge_shards(parts, num_samples) if rank == 0 else None


# --- A multi-expert model's outputs for test-time aggregation (lade_core.math.aggregation) ---------------------------

# What is stored per image of a split, in this order: the experts' logits on the evaluation transform (what
# aggregated weights are applied to) and on two augmented views (what the weights are learned from).
EXPERT_VIEWS = ("clean", "view_a", "view_b")


def view_transforms(prepared, image_size: int | None, seed: int) -> list[ImageTransform]:
    """The transforms of ``EXPERT_VIEWS`` for ``prepared``: its evaluation transform, then SADE's two augmented
    views (``transforms.expert_view_transforms``) seeded per (run seed, view, sample), so a rerun stores the same
    views."""
    crop = prepared.crop_size(image_size)
    return [prepared.eval_transform(image_size),
            *expert_view_transforms(prepared.family, crop, prepared.input_sizes(crop), seed)]


def sharded_expert_views(model: nn.Module, prepared, split: str, device: torch.device, image_size: int | None,
                         stats: dict, rank: int, world: int, seed: int, cache: dict | None = None,
                         in_worker: bool = False) -> ExpertViews | None:
    """``sharded_logits`` of a multi-expert ``model`` for each of ``EXPERT_VIEWS``: the experts' logits
    [N, 3, E, C] in split order with labels and the head's eval_offset on rank 0, None on the others (a collective,
    like ``sharded_logits``; ``cache``: its cache of the evaluation transform's batches; ``in_worker``: as there)."""
    clean, *views = view_transforms(prepared, image_size, seed)
    num_samples = prepared.manifest["splits"][split]["num_samples"]
    shard = (rank, world) if world > 1 else None
    with expert_outputs(model):
        out = [sharded_logits(model, prepared, split, device, image_size, stats, rank, world, cache, in_worker)]
        for tf in views:
            batches = prepared.batches(split, tf, batch_size=256, in_worker=in_worker, shard=shard)
            out.append(_gathered_logits(model, batches, num_samples, device, stats, rank, world))
    if rank != 0:
        return None
    return ExpertViews(torch.stack([z for z, _ in out], dim=1), out[0][1], model.fc.eval_offset.detach().float().cpu())


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at the start of each
    training forward, but each rank then updates them on its own batch: without this, sharded evaluation would
    mix slightly different models, and differ from the checkpoint (rank 0's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


class _LogitsActor:
    """A Ray Data actor: loads the model from the run's checkpoint once, then maps uint8 image batches to logits."""

    def __init__(self, model_name: str, num_classes: int, head, finetuning: dict, checkpoint, stats: dict,
                 use_gpu: bool):
        with checkpoint.as_directory() as d:  # shared storage (or a copy of it): the same files rank 0 wrote
            state = load_checkpoint(d)["model"]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(model_name, num_classes, head=head, finetuning=Finetuning.from_dict(finetuning))
        load_model_state(self.model, state)
        self.layout = memory_format(self.model)
        self.model.to(self.device, memory_format=self.layout).eval()
        self.stats = stats

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        # Ray Data hands out read-only arrays (zero-copy from its blocks); torch wants a writable one.
        image = np.require(batch["image"], requirements="W")  # uint8 [B, 3, H, W]
        x = normalize(torch.from_numpy(image).to(self.device), self.stats).contiguous(memory_format=self.layout)
        return {"logits": self.model(x).float().cpu().numpy(), **{k: v for k, v in batch.items() if k != "image"}}


def _tag_split(batch: dict, split_id: int) -> dict:
    return {**batch, "split_id": np.full(len(batch["index"]), split_id, dtype=np.int64)}


def batch_logits(prepared, splits: Sequence[str], model_name: str, head, checkpoint, *,
                 finetuning: Finetuning | None = None, image_size: int | None,
                 stats: dict, num_actors: int, use_gpu: bool, cpus_per_actor: float = 1,
                 batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (logits [N, C], labels [N]) in split order} for each of ``splits``, by Ray Data batch inference in
    one pass over one pool of ``num_actors`` actors (each with a GPU if ``use_gpu``; the model is loaded once per
    actor, not once per split) that load the model from ``checkpoint`` (a ``ray.train.Checkpoint`` of
    ``train_loop_per_worker``) with classifier ``head`` and ``finetuning`` (``models.build_model``), its inputs
    normalized with ``stats`` (the run's ``normalize``); the driver only collects results."""
    from ray.data import ActorPoolStrategy

    tagged = [prepared.ray_dataset(split, prepared.eval_transform(image_size)).map_batches(
        partial(_tag_split, split_id=i), batch_format="numpy", batch_size=None) for i, split in enumerate(splits)]
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    out = ds.map_batches(_LogitsActor, batch_format="numpy", batch_size=batch_size,
                         compute=ActorPoolStrategy(size=num_actors), num_gpus=1 if use_gpu else 0,
                         num_cpus=cpus_per_actor,
                         fn_constructor_kwargs={"model_name": model_name, "num_classes": prepared.num_classes,
                                                "head": head, "finetuning": (finetuning or Finetuning()).to_dict(),
                                                "checkpoint": checkpoint, "stats": stats,
                                                "use_gpu": use_gpu})
    parts: dict[int, list] = {i: [] for i in range(len(splits))}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for i in np.unique(b["split_id"]):
            rows = b["split_id"] == i
            parts[int(i)].append(tuple(torch.from_numpy(np.array(b[k][rows])) for k in ("logits", "label", "index")))
    return {split: merge_shards(parts[i], prepared.manifest["splits"][split]["num_samples"])
            for i, split in enumerate(splits)}
