"""What every loss shares: the ``Loss`` interface (``forward(logits, targets) -> scalar``, ``last_terms``,
``head``, ``set_epoch``), the checks of targets and logits, and the two plain cross-entropies, softmax CE and
LADE-CE (Balanced Softmax, Eq. 19).

Notation: logits z [N, C], targets y [N], source prior p_s [C], class weights alpha_c [C] (default p_s). Priors
are buffers, so ``.to(device)`` moves them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lade_core.math.checks import bad_indices, check_labels
from lade_core.math.priors import validate_prior
from lade_core.math.torch_private import assert_async, tensor_version

PriorLike = Sequence[float] | np.ndarray | torch.Tensor


def check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """One clear error for labels outside [0, C) instead of a device-side assert deep inside a kernel."""
    if targets.dim() != 1:
        raise ValueError(f"targets must have shape [N], got {tuple(targets.shape)}")
    if not targets.numel():
        return
    if targets.device.type != "cpu":
        # On an accelerator a host-side check costs a sync every step; the device-side assert stops the step
        # with this message instead (the training input is checked at preparation, so it never fires there).
        assert_async(((targets >= 0) & (targets < num_classes)).all(),
                     f"targets out of range: labels must lie in [0, {num_classes})")
        return
    check_labels(targets, num_classes, "targets out of range: labels")


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape [N, {num_classes}], got {tuple(logits.shape)}")
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but targets have {targets.shape[0]}")
    check_targets(targets, num_classes)
    # Reductions over the batch in fp16/bf16 lose the tail classes; autocast output is promoted to fp32.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class _CastCache:
    """The float64 buffers cast to the logits' dtype/device once, not on every step.

    Keyed on the buffer's storage and version, so ``.to(device)`` or an in-place edit invalidates the entry.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, buf: torch.Tensor, like: torch.Tensor, derive=None) -> torch.Tensor:
        """``buf`` (or ``derive(buf)``, computed in float64) in ``like``'s dtype and device."""
        key = (name, like.dtype, like.device, buf.data_ptr(), tensor_version(buf))
        out = self._entries.get(key)
        if out is None:
            self._entries = {k: v for k, v in self._entries.items() if k[0] != name}
            out = self._entries[key] = (buf if derive is None else derive(buf)).to(device=like.device, dtype=like.dtype)
        return out


def _source_prior(source_prior: PriorLike) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(source_prior, dtype=np.float64))
    p = validate_prior(p, p.numel(), "source_prior")
    if (p == 0).any():
        # log p_s(c) = -inf would make the loss infinite for every sample of class c.
        raise ValueError(f"source_prior is zero at class indices {bad_indices(p == 0)}")
    return p


class Loss(nn.Module):
    """What every registered loss has besides ``forward``: the head it trains and a per-epoch hook."""

    head: tuple[str, dict] = ("linear", {})

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before epoch ``epoch`` (0-based); most losses do not change over a run."""


class SoftmaxLoss(Loss):
    """Plain softmax cross-entropy (the paper's "Softmax" baseline). Its logits stay entangled with p_s, which the
    PC strategy (Eq. 4-7) removes at inference. ``source_prior`` only fixes the number of classes."""

    def __init__(self, source_prior: PriorLike):
        super().__init__()
        self.num_classes = _source_prior(source_prior).numel()
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, targets, self.num_classes)
        loss = F.cross_entropy(z, targets)
        self.last_terms = {"ce": loss.detach()}
        return loss


class BalancedSoftmaxLoss(Loss):
    """LADE-CE, Eq. 19 (= Balanced Softmax): cross-entropy of ``logits + log p_s``. Its one term is ``lade_ce``."""

    def __init__(self, source_prior: PriorLike):
        super().__init__()
        p = _source_prior(source_prior)
        self.num_classes = p.numel()
        self.register_buffer("log_source_prior", p.log())  # [C], float64
        self._cast = _CastCache()
        self.last_terms: dict[str, torch.Tensor] = {}

    def log_prior_like(self, z: torch.Tensor) -> torch.Tensor:
        return self._cast.get("log_source_prior", self.log_source_prior, z)

    def prior_like(self, z: torch.Tensor) -> torch.Tensor:
        return self._cast.get("source_prior", self.log_source_prior, z, torch.exp)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, targets, self.num_classes)
        loss = F.cross_entropy(z + self.log_prior_like(z), targets)
        self.last_terms = {"lade_ce": loss.detach()}
        return loss


# sqrt of the smallest normal number per dtype: the fused LADE path's underflow bound (below).
