"""The training losses and their one registry: softmax CE, LADE-CE (Balanced Softmax), LADER and LADE (Eq. 15-20),
the peers the paper compares with (logit adjustment, Focal loss, LDAM-DRW, Causal Norm) and the multi-expert methods
after it (SADE, BalPoE: logits [N, E, C], one row per expert).

Notation: logits z [N, C], targets y [N], source prior p_s [C], class weights alpha_c [C] (default p_s).
All modules follow ``forward(logits, targets) -> scalar``; priors are buffers, so ``.to(device)`` moves them.
After each call ``last_terms`` holds the loss's own named scalar terms (detached), for logging. ``head`` is the
classifier head the loss trains (``lade_core.math.heads``) and ``set_epoch(e)`` is called before each training epoch.

``LOSSES`` is the one place that says which losses exist, which hyperparameters each takes (``Hyperparameter``:
the paper's default, type, range, help, Tune range) and which post-hoc rules fit its logits; config, CLI, trainer,
evaluation, Tune and the method table of docs/training.md all read it, and ``build_loss`` builds from it. Installed
packages add losses through the entry point group ``lade.losses`` (``register_loss``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lade_core.compat import assert_async, tensor_version
from lade_core.math.checks import bad_indices, check_labels, check_range
from lade_core.math.distributed import gather_batch, is_distributed
from lade_core.math.posthoc import FIXED_RULES, RULES
from lade_core.math.priors import tempered_class_weights, validate_prior
from lade_core.registry import Registry

__all__ = ["SoftmaxLoss", "BalancedSoftmaxLoss", "LADERLoss", "LADELoss", "LogitAdjustedLoss", "FocalLoss",
           "LDAMDRWLoss", "CausalNormLoss", "SADELoss", "BalPoELoss", "inverse_prior", "ESTIMATORS", "LOSSES", "Loss",
           "LossSpec", "Hyperparameter",
           "register_loss", "build_loss", "posthoc_rules", "default_rule", "logits_entangled", "tuned_rules",
           "classifier_head", "check_targets", "lade_reference"]

Estimator = Literal["released", "paper"]
ESTIMATORS: tuple[str, ...] = ("released", "paper")
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
_UNDERFLOW_FLOOR = {dt: math.sqrt(torch.finfo(dt).tiny) for dt in (torch.float32, torch.float64)}


class _LADEFunction(torch.autograd.Function):
    """Fused LADE-CE + alpha * LADER: forward and analytic backward in O(N*C), one [N, C] gradient written.

    LADER = -sum_c w_c (F_c - S_c - lam * S_c^2), with
      F_c = mean_{i: y_i = c} z_ic (0 if class c is absent),
      S_c = logsumexp_i(z_ic + o_ic) - log N, where the offset o is [1, C] ("released") or [N, 1] ("paper").
    dLADER/dz_ic = w_c (1 + 2 lam S_c) softmax_i(z_ic + o_ic) - w_c [y_i = c] / n_c.
    LADE-CE = mean_i CE(z_i + log p_s, y_i), dCE/dz_ic = (softmax_c(z_i + log p_s)_c - [y_i = c]) / N.
    ``ce_weight = 0`` skips the CE term (LADER alone, e.g. on an all-gathered batch; ``log_prior`` and ``prior``
    are then None). Returns (total, terms): ``terms`` [4] = (ce, lader, sum_c w_c F_c, sum_c w_c S_c), detached:
    one output for the logged terms, since each output costs autograd bookkeeping on every step.
    ``lade_reference`` is the same loss written as the equations read, for autograd; the tests hold the two together.

    Why it is shaped this way (bench/loss_speed.py): at large C the cost is the passes over [N, C] — memory traffic
    and ``exp`` — so one fused row softmax P = softmax_c(z) (each row stays in cache) serves both softmaxes:
      e^{z_ic + log p_c} = P_ic p_c e^{lse_i}            (rows: the CE on z + log p_s, normalized by P @ p_s)
      e^{z_ic + o_ic - M} = P_ic r_i, r_i = e^{lse_i + o_i - M}   (columns: normalized by r @ P, M = max_i(lse_i + o_i))
    with lse_i = logsumexp_c z_ic; the column sums are a matrix-vector product, and the backward is one rank-2 outer
    product times P. A column whose every entry lies far below M (> ~44 nats in float32) would lose its sum to
    underflow; then, and on accelerators (where checking costs a host sync), the exact path runs: a column max and
    a second exp pass. At small C the cost is the number of ops, so the class sums are one ``bincount`` each and
    the three weighted sums of LADER one matrix-vector product.
    """

    @staticmethod
    def forward(ctx, z, targets, log_prior, prior, offset, weights, lam, alpha, ce_weight, present_only):  # z [N, C]
        ctx.set_materialize_grads(False)  # ``terms`` gets no gradient: none is zero-filled for it
        n_samples, num_classes = z.shape
        z_at_target = z.gather(1, targets[:, None])[:, 0]  # [N]
        if z.device.type == "cpu":
            counts = torch.bincount(targets, minlength=num_classes).to(z.dtype)  # n_c [C]
            f_sums = torch.bincount(targets, weights=z_at_target, minlength=num_classes).to(z.dtype)
        else:  # bincount's output size needs a host sync on an accelerator; index_add_ does not
            counts = z.new_zeros(num_classes).index_add_(0, targets, z.new_ones(n_samples))
            f_sums = z.new_zeros(num_classes).index_add_(0, targets, z_at_target)
        probs = r = row_sum = col_exp = None
        fused = z.device.type == "cpu"  # on an accelerator the underflow check below would cost a host sync
        if fused:
            probs = torch.softmax(z, dim=1)  # P [N, C]: the one exp pass
            lse = z.amax(dim=1) - probs.amax(dim=1).log_()  # lse_i = max_c z_ic - log max_c P_ic [N]; max P >= 1/C
            row_shift = lse if offset.shape[0] == 1 else lse + offset[:, 0]  # lse_i + o_i [N]
            peak = row_shift.max()  # M
            r = (row_shift - peak).exp_()  # [N], <= 1
            col_sum = r @ probs  # [C]: sum_i e^{z_ic + o_i - M}
            low = col_sum.min()
            if ce_weight:
                row_sum = probs @ prior  # [N]: sum_c P_ic p_c
                low = torch.minimum(low, row_sum.min())
            # Every sum at least sqrt(tiny): what underflowed in it is below N * sqrt(tiny) of it.
            fused = bool(low > _UNDERFLOW_FLOOR[z.dtype])
        if fused:
            s = peak + col_sum.log() - math.log(n_samples)  # [C]
            if ce_weight:
                ce = (lse + row_sum.log() - z_at_target - log_prior[targets]).mean()
        else:  # the exact path: each column stabilized by its own max, the CE by the row softmax of z + log p_s
            shifted = z if offset.shape[0] == 1 else z + offset  # a per-class offset cancels in the column softmax
            col_max = shifted.amax(dim=0)  # [C]
            col_exp = (shifted - col_max).exp_()  # [N, C], e^{z_ic + o_ic - max_i}: <= 1, no overflow
            col_sum = col_exp.sum(dim=0)  # [C], >= 1
            s = col_max + col_sum.log() - math.log(n_samples)  # [C]
            if ce_weight:
                x = z + log_prior  # [N, C]
                probs = torch.softmax(x, dim=1)  # [N, C]; kept: the CE gradient
                ce = (torch.logsumexp(x, dim=1) - x.gather(1, targets[:, None])[:, 0]).mean()
        if offset.shape[0] == 1:
            s = s + offset[0]
        f = f_sums / counts.clamp(min=1)  # [C]
        w = weights * (counts > 0) if present_only else weights  # [C]
        wf, ws, wss = torch.stack([f, s, s * s]) @ w  # sum_c w_c F_c, sum_c w_c S_c, sum_c w_c S_c^2
        lader = ws + lam * wss - wf
        if not ce_weight:
            ce = torch.zeros_like(lader)
        total = ce_weight * ce + alpha * lader
        terms = torch.stack([ce, lader, wf, ws])  # [4]
        ctx.save_for_backward(targets, probs, col_exp, r, col_sum, row_sum, prior, s, counts, w)
        ctx.lam, ctx.alpha, ctx.ce_weight = lam, alpha, ce_weight
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _):
        if g is None:  # only ``terms`` was used (never in training)
            return (None,) * 10
        targets, probs, col_exp, r, col_sum, row_sum, prior, s, counts, w = ctx.saved_tensors
        n_samples = targets.shape[0]
        gw = (g * ctx.alpha) * w  # [C]
        col_scale = gw * (1 + 2 * ctx.lam * s) / col_sum  # [C]: w_c (1 + 2 lam S_c) / column sum
        at_target = (gw / counts.clamp(min=1))[targets]  # [N]
        ce_scale = g * (ctx.ce_weight / n_samples)  # 0-dim tensor: no host sync
        if col_exp is None:  # fused: grad = P * (r col_scale^T + (ce_scale / row_sum) p_s^T)
            grad = r[:, None] * col_scale  # [N, C]; a new tensor: a retained graph may run backward again
            if ctx.ce_weight:
                grad.addcmul_((ce_scale / row_sum)[:, None], prior)  # in place: its broadcast is the fast kernel
            grad.mul_(probs)
        else:
            grad = col_exp * col_scale  # [N, C]
            if ctx.ce_weight:
                grad.addcmul_(probs, ce_scale)
        if ctx.ce_weight:
            at_target = at_target + ce_scale
        grad.scatter_add_(1, targets[:, None], -at_target[:, None])
        return grad, None, None, None, None, None, None, None, None, None


def lade_reference(z: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor | None, offset: torch.Tensor,
                   weights: torch.Tensor, lam: float, alpha: float, present_only: bool = False) -> torch.Tensor:
    """LADE (Eq. 20) = LADE-CE (Eq. 19) + alpha * LADER (Eq. 15-16), written as the equations read and
    differentiated by autograd: the readable path beside ``_LADEFunction``. ``log_prior`` None: LADER alone.
    ``offset``: [1, C] (released estimator) or [N, 1] (paper), as ``LADERLoss._offset`` gives it."""
    n, c = z.shape
    onehot = F.one_hot(targets, c).to(z.dtype)  # [N, C]
    counts = onehot.sum(0)  # n_c
    f = (onehot * z).sum(0) / counts.clamp(min=1)  # F_c: the mean logit of class c's samples
    s = torch.logsumexp(z + offset, dim=0) - math.log(n)  # S_c: log of the importance-weighted mean of e^{z_c}
    w = weights * (counts > 0) if present_only else weights
    lader = -(w * (f - s - lam * s * s)).sum()
    ce = F.cross_entropy(z + log_prior, targets) if log_prior is not None else z.new_zeros(())
    return ce + alpha * lader


class LADERLoss(Loss):
    """LADER (Eq. 15-16), the regularized Donsker-Varadhan term pushing z_c toward log p_u(x|c)/p_u(x).

    estimator="released": the authors' released code (their published numbers): every class c contributes;
      S_c = logsumexp_i(z_ic + log(1/C) - log p_s(c)) - log N.
    estimator="paper": Eq. 13-16 as printed: importance weight by each sample's label,
      S_c = log((1/N) sum_i [(1/C) / p_s(y_i)] e^{z_ic}), summed only over classes present in the batch.

    Under torch.distributed with world size > 1 the batch statistics use the global batch (autograd-aware
    all-gather), so W workers x B samples under DDP give the single-process gradient on W*B samples.
    """

    def __init__(
        self,
        source_prior: PriorLike,
        lam: float = 0.1,
        class_weights: PriorLike | None = None,
        estimator: Estimator = "released",
    ):
        super().__init__()
        p = _source_prior(source_prior)
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        self.lam = check_range(lam, "lam (λ)", low=0)
        self.estimator = estimator
        self.num_classes = p.numel()
        if class_weights is None:
            w = p.clone()
        else:
            w = torch.as_tensor(np.asarray(class_weights, dtype=np.float64))
            if w.dim() != 1 or w.numel() != self.num_classes:
                raise ValueError(f"class_weights has wrong length: {w.numel()} entries for {self.num_classes} classes")
            if not torch.isfinite(w).all():
                raise ValueError(f"class_weights are NaN or infinite at class indices "
                                 f"{bad_indices(~torch.isfinite(w))}")
            if (w < 0).any():
                raise ValueError(f"class_weights are negative at class indices {bad_indices(w < 0)}")
        self.register_buffer("log_source_prior", p.log())  # [C]
        self.register_buffer("class_weights", w)  # [C], alpha_c
        self.register_buffer("released_offset", -math.log(self.num_classes) - p.log())  # [C], log((1/C) / p_s(c))
        self._cast = _CastCache()
        self.last_terms: dict[str, torch.Tensor] = {}

    def _offset(self, targets: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        offset = self._cast.get("released_offset", self.released_offset, z)  # log((1/C) / p_s(c)), [C]
        if self.estimator == "released":
            return offset[None, :]  # [1, C]: importance weight by class c
        return offset[targets][:, None]  # [N, 1]: by each sample's label

    def _run(self, z, targets, log_prior, prior, alpha: float, ce_weight: float):
        total, terms = _LADEFunction.apply(
            z, targets, log_prior, prior, self._offset(targets, z),
            self._cast.get("class_weights", self.class_weights, z), self.lam, alpha, ce_weight,
            self.estimator == "paper",
        )
        # Scalars for logging: LADER itself and the alpha_c-weighted sums of F_c (the mean logit of class-c samples)
        # and S_c (the log of the importance-weighted mean of e^{z_c}), Eq. 15-16: LADER = -(F - S - lam * sum_c
        # alpha_c S_c^2) with these sums.
        ce, lader, wf, ws = terms.unbind()
        self.last_terms = {"lader": lader, "lader_F": wf, "lader_S": ws}
        return total, ce, lader

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, targets, self.num_classes)
        z, targets = gather_batch(z, targets)
        return self._run(z, targets, None, None, 1.0, 0.0)[0]


class LADELoss(Loss):
    """LADE, Eq. 20: LADE-CE + alpha * LADER. ``last_terms``: ``lade_ce``, ``lader`` and LADER's weighted F and S
    sums (``lader_F``, ``lader_S``) of the last call, detached.

    ``class_weight_power`` t (this project's, not the paper's) sets alpha_c = p_s(c)^t / sum_k p_s(k)^t instead of
    giving ``class_weights``: t = 1 is the paper's alpha_c = p_s(c), t = 0 weighs every class equally."""

    def __init__(
        self,
        source_prior: PriorLike,
        alpha: float = 0.1,
        lam: float = 0.1,
        class_weights: PriorLike | None = None,
        class_weight_power: float | None = None,
        estimator: Estimator = "released",
    ):
        super().__init__()
        self.alpha = check_range(alpha, "alpha (α)", low=0)
        if class_weight_power is not None:
            if class_weights is not None:
                raise ValueError("set class_weights or class_weight_power, not both: the power derives alpha_c from "
                                 "the source prior")
            class_weights = tempered_class_weights(_source_prior(source_prior), class_weight_power)
        self.lade_ce = BalancedSoftmaxLoss(source_prior)
        self.lader = LADERLoss(source_prior, lam=lam, class_weights=class_weights, estimator=estimator)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if is_distributed():
            # LADER's batch statistics span the global batch; the CE term stays a local mean (DDP averages it).
            ce, reg = self.lade_ce(logits, targets), self.lader(logits, targets)
            total = ce + self.alpha * reg
            ce, reg = ce.detach(), reg.detach()
        else:
            z = _check_logits(logits, targets, self.lader.num_classes)
            total, ce, reg = self.lader._run(z, targets, self.lade_ce.log_prior_like(z), self.lade_ce.prior_like(z),
                                             self.alpha, 1.0)
        self.last_terms = {"lade_ce": ce, **self.lader.last_terms, "lader": reg}
        return total


# --- The peers of the paper's comparison (Tables 2-6) --------------------------------------------------------

class LogitAdjustedLoss(Loss):
    """Logit-adjusted loss (Menon et al., ICLR 2021, Eq. 10): cross-entropy of z + tau * log p_s (tau = 1 is Balanced
    Softmax / LADE-CE). Its head adds (tau - 1) * log p_s at inference, so the stored logits z + (tau - 1) log p_s
    are disentangled from p_s and take p_t by injection (Eq. 17), for every tau."""

    def __init__(self, source_prior: PriorLike, tau: float = 1.0):
        super().__init__()
        p = _source_prior(source_prior)
        self.tau = check_range(tau, "logit_adjusted tau (τ)", low=0)
        self.num_classes = p.numel()
        self.register_buffer("log_source_prior", p.log())  # [C], float64
        self.head = ("adjusted_linear", {"eval_offset": ((self.tau - 1) * p.log()).tolist()})  # JSON: the model card
        self._cast = _CastCache()
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, targets, self.num_classes)
        loss = F.cross_entropy(z + self.tau * self._cast.get("log_source_prior", self.log_source_prior, z), targets)
        self.last_terms = {"adjusted_ce": loss.detach()}
        return loss


class FocalLoss(Loss):
    """Focal loss (Lin et al., ICCV 2017, Eq. 5 without alpha-balancing): mean_i -(1 - p_i)^gamma log p_i with
    p_i = softmax(z_i)[y_i]; gamma = 0 is cross-entropy. Trained on p_s, its logits take PC compensation."""

    def __init__(self, source_prior: PriorLike, gamma: float = 2.0):
        super().__init__()
        self.num_classes = _source_prior(source_prior).numel()
        self.gamma = check_range(gamma, "focal gamma (γ)", low=0)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, targets, self.num_classes)
        log_p = torch.log_softmax(z, dim=1).gather(1, targets[:, None])[:, 0]  # [N], log p_i
        loss = (-(1 - log_p.exp()).pow(self.gamma) * log_p).mean()
        self.last_terms = {"focal": loss.detach()}
        return loss


class LDAMDRWLoss(Loss):
    """LDAM with deferred re-weighting (Cao et al., NeurIPS 2019, Eq. 12-13 and Alg. 1), on a cosine classifier.

    ``forward`` takes the normalized classifier's cosine logits c [N, C] (its training output). With per-class
    margins m_c = max_margin * (n_c / min_k n_k)^(-1/4) (largest margin on the rarest class) and scale s:
      loss = sum_i w_{y_i} CE(s * (c_i - m_{y_i} e_{y_i}), y_i) / sum_i w_{y_i},
    w = 1 before epoch ``drw_epoch`` and the class-balanced weights of Cui et al. 2019 from it on:
      w_c = (1 - beta) / (1 - beta^{n_c}), normalized to sum to C.
    At inference the head returns s * c, which the DRW stage trained towards a balanced posterior: p_t is injected.
    """

    def __init__(self, source_prior: PriorLike, max_margin: float = 0.5, scale: float = 30.0, drw_epoch: int = 160,
                 beta: float = 0.9999, train_counts: Sequence[int] | None = None):
        super().__init__()
        p = _source_prior(source_prior)
        self.num_classes = p.numel()
        self.max_margin = check_range(max_margin, "ldam_drw max_margin", low=0, low_open=True)
        self.scale = check_range(scale, "ldam_drw scale (s)", low=0, low_open=True)
        self.beta = check_range(beta, "ldam_drw beta (β)", low=0, high=1, high_open=True)
        if isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0:
            raise ValueError(f"ldam_drw drw_epoch must be an integer >= 0, got {drw_epoch!r}")
        self.drw_epoch = drw_epoch
        if train_counts is None:
            raise ValueError("ldam_drw needs the training class counts (train_counts) for its class-balanced weights")
        n = torch.as_tensor(np.asarray(train_counts, dtype=np.float64))
        if n.shape != (self.num_classes,) or (n <= 0).any():
            raise ValueError(f"ldam_drw train_counts must be {self.num_classes} positive counts, got {n.tolist()[:20]}")
        margins = n.pow(-0.25)
        self.register_buffer("margins", margins * (self.max_margin / margins.max()))  # [C], float64
        weights = (1 - self.beta) / (1 - torch.pow(self.beta, n))  # [C]
        self.register_buffer("drw_weights", weights / weights.sum() * self.num_classes)
        self.head = ("cosine", {"scale": self.scale})
        self.reweighting = False
        self._cast = _CastCache()
        self.last_terms: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.reweighting = epoch >= self.drw_epoch

    def forward(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = _check_logits(cosine, targets, self.num_classes)
        m = self._cast.get("margins", self.margins, c)
        # s * (c - m_y e_y) = s c with s m_y subtracted at each row's target entry alone: one pass over [N, C]
        # instead of the four of an [N, C] one-hot times the margins (bench/loss_speed.py).
        output = (c * self.scale).scatter_add_(1, targets[:, None], -(self.scale * m[targets])[:, None])  # [N, C]
        weight = self._cast.get("drw_weights", self.drw_weights, c) if self.reweighting else None
        loss = F.cross_entropy(output, targets, weight=weight)
        # ``drw``: 1 once re-weighting is on, so the epoch it starts shows in the logged history.
        self.last_terms = {"ldam": loss.detach(), "drw": loss.new_tensor(float(self.reweighting)).detach()}
        return loss


class CausalNormLoss(SoftmaxLoss):
    """Causal Norm (Tang et al., NeurIPS 2020): cross-entropy on the multi-head normalized classifier
    (``heads.CausalNormClassifier``: tau, gamma, K = ``heads``), whose inference logits are the TDE logits with
    strength ``alpha``. The loss itself is plain cross-entropy (term ``ce``); its hyperparameters configure the head."""

    def __init__(self, source_prior: PriorLike, tau: float = 16.0, gamma: float = 1 / 32, heads: int = 2,
                 alpha: float = 1.5):
        super().__init__(source_prior)
        tau = check_range(tau, "causal_norm tau (τ)", low=0, low_open=True)
        gamma = check_range(gamma, "causal_norm gamma (γ)", low=0)
        alpha = check_range(alpha, "causal_norm alpha (α)", low=0)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"causal_norm heads must be an integer >= 1, got {heads!r}")
        self.head = ("causal_norm", {"tau": tau, "gamma": gamma, "heads": heads, "alpha": alpha})


# --- The registry ---------------------------------------------------------------------------------------------

# The most backbone stages an expert can own: the four of the ResNet families (``models.RESNET_STAGES``).
MAX_EXPERT_STAGES = 4
# The experts' losses add log(p + 1e-9) as SADE's and BalPoE's released code does (model/loss.py of both).
EXPERT_EPS = 1e-9


def inverse_prior(prior: torch.Tensor) -> torch.Tensor:
    """SADE's inverse prior p-bar (``inverse_prior`` in SADE's model/loss.py): p's values reassigned in reverse rank
    order, so the most frequent class gets the rarest class's probability and vice versa. Tied classes keep their
    index order within the tie (a stable sort; SADE's unstable ``torch.sort`` leaves that order unspecified).
    prior [C] -> [C], the same values permuted."""
    values, order = torch.sort(prior, stable=True)  # values ascending; order[r] = class of rank r
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(prior), device=prior.device)  # rank[c] = rank of class c
    return values[len(prior) - 1 - rank]


class _ExpertLoss(Loss):
    """Cross-entropy of each expert's logits shifted by the expert's fixed per-class offset o_e [C]:
    l_e = CE(z_e + o_e, y), over logits [N, E, C] (``heads.ExpertHeads``' training output). ``last_terms``: each
    expert's ``expert<e>`` (1-based)."""

    def __init__(self, offsets: torch.Tensor, expert_stages: int, eval_offset: torch.Tensor | None = None):
        super().__init__()
        self.num_experts, self.num_classes = offsets.shape  # [E, C], from the source prior the subclass checked
        if isinstance(expert_stages, bool) or not isinstance(expert_stages, int) \
                or not 0 <= expert_stages <= MAX_EXPERT_STAGES:
            raise ValueError(f"expert_stages (the last backbone stages each expert owns) must be an integer from 0 "
                             f"to {MAX_EXPERT_STAGES}, got {expert_stages!r}")
        self.register_buffer("expert_offsets", offsets)  # [E, C], float64
        self._cast = _CastCache()
        # The head's experts own the backbone's last ``expert_stages`` stages (models.build_model splits them).
        self.head = ("experts", {"num_experts": self.num_experts, "expert_stages": expert_stages,
                                 **({"eval_offset": eval_offset.tolist()} if eval_offset is not None else {})})
        self.last_terms: dict[str, torch.Tensor] = {}

    def expert_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[E]: each expert's mean cross-entropy over the batch."""
        E, C = self.num_experts, self.num_classes
        if logits.dim() != 3 or logits.shape[1:] != (E, C):
            raise ValueError(f"a {E}-expert loss needs logits of shape [N, {E}, {C}] (a model with the experts' "
                             f"head), got {tuple(logits.shape)}")
        if logits.shape[0] != targets.shape[0]:
            raise ValueError(f"logits have {logits.shape[0]} rows but targets have {targets.shape[0]}")
        check_targets(targets, C)
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        z = z + self._cast.get("expert_offsets", self.expert_offsets, z)  # [N, E, C]
        # Cross-entropy over C for every (sample, expert) at once, on [N * E, C] rows: the class axis stays the
        # contiguous one (a [N, C, E] transpose is 4-8x slower, bench/loss_speed.py).
        per = F.cross_entropy(z.reshape(-1, C), targets.repeat_interleave(E), reduction="none")  # [N * E]
        return per.view(-1, E).mean(0)

    def _terms(self, per: torch.Tensor) -> None:
        self.last_terms = {f"expert{e + 1}": per[e].detach() for e in range(self.num_experts)}


class SADELoss(_ExpertLoss):
    """SADE's training loss (Zhang et al., NeurIPS 2022, ``DiverseExpertLoss``): three experts on one backbone,
    summed: CE(z_1, y) (softmax: the head-skilled expert), CE(z_2 + log p_s, y) (Balanced Softmax: the balanced one)
    and CE(z_3 + log p_s - tau log p-bar_s, y) (the inverse-skilled one, p-bar_s = ``inverse_prior``). Each log has
    SADE's + 1e-9 inside. Inference: the experts' logits aggregated (``ExpertHeads``, 1/3 each by default)."""

    def __init__(self, source_prior: PriorLike, tau: float = 2.0, expert_stages: int = 2):
        p = _source_prior(source_prior)
        self.tau = check_range(tau, "sade tau", low=0)
        log_p = (p + EXPERT_EPS).log()
        offsets = torch.stack([torch.zeros_like(p), log_p, log_p - self.tau * (inverse_prior(p) + EXPERT_EPS).log()])
        super().__init__(offsets, expert_stages)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per = self.expert_losses(logits, targets)
        self._terms(per)
        return per.sum()


class BalPoELoss(_ExpertLoss):
    """BalPoE's training loss (Sanchez Aimar et al., CVPR 2023, ``BSExpertLoss``): expert k trained with logit
    adjustment of strength tau_k, CE(z_k + tau_k log p_s, y), averaged over the experts (default taus (0, 1, 2)).
    Inference: the experts' average plus (mean tau - 1) log p_s, balanced for any taus (the average is balanced
    as it is when mean tau = 1, BalPoE's default)."""

    def __init__(self, source_prior: PriorLike, taus: Sequence[float] = [0.0, 1.0, 2.0],  # noqa: B006 - only read
                 expert_stages: int = 2):
        p = _source_prior(source_prior)
        if isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence) or len(taus) < 1:
            raise ValueError(f"balpoe taus must be a list of one number per expert (at least 1), got {taus!r}")
        self.taus = [check_range(t, f"balpoe taus[{i}]") for i, t in enumerate(taus)]
        log_p = (p + EXPERT_EPS).log()
        offsets = torch.stack([t * log_p for t in self.taus])
        super().__init__(offsets, expert_stages, eval_offset=(sum(self.taus) / len(self.taus) - 1) * log_p)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per = self.expert_losses(logits, targets)
        self._terms(per)
        return per.mean()


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of one loss, declared once: config validation (type and range), the ``train.py`` flag
    (``--<name>``, dashes for underscores), Tune's default range for a search over the loss and the method table of
    docs/training.md all read it. A name means one thing within its loss: logit adjustment's ``tau`` and Causal
    Norm's are two declarations with their own ranges.

    ``type``: ``float``, ``int``, ``str`` or ``list[float]``; ``ge``/``gt``/``le``/``lt``/``choices`` bound the value
    (each element of a list). ``space``: Tune's range, ``("uniform" | "loguniform", low, high)`` or
    ``("choice", [values])``, None to keep the default in a search. ``epoch_fraction``: the value is an epoch number
    (it must fall inside the run) and a run that leaves it unset gets this fraction of its epochs."""

    name: str
    default: object
    help: str
    type: object = float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    space: tuple | None = None
    epoch_fraction: float | None = None

    @property
    def checks(self) -> dict:
        """The bounds as ``lade_core.config.schema`` checks a value: {"ge": 0, ...}."""
        return {k: v for k in ("ge", "gt", "le", "lt", "choices") if (v := getattr(self, k)) is not None}

    @property
    def range_text(self) -> str:
        """The bounds in words, e.g. ``>= 0, < 1`` (for help texts and docs/training.md)."""
        if self.choices is not None:
            return " | ".join(map(str, self.choices))
        words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return ", ".join(f"{words[k]} {v:g}" for k, v in self.checks.items()) or "any"


@dataclass(frozen=True)
class LossSpec:
    """One training loss, declared once: its module, its hyperparameters (``params``, with the paper's defaults:
    keyword names of the class), the post-hoc rules that fit its (inference) logits, the one the loss calls for
    first (validation, summaries). The classifier head it trains is the module's ``head``. A package adds one with
    an entry point in the group ``lade.losses`` whose object is a ``LossSpec`` (``register_loss``)."""

    cls: type[nn.Module]
    params: tuple[Hyperparameter, ...]
    posthoc: tuple[str, ...]
    needs_counts: bool = False  # the loss takes the training class counts, not only their proportions
    # Why the loss cannot train on mixed (soft) targets (``mixing``: mixup / cutmix), None if it can: its
    # per-sample value must be linear in the one-hot target, sum_c t_c * l_c(z).
    hard_targets_only: str | None = None

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.params)

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.params}

    @property
    def epoch_keys(self) -> dict[str, float]:
        """The hyperparameters that are epoch numbers, each with the fraction of the run it defaults to."""
        return {h.name: h.epoch_fraction for h in self.params if h.epoch_fraction is not None}

    def param(self, name: str) -> Hyperparameter:
        return next(h for h in self.params if h.name == name)


_H = Hyperparameter
# The multi-expert losses' model layout (SADE's and BalPoE's released ResNets: layer1 shared, the last two stages
# each expert's own, ``models.CifarResNet.split_experts``); 0 shares the whole backbone.
_EXPERT_STAGES = _H("expert_stages", 2, "last backbone stages each expert owns (SADE, BalPoE: 2; 0: the whole "
                    "backbone shared, each expert its own classifier)", type=int, ge=0, le=MAX_EXPERT_STAGES)
# A plain-softmax (or focal) model's logits are entangled with p_s and need PC compensation (Eq. 4); the logits of
# LADE / Balanced Softmax, of a logit-adjusted model (its head's inference offset), of LDAM-DRW (re-weighted towards
# balance) and of Causal Norm (TDE; the paper's "PC Causal Norm" adds log p_t - log p_u) are disentangled and
# take p_t by injection (Eq. 17). "raw" is the logits as they are. A ``space`` brackets its paper's value.
LOSSES: Registry[LossSpec] = Registry("loss", {
    "softmax": LossSpec(SoftmaxLoss, (), ("pc", "raw")),
    "balanced_softmax": LossSpec(BalancedSoftmaxLoss, (), ("inject", "raw")),
    "lade": LossSpec(LADELoss, (
        _H("alpha", 0.1, "LADER weight α (Eq. 20)", ge=0),
        _H("lam", 0.1, "LADER regularizer λ (Eq. 16)", ge=0),
        _H("class_weights", None, "LADER class weights α_c as a list (unset: p_s)", type=list[float], ge=0),
        _H("class_weight_power", None, "α_c ∝ p_s(c)^power (1: the paper's p_s, 0: uniform)", ge=0, le=1),
        _H("estimator", "released", "LADER's estimator of the class-c mean of e^z", type=str, choices=ESTIMATORS),
    ), ("inject", "raw"),
        hard_targets_only="LADER (Eq. 15-16) averages each class's logits over the samples of that class in the "
                          "batch, which a mixed image does not belong to"),
    "logit_adjusted": LossSpec(LogitAdjustedLoss, (
        _H("tau", 1.0, "adjustment strength τ (Menon et al.: 1)", ge=0, space=("uniform", 0.5, 2.0)),
    ), ("inject", "raw")),
    "focal": LossSpec(FocalLoss, (
        _H("gamma", 2.0, "focusing γ (Lin et al.: 2)", ge=0, space=("uniform", 0.0, 3.0)),
    ), ("pc", "raw")),
    "ldam_drw": LossSpec(LDAMDRWLoss, (
        _H("max_margin", 0.5, "largest class margin", gt=0, space=("uniform", 0.1, 1.0)),
        _H("scale", 30.0, "cosine logit scale s", gt=0, space=("loguniform", 5.0, 50.0)),
        _H("drw_epoch", 160, "epoch re-weighting starts (unset: 80 % of the run)", type=int, ge=0,
           epoch_fraction=0.8),
        _H("beta", 0.9999, "class-balanced weights' β", ge=0, lt=1),
    ), ("inject", "raw"), needs_counts=True,
        hard_targets_only="LDAM subtracts the label's margin inside the softmax, so the loss is not linear in the "
                          "target"),
    "causal_norm": LossSpec(CausalNormLoss, (
        _H("tau", 16.0, "logit scale τ", gt=0),
        _H("gamma", 1 / 32, "weight-norm offset γ", ge=0),
        _H("heads", 2, "number of heads K", type=int, ge=1),
        _H("alpha", 1.5, "TDE strength α", ge=0, space=("uniform", 0.0, 3.0)),
    ), ("inject", "raw")),
    "sade": LossSpec(SADELoss, (
        _H("tau", 2.0, "inverse expert's strength τ (Zhang et al.: 2)", ge=0, space=("uniform", 1.0, 3.0)),
        _EXPERT_STAGES,
    ), ("inject", "raw")),
    "balpoe": LossSpec(BalPoELoss, (
        _H("taus", [0.0, 1.0, 2.0], "one logit-adjustment strength τ_k per expert (Sanchez Aimar et al.: 0, 1, 2)",
           type=list[float]),
        _EXPERT_STAGES,
    ), ("inject", "raw")),
})
BUILTIN_LOSSES: tuple[str, ...] = tuple(LOSSES)
# The losses whose hyperparameter names every config carries (None where unset): those of lade's first runs. A loss
# added since, built in or a plugin, adds its new names only to its own configs, so the config, the digest and the
# recipe of every other loss stay what they were (a run started before still resumes).
CORE_LOSSES: tuple[str, ...] = ("softmax", "balanced_softmax", "lade", "logit_adjusted", "focal", "ldam_drw",
                                "causal_norm")
# Entry points of the group ``lade.losses`` that could not be loaded: name -> why (named by ``unknown loss``).
PLUGIN_ERRORS: dict[str, str] = {}


def register_loss(name: str, spec: LossSpec) -> LossSpec:
    """Add loss ``name`` to ``LOSSES`` (what an entry point of the group ``lade.losses`` does); a malformed
    declaration is refused with the reason."""
    import inspect

    if not name.isidentifier() or name in LOSSES:
        raise ValueError(f"loss name {name!r} must be a Python identifier not yet registered "
                         f"(registered: {sorted(LOSSES)})")
    if not isinstance(spec, LossSpec):
        raise TypeError(f"loss {name!r}: an entry point must name a lade_core.math.losses.LossSpec, got "
                        f"{type(spec).__name__}")
    if not spec.posthoc or any(r not in FIXED_RULES for r in spec.posthoc):
        raise ValueError(f"loss {name!r}: posthoc must name rules among {FIXED_RULES}, got {spec.posthoc!r}")
    takes = set(inspect.signature(spec.cls).parameters)
    missing = [h.name for h in spec.params if h.name not in takes]
    if "source_prior" not in takes or missing:
        raise ValueError(f"loss {name!r}: {spec.cls.__name__}(source_prior, ...) must take its hyperparameters as "
                         f"keywords; missing {missing or ['source_prior']}")
    return LOSSES.register(name, spec)


def _load_plugins() -> None:
    """Register the losses that installed packages declare (entry point group ``lade.losses``). One that fails to
    load is left out with its reason in ``PLUGIN_ERRORS`` (named when the loss is asked for), not fatal to lade."""
    import warnings
    from importlib.metadata import entry_points

    for ep in entry_points(group="lade.losses"):
        try:  # a name already registered (a built-in's) is refused by register_loss, with the reason
            register_loss(ep.name, ep.load())
        except Exception as e:  # noqa: BLE001 - any failure of a third-party package: reported, not raised
            PLUGIN_ERRORS[ep.name] = f"entry point {ep.value!r} failed: {type(e).__name__}: {e}"
            warnings.warn(f"lade: loss plugin {ep.name!r} not loaded: {PLUGIN_ERRORS[ep.name]}", stacklevel=2)


_load_plugins()
# Every hyperparameter name any loss takes (config keys): a name means one thing within its loss.
LOSS_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for spec in LOSSES.values() for k in spec.hyperparameters))


def _spec(name: str) -> LossSpec:
    return LOSSES.lookup(name, f" (plugin: {PLUGIN_ERRORS[name]})" if name in PLUGIN_ERRORS else "")


def build_loss(name: str, source_prior: PriorLike, *, train_counts: Sequence[int] | None = None,
               **hyperparameters) -> Loss:
    """The registered loss ``name`` for ``source_prior`` [C]; unknown names and hyperparameters are refused, and a
    hyperparameter not given takes the paper's default. ``train_counts`` [C] only for losses that need them."""
    spec = _spec(name)
    unknown = sorted(set(hyperparameters) - set(spec.hyperparameters))
    if unknown:
        raise ValueError(f"loss {name!r} takes no hyperparameters {unknown}; it takes {list(spec.hyperparameters)}")
    extra = {"train_counts": train_counts} if spec.needs_counts else {}
    return spec.cls(source_prior, **{**spec.defaults, **hyperparameters}, **extra)


def posthoc_rules(name: str) -> tuple[str, ...]:
    """The post-hoc rules that fit loss ``name``'s logits, the one the loss calls for first."""
    return _spec(name).posthoc


def default_rule(name: str) -> str:
    """The post-hoc rule loss ``name`` calls for (validation, summaries, the served model's default)."""
    return _spec(name).posthoc[0]


def logits_entangled(name: str) -> bool:
    """Whether loss ``name``'s logits are entangled with p_s (its own rule removes log p_s, as PC does)."""
    return RULES[default_rule(name)].removes_source_prior


def tuned_rules(name: str, has_classifier: bool) -> tuple[str, ...]:
    """The rules tuned on validation that fit loss ``name``'s logits (post-hoc logit adjustment, τ-norm, for logits
    entangled with p_s), those needing the linear classifier only when it is at hand."""
    if not logits_entangled(name):
        return ()
    return tuple(r.name for r in RULES.values() if r.tuned and (has_classifier or not r.needs_classifier))


def classifier_head(name: str, source_prior: PriorLike, *, train_counts: Sequence[int] | None = None,
                    **hyperparameters) -> tuple[str, dict]:
    """(kind, keyword arguments) of the classifier head loss ``name`` trains: ``models.build_model(..., head=)``."""
    return build_loss(name, source_prior, train_counts=train_counts, **hyperparameters).head
