"""Post-hoc handling of the label distribution at inference, and the one registry of post-hoc rules (``RULES``).

- ``compensate``: PC strategy (Eq. 4): logits of a plain-softmax model minus log p_s plus log p_t.
  ``pc_softmax`` is its softmax (Eq. 7).
- ``inject_prior``: Eq. 17: logits of a LADE / Balanced-Softmax model (already disentangled from p_s) plus log p_t.
- ``logit_adjust``: post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 9) for any p_t: z - tau log p_s + log p_t;
  tau = 1 is ``compensate``.

A rule is a per-class shift of a model's logits (``Rule.offset``), after, for a rule tuned on validation, a transform
with a parameter τ chosen there (``Rule.transform`` over ``Rule.grid``). A loss declares the fixed rules that fit its
logits (``lade_core.methods.LOSSES``); the tuned ones apply to logits entangled with p_s (a loss whose own rule is
``pc``). Evaluation, comparison, label-shift estimation and the served model all apply rules through ``RULES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lade_core.math.heads import tau_normalize
from lade_core.math.priors import validate_prior
from lade_core.registry import Registry

__all__ = ["RULES", "FIXED_RULES", "Rule", "TAU_GRID", "compensate", "pc_softmax", "inject_prior", "logit_adjust",
           "posthoc_logits", "posthoc_offset", "ensemble_views"]


def ensemble_views(z: torch.Tensor) -> torch.Tensor:
    """Test-time ensembling: the logits [V, B, C] of V views of each image -> log of the mean of their softmax
    [B, C], log (1/V) sum_v softmax(z_v).

    The views' posteriors are averaged, not their logits, because a mixture of posteriors is itself a posterior
    p(y|x): every post-hoc rule below (a per-class shift of log p(y|x), Eq. 4 / Eq. 17) and every label-shift
    estimator (EM on posteriors) applies to it as to one view's. A mean of logits is a product of the views'
    distributions, renormalized, whose temperature grows with how much the views agree. As stored logits the
    result differs from the views' by a constant per row, which no softmax sees."""
    if z.dim() != 3:
        raise ValueError(f"ensemble_views takes logits [V, B, C], got {tuple(z.shape)}")
    log_mean = torch.logsumexp(torch.log_softmax(z.double(), dim=-1), dim=0) - math.log(len(z))
    return log_mean.to(z.dtype)


def _log_prior(prior, logits: torch.Tensor, name: str) -> torch.Tensor:
    p = validate_prior(prior, logits.shape[-1], name)
    # log 0 = -inf is intended: a class the target distribution rules out is never predicted.
    return p.log().to(device=logits.device, dtype=logits.dtype)


def compensate(logits: torch.Tensor, source_prior, target_prior) -> torch.Tensor:
    """logits - log p_s + log p_t, shape [N, C] -> [N, C]: ``logit_adjust`` at tau = 1."""
    return logit_adjust(logits, source_prior, target_prior, 1.0)


def pc_softmax(logits: torch.Tensor, source_prior, target_prior) -> torch.Tensor:
    """PC Softmax (Eq. 7): class probabilities under the target prior, [N, C]."""
    return torch.softmax(compensate(logits, source_prior, target_prior), dim=-1)


def inject_prior(logits: torch.Tensor, target_prior) -> torch.Tensor:
    """logits + log p_t (Eq. 17), shape [N, C] -> [N, C]."""
    return logits + _log_prior(target_prior, logits, "target_prior")


def logit_adjust(logits: torch.Tensor, source_prior, target_prior, tau: float) -> torch.Tensor:
    """logits - tau * log p_s + log p_t, [N, C] -> [N, C]: Menon et al.'s post-hoc adjustment of a softmax model,
    whose tau (1 in theory, tuned on held-out data in practice) scales how much of p_s is taken out."""
    log_ps = _log_prior(source_prior, logits, "source_prior")
    return logits - tau * log_ps + _log_prior(target_prior, logits, "target_prior")


def _raw_offset(source_prior, target_prior, num_classes: int) -> None:
    return None


def _pc_offset(source_prior, target_prior, num_classes: int) -> torch.Tensor:  # -> [C] float64
    return compensate(torch.zeros(1, num_classes, dtype=torch.float64), source_prior, target_prior)[0]


def _inject_offset(source_prior, target_prior, num_classes: int) -> torch.Tensor:  # -> [C] float64
    return inject_prior(torch.zeros(1, num_classes, dtype=torch.float64), target_prior)[0]


def _adjusted(logits: torch.Tensor, tau: float, source_prior, classifier) -> torch.Tensor:
    """z - τ log p_s: then ``inject`` adds log p_t (Menon et al.'s Eq. 9)."""
    return logits - tau * _log_prior(source_prior, logits, "source_prior")


def _tau_norm(logits: torch.Tensor, tau: float, source_prior, classifier) -> torch.Tensor:
    """(z - b) / |w|^τ from the stored logits and the linear classifier (w [C, D], b [C])."""
    return tau_normalize(logits, *classifier, tau)


TAU_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))  # 0 .. 2, as Decouple searches τ


@dataclass(frozen=True)
class Rule:
    """One post-hoc rule. ``offset(source_prior, target_prior, C)`` -> the per-class shift b [C] (float64; None:
    none) with rule(z) = z + b. A rule ``tuned`` on validation first maps the logits with ``transform(z, τ,
    source_prior, classifier)``, τ chosen over ``grid`` on the validation split, then shifts them by ``offset``.
    ``removes_source_prior``: the logits it takes are entangled with p_s (they were trained without it)."""

    name: str
    offset: Callable
    removes_source_prior: bool = False
    tuned: bool = False
    grid: tuple[float, ...] = ()
    transform: Callable | None = None
    needs_classifier: bool = False  # the transform needs the linear classifier's weights (w, b)


RULES: Registry[Rule] = Registry("post-hoc rule", {
    "raw": Rule("raw", _raw_offset),  # the logits as they are
    "pc": Rule("pc", _pc_offset, removes_source_prior=True),  # PC (Eq. 4): z - log p_s + log p_t
    "inject": Rule("inject", _inject_offset),  # Eq. 17: z + log p_t
    # Post-hoc logit adjustment (Menon et al., Eq. 9): z - τ log p_s + log p_t, τ on validation.
    "adjusted": Rule("adjusted", _inject_offset, removes_source_prior=True, tuned=True, grid=TAU_GRID,
                     transform=_adjusted),
    # τ-normalized classifier (Kang et al. 2020): (z - b) / |w|^τ + log p_t, τ on validation.
    "tau_norm": Rule("tau_norm", _inject_offset, removes_source_prior=True, tuned=True, grid=TAU_GRID,
                     transform=_tau_norm, needs_classifier=True),
})
# The rules a loss may declare for its logits (``LossSpec.posthoc``), applied by name with no parameter to tune.
FIXED_RULES: tuple[str, ...] = tuple(name for name, r in RULES.items() if not r.tuned)


def _rule(rule: str, among) -> Rule:
    return RULES.lookup(rule, among=among)


def posthoc_logits(logits: torch.Tensor, rule: str, source_prior, target_prior) -> torch.Tensor:
    """Apply one fixed post-hoc rule by name: ``raw``, ``pc`` (compensate) or ``inject``. Which rules fit a model is
    its loss's business: ``lade_core.methods.posthoc_rules``."""
    if _rule(rule, FIXED_RULES).name == "raw":
        return logits
    if rule == "pc":
        return compensate(logits, source_prior, target_prior)
    return inject_prior(logits, target_prior)


def posthoc_offset(rule: str, source_prior, target_prior, num_classes: int) -> torch.Tensor | None:
    """The per-class offset b [C] (float64) with posthoc_logits(z) = z + b, or None for ``raw``; for a tuned rule,
    the shift its transformed logits take (``Rule.transform``).

    Every rule is a per-class shift of the logits, so evaluating many target priors needs only this vector.
    """
    return _rule(rule, RULES).offset(source_prior, target_prior, num_classes)
