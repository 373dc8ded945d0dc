"""The Ray Train worker loop: ``train_loop_per_worker(loop_config)``, with ``train_one_epoch`` and ``evaluate``.

One ``TrainConfig`` (lade_core.config.schema) drives everything, with the run's ``RunContext`` (the dataset's source
prior and training counts, the MLflow run, the search of a trial) beside it; the driver resolves ``augment`` and
``normalize`` (``runs.check_against_dataset``). Ray carries both as one flat dict (``config.flat_config``).
Rank 0 checkpoints through ``ray.train.report`` and logs to MLflow.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lade_core.config.context import RunContext, flat_config, split_flat_config
from lade_core.config.schema import OptimizerConfig, TrainConfig, loss_hyperparameters, model_finetuning
from lade_core.data.augment import augment_seed
from lade_core.data.transforms import ImageTransform
from lade_core.math.evaluation import METRICS, Target, evaluate_targets, protocol_mean_top1
from lade_core.math.mixing import BatchMix, mixed_loss
from lade_core.math.priors import uniform_prior
from lade_core.methods import build_loss, default_rule
from lade_core.models.backbones import build_model, classifier_parameters, has_experts, load_model_state, memory_format
from lade_core.models.foundation import class_text_embeddings, init_head_from_text, text_tower_source
from lade_core.serve.inference import model_batches, sharded_expert_views, sharded_logits, sync_buffers
from lade_core.train.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint, save_final_logits
from lade_core.train.schedules import build_scheduler

# Rows each worker's local shuffle buffer holds, in per-worker batches: enough to change every batch's make-up
# each epoch on rows that preparation already spread uniformly over the shard files (see train_dataset).
SHUFFLE_BUFFER_BATCHES = 4


def build_criterion(config: TrainConfig, source_prior: torch.Tensor, train_counts: list[int]) -> nn.Module:
    """The config's loss from the registry, with the hyperparameters the registry says it takes (defaults filled);
    ``criterion.head`` is the classifier head it trains."""
    return build_loss(config.loss.loss, source_prior, train_counts=train_counts, **loss_hyperparameters(config))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one worker in one epoch: a fresh order each epoch, the same on a rerun or after a
    restore from a checkpoint (it depends on the epoch number, not on how many epochs this process has run)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def epoch_batches(prepared, augment: list, image_size: int | None, seed: int, *, epoch: int, rank: int, world: int,
                  batch_size: int, in_worker: bool = False, reduced_decode: bool = False,
                  device: torch.device | None = None):
    """One epoch of training batches of worker ``rank`` of ``world``: its rows of the epoch
    (``PreparedDataset.rank_batches``), augmented by the run's resolved ``augment`` list at crop ``image_size``
    seeded per (seed, epoch, sample) and locally shuffled with a buffer of SHUFFLE_BUFFER_BATCHES batches seeded by
    (seed, epoch, rank). The same batches for the same (seed, epoch, rank, world, in_worker), on a rerun and after a
    restore from a checkpoint. ``in_worker``: this process decodes them (``data.decode_place``), on ``device``
    if given (``data.device_augment``); ``reduced_decode``: JPEGs at the reduced size their crop allows
    (``ImageTransform.reduced_decode``)."""
    tf = ImageTransform(prepared.family, prepared.crop_size(image_size), augment, augment_seed(seed, epoch),
                        reduced_decode=reduced_decode)
    return prepared.rank_batches(tf, seed=seed, epoch=epoch, rank=rank, world=world, batch_size=batch_size,
                                 in_worker=in_worker, shuffle_buffer=SHUFFLE_BUFFER_BATCHES * batch_size,
                                 shuffle_seed=epoch_seed(seed, epoch, rank), device=device)


def build_run_model(config: TrainConfig, run: RunContext, class_names: list[str] | None = None,
                    rank: int = 0) -> tuple[nn.Module, nn.Module]:
    """(model, criterion) of worker ``rank`` as the run starts training: every RNG seeded from (seed, rank), the
    loss from the registry, then the architecture with its pretrained weights, adapters and head
    (``models.build_model``); with text_init and ``class_names`` (rank 0: DDP gives every rank rank 0's
    parameters), the cosine head's class weights from the text tower (``foundation``). A run's rank 0 and a trial
    on cached features (``features``) start from the same model this way."""
    seed, m = config.runtime.seed, config.model
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    source_prior = torch.tensor(run.source_prior, dtype=torch.float64)
    criterion = build_criterion(config, source_prior, run.train_counts)
    model = build_model(m.model, len(source_prior), m.weights_path, head=criterion.head, pretrained=m.pretrained,
                        finetuning=model_finetuning(m), pretrained_file=m.pretrained_file)
    if m.text_init and class_names:
        source = text_tower_source(m.model, m.pretrained, m.pretrained_file)
        init_head_from_text(model.fc, class_text_embeddings(source, class_names))
    return model, criterion


def build_optimizer(model: nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD with the classifier at ``lr`` and the backbone at ``backbone_lr`` (0: frozen, classifier retraining);
    a backbone's frozen parameters (``peft``: all but its adapters) are not given to it."""
    head = {id(p) for p in classifier_parameters(model)}
    backbone = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    groups = [{"params": classifier_parameters(model), "lr": opt.lr},
              {"params": backbone, "lr": opt.backbone_lr if opt.backbone_lr is not None else opt.lr}]
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_one_epoch(model, criterion, optimizer, batches, device, amp: bool, progress=None,
                    mix: BatchMix | None = None, rng: np.random.Generator | None = None) -> dict:
    """One pass over ``batches`` (from ``model_batches``); returns the mean loss and the mean of each of the loss's
    own named terms (``criterion.last_terms``: softmax ``ce``; Balanced Softmax ``lade_ce``; LADE ``lade_ce``,
    ``lader``, ...), the mean number of distinct classes per batch (the label mix) and images/s. ``mix``: mixup /
    cutmix every batch (``lade_core.math.mixing``), its draws from ``rng``."""
    model.train()
    # Sums stay on the device: one host sync per epoch, not one per term per step.
    sums: dict[str, torch.Tensor] = {}
    n_images, n_batches, n_classes, t0 = 0, 0, 0, time.perf_counter()
    for batch in batches:
        n_classes += int(batch["label"].unique().numel())  # on the CPU copy: no device sync
        x, y = batch["image"], batch["label"].to(device, non_blocking=True)
        lam = None
        if mix is not None:
            x, lam = mix(x, rng)
        with _autocast(device, amp):
            logits = model(x)  # [B, C]
        loss = criterion(logits, y) if lam is None else mixed_loss(criterion, logits, y, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in {"loss": loss.detach(), **criterion.last_terms}.items():
            sums[k] = sums[k] + v.float() if k in sums else v.float()
        n_images += len(y)
        n_batches += 1
        if progress is not None:
            progress.update(1)
    out = {f"train/{k}": float(v) / max(n_batches, 1) for k, v in sums.items()}
    out["train/classes_per_batch"] = n_classes / max(n_batches, 1)
    out["images_per_s"] = n_images / max(time.perf_counter() - t0, 1e-9)
    return out


def evaluate(logits: torch.Tensor, labels: torch.Tensor, loss: str, source_prior, train_counts, prefix="val") -> dict:
    """Top-1, Many/Medium/Few, NLL and ECE under the uniform target prior, and the mean top-1 over the shifted
    protocol, with the post-hoc rule the loss calls for (softmax -> PC compensation; LADE / Balanced Softmax ->
    prior injection)."""
    rule = default_rule(loss)
    uniform = Target("uniform", np.arange(len(labels)), uniform_prior(logits.shape[1]))
    (row,) = evaluate_targets(logits, labels, source_prior, train_counts, (rule,), [uniform])
    out = {f"{prefix}/{k}": row[k] for k in METRICS}
    # Mean top-1 over the 11 shifted priors: the Tune objective for users whose target distribution is unknown.
    out[f"{prefix}/shift_mean_top1"] = protocol_mean_top1(logits, labels, source_prior, train_counts, rule)
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from lade_core.data import decode_place, open_prepared
    from lade_core.runtime.local_ray import quiet_worker_logging
    from lade_core.runtime.malloc import keep_freed_blocks
    from lade_core.tracking.store import EpochLogger

    quiet_worker_logging()
    keep_freed_blocks()  # each batch's tensors from the heap, not fresh pages from the OS (runtime.malloc)
    config, run = split_flat_config(loop_config)  # Ray's flat dict -> the typed config and the run's context
    opt, rt, seed = config.optimizer, config.runtime, config.runtime.seed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    source_prior = torch.tensor(run.source_prior, dtype=torch.float64)
    checkpoint = ray.train.get_checkpoint()
    prepared = open_prepared(config.data.dataset)  # every worker reads its own rows of train and its share of val
    model, criterion = build_run_model(config, run, prepared.manifest.get("class_names")
                                       if rank == 0 and not checkpoint else None, rank)
    layout = memory_format(model)
    model = model.to(memory_format=layout)  # before the optimizer and DDP see the parameters
    optimizer = build_optimizer(model, opt)
    scheduler = build_scheduler(optimizer, opt.epochs, config.schedule.to_dict())
    start_epoch, history = 0, []
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        load_model_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        restore_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    model = ray.train.torch.prepare_model(model)  # device placement + DDP (gloo on CPU, NCCL on GPU)
    criterion = criterion.to(device)
    # Under Tune the search driver logs the epochs (tuning.TrialEpochLogger), exactly those Tune acted on: a worker
    # runs up to an epoch ahead of what Tune has seen, and would log epochs of a trial the scheduler already stopped.
    # Rank 0 opens its MLflow client in a thread: importing MLflow and opening the store takes ~1.5 s, which every
    # other rank would wait out at its first all-reduce; it is first used after the first checkpoint, and that
    # first ``log_history`` also writes the epochs checkpointed before a crash but not yet in MLflow.
    logger = (_in_thread(EpochLogger, rt.mlflow_uri, run.mlflow_run_id)
              if rank == 0 and run.workers_log_epochs else None)

    per_worker_batch = opt.batch_size // world
    image_size = config.data.image_size
    stats = config.augment.normalize  # {mean, std}, resolved on the driver (augment.resolve_normalize)
    mixup, cutmix = config.augment.mixup, config.augment.cutmix
    mix = BatchMix((mixup or {}).get("alpha"), (cutmix or {}).get("alpha")) if (mixup or cutmix) else None
    # The training batches' place: this process on threads, on its device, or Ray Data's tasks on the cluster's
    # CPUs; evaluation batches are decoded here only for "worker".
    place = decode_place(rt.decode, device, config.augment.augment)
    in_worker = place == "worker"
    val_cache: dict = {}  # this rank's decoded validation share, read once (inference.sharded_logits)
    for epoch in range(start_epoch, opt.epochs):
        # Every random draw of the epoch from (seed, epoch, rank): a resumed run repeats an unkilled one's.
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        rng = np.random.default_rng([seed, epoch, rank, 0x31C])
        batches = epoch_batches(prepared, config.augment.augment, image_size, seed, epoch=epoch, rank=rank,
                                world=world, batch_size=per_worker_batch, in_worker=place != "ray_data",
                                reduced_decode=config.augment.reduced_decode,
                                device=device if place == "device" else None)
        progress = (_progress_bar(run.train_counts, epoch, opt.epochs, world, per_worker_batch)
                    if rank == 0 and rt.progress else None)
        criterion.set_epoch(epoch)  # e.g. LDAM-DRW's deferred re-weighting
        metrics = train_one_epoch(model, criterion, optimizer, model_batches(batches, device, stats, layout),
                                  device, opt.amp, progress, mix, rng)
        if progress is not None:
            progress.close()
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics["epoch"] = epoch
        sync_buffers(unwrap(model))
        val = sharded_logits(unwrap(model), prepared, "val", device, image_size, stats, rank, world, val_cache,
                             in_worker)
        final = epoch == opt.epochs - 1
        # The final model's test logits from these warm workers (their GPUs, if any), not from a freshly started
        # actor pool that loads the model again: the last checkpoint carries them to runs.finalize.
        test = (sharded_logits(unwrap(model), prepared, prepared.test_split, device, image_size, stats, rank, world,
                               in_worker=in_worker)
                if final and prepared.test_split != "val" else None)
        # A multi-expert model's experts on clean and augmented views of both splits: test-time aggregation's input.
        views = ({split: sharded_expert_views(unwrap(model), prepared, split, device, image_size, stats, rank, world,
                                              seed, val_cache, in_worker)
                  for split in dict.fromkeys(("val", prepared.test_split))}
                 if final and has_experts(unwrap(model)) else {})
        if rank == 0:
            metrics.update(evaluate(*val, config.loss.loss, source_prior, run.train_counts))
            history.append(metrics)
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(Path(d), {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": [rng_state()]},
                                loop_config, history)
                if final:
                    save_final_logits(Path(d),
                                      {"val": val, **({prepared.test_split: test} if test is not None else {})},
                                      views)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            if logger:  # after the checkpoint is durable: a crash in between is backfilled
                logger.result().log_history(history)  # an MLflow outage warns; what it missed is written next epoch
            # Straight to the worker's stdout, which Ray forwards to the driver once. A plain print() is patched
            # by Ray Train into a log record *and* echoed to the wrapped stdout: every line would appear twice.
            print(epoch_line(metrics, opt.epochs, world), file=sys.__stdout__, flush=True)
        else:
            ray.train.report(metrics)


def _in_thread(fn, *args) -> Future:
    """``fn(*args)`` started in a thread of its own; the future holds its result or its exception."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lade-{fn.__name__}")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v != v else f"{v:.{digits}f}"  # NaN: an empty shot group


def epoch_line(metrics: dict, epochs: int, world: int) -> str:
    """The one console line of an epoch: loss, the loss's own terms, the label mix, validation, throughput."""
    terms = "  ".join(f"{k[len('train/'):]} {v:.4f}" for k, v in metrics.items()
                      if k.startswith("train/") and k not in ("train/loss", "train/classes_per_batch"))
    return (f"epoch {metrics['epoch'] + 1}/{epochs}  loss {metrics['train/loss']:.4f}  {terms}  "
            f"classes/batch {metrics['train/classes_per_batch']:.1f}  val top1 {_fmt(metrics['val/top1'], 4)} "
            f"(many {_fmt(metrics['val/many'])} medium {_fmt(metrics['val/medium'])} few {_fmt(metrics['val/few'])})  "
            f"{metrics['images_per_s'] * world:.0f} img/s")


def _progress_bar(train_counts: list[int], epoch: int, epochs: int, world: int, per_worker_batch: int):
    """Rank 0's bar over its share of the epoch, drawn on the driver's console by Ray (``tqdm_ray``), not as
    hundreds of forwarded log lines."""
    from ray.experimental import tqdm_ray

    total = -(-(sum(train_counts) // world) // per_worker_batch)  # ceil: the last batch may be short
    return tqdm_ray.tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch")


def build_trainer(config: TrainConfig, run: RunContext, prepared, callbacks: list | None = None):
    """The Ray Train V2 ``TorchTrainer`` for one training run: DDP workers fed by Ray Data shards.

    The config's ``run_name`` and ``storage_path`` name the run's checkpoint folder, so fitting a trainer built
    from the same config again resumes from its last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lade_core.runtime.local_ray import train_logging_config, worker_env

    rt = config.runtime
    prepared.check_validation_split()  # validation never runs on the test split
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=flat_config(config, run),  # Ray's boundary: one flat, JSON-able dict
        scaling_config=ScalingConfig(num_workers=rt.num_workers, use_gpu=rt.use_gpu,
                                     resources_per_worker={"CPU": rt.cpus_per_worker, **(rt.worker_resources or {})}),
        run_config=RunConfig(name=rt.run_name, storage_path=rt.storage_path,
                             failure_config=FailureConfig(max_failures=rt.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                             logging_config=train_logging_config(), worker_runtime_env=worker_env()),
        # No Ray Train dataset ingest: each worker reads its own rows of each epoch (epoch_batches), so which rows
        # a worker trains on never depends on which worker asked Ray Data for a block first.
    )
