"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a training worker's batch, as timm does them: one
lambda per batch, each image mixed with its mirror in the batch (``x.flip(0)``).

The mixed target is lam * onehot(y) + (1 - lam) * onehot(y.flip(0)). A loss whose per-sample value is linear in
its (one-hot) target -- sum_c t_c * l_c(z) -- takes that soft target exactly as lam * L(z, y) + (1 - lam) *
L(z, y.flip(0)), which is how ``mixed_loss`` computes it; ``losses.LossSpec.soft_targets`` says which losses are
of that form (docs/recipes.md lists the others and why).
"""
from __future__ import annotations

import numpy as np
import torch


class BatchMix:
    """Mixup with ``Beta(mixup_alpha, mixup_alpha)`` lambdas and/or CutMix with ``Beta(cutmix_alpha, ...)`` box
    areas; with both, each batch takes one of them with probability 1/2 (timm's ``switch_prob``)."""

    def __init__(self, mixup_alpha: float | None = None, cutmix_alpha: float | None = None):
        if not (mixup_alpha or cutmix_alpha):
            raise ValueError("BatchMix needs mixup_alpha or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        """(mixed images [B, 3, H, W], lam): image i becomes lam * x_i + (1 - lam) * x_{B-1-i}, or x_i with a box
        of x_{B-1-i} pasted in covering 1 - lam of it."""
        use_cutmix = bool(self.cutmix_alpha) and (not self.mixup_alpha or rng.random() < 0.5)
        if not use_cutmix:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            return x * lam + x.flip(0) * (1 - lam), lam
        lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
        left, right = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
        out = x.clone()
        out[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
        return out, 1 - float((bottom - top) * (right - left)) / (h * w)  # lam of the box actually pasted


def mixed_loss(criterion, logits: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """The soft-target loss of a mixed batch, lam * L(z, y) + (1 - lam) * L(z, y.flip(0)); the criterion's named
    terms (``last_terms``) are mixed the same way."""
    loss = criterion(logits, targets) * lam
    terms = dict(criterion.last_terms)
    loss = loss + criterion(logits, targets.flip(0)) * (1 - lam)
    criterion.last_terms = {k: v * lam + criterion.last_terms[k] * (1 - lam) for k, v in terms.items()}
    return loss
