"""Autograd-aware all-gather, so batch statistics can span the global batch under DDP.

Pure torch. Works on gloo (CPU) and NCCL (GPU): it uses only ``all_gather`` and ``all_reduce``, which every
backend implements, and tolerates ranks with different batch sizes (the last batch of an epoch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "gather_batch"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    # all_gather needs equal shapes: pad every rank's rows to the largest batch, then trim.
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # x [B_r, ...] -> [sum B, ...]
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computed the same loss on the same gathered tensor and holds its own d(loss)/d(gathered).
        # Summing them hands each rank W * d(loss)/d(its rows); DDP's gradient *average* over W ranks then
        # yields exactly the single-process gradient on the global batch.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_batch(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (logits [B_r, C], targets [B_r]) in rank order; identity when not distributed.

    Gradients flow back to each rank's own logits (see ``_GatherWithGrad.backward`` for the scaling contract).
    """
    if not is_distributed():
        return logits, targets
    size = torch.tensor([logits.shape[0]], device=logits.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes_list = [int(s.item()) for s in sizes]
    return _GatherWithGrad.apply(logits, sizes_list), _all_gather_padded(targets, sizes_list)
