"""Post-hoc handling of the label distribution at inference.

- ``compensate``: PC strategy (Eq. 4): logits of a plain-softmax model minus log p_s plus log p_t.
  ``pc_softmax`` is its softmax (Eq. 7).
- ``inject_prior``: Eq. 17: logits of a LADE / Balanced-Softmax model (already disentangled from p_s) plus log p_t.
- ``logit_adjust``: post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 9) for any p_t: z - tau log p_s + log p_t;
  tau = 1 is ``compensate``.
"""
from __future__ import annotations

import torch

from .priors import validate_prior

__all__ = ["RULES", "compensate", "pc_softmax", "inject_prior", "logit_adjust", "posthoc_logits", "posthoc_offset"]

# The rules ``posthoc_logits`` applies by name (a loss declares which fit its logits: lade_core.losses.LOSSES).
RULES: tuple[str, ...] = ("raw", "pc", "inject")


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


def posthoc_logits(logits: torch.Tensor, mode: str, source_prior, target_prior) -> torch.Tensor:
    """Apply one post-hoc rule by name: ``raw``, ``pc`` (compensate) or ``inject``. Which rules fit a model is
    its loss's business: ``lade_core.losses.posthoc_rules``."""
    if mode == "raw":
        return logits
    if mode == "pc":
        return compensate(logits, source_prior, target_prior)
    if mode == "inject":
        return inject_prior(logits, target_prior)
    raise ValueError(f"unknown post-hoc mode {mode!r}; choose one of {list(RULES)}")


def posthoc_offset(mode: str, source_prior, target_prior, num_classes: int) -> torch.Tensor | None:
    """The per-class offset b [C] (float64) with posthoc_logits(z) = z + b, or None for ``raw``.

    Every rule is a per-class shift of the logits, so evaluating many target priors needs only this vector.
    """
    if mode == "raw":
        return None
    return posthoc_logits(torch.zeros(1, num_classes, dtype=torch.float64), mode, source_prior, target_prior)[0]
