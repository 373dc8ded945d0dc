"""LADER (Eq. 15-16) and LADE (Eq. 20 = LADE-CE + alpha * LADER): the fused autograd function, its readable
reference (``lade_reference``) and the two estimators of the regularizer (the released code's and the paper's).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lade_core.math.checks import bad_indices, check_range
from lade_core.math.distributed import gather_batch, is_distributed
from lade_core.math.losses.base import (
    BalancedSoftmaxLoss,
    Loss,
    PriorLike,
    _CastCache,
    _check_logits,
    _source_prior,
)
from lade_core.math.priors import tempered_class_weights

Estimator = Literal["released", "paper"]
ESTIMATORS: tuple[str, ...] = ("released", "paper")


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
