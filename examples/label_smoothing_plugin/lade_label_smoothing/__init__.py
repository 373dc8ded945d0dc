"""Label-smoothed cross-entropy (Szegedy et al., CVPR 2016) as a lade loss.

    loss = (1 - ε) CE(z, y) + ε · mean_c(-log softmax(z)_c),   ε = ``smoothing``

which is ``torch.nn.functional.cross_entropy(logits, y, label_smoothing=ε)``. Like plain softmax its logits stay
entangled with the source prior, so its post-hoc rule is PC (Eq. 4): z - log p_s + log p_t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lade_core.math.losses import Loss, check_targets
from lade_core.methods import Hyperparameter, LossSpec


class LabelSmoothingLoss(Loss):
    def __init__(self, source_prior, smoothing: float = 0.1):
        super().__init__()
        self.num_classes = len(source_prior)
        if not 0 <= smoothing < 1:  # the declaration below checks configs; this guards direct use
            raise ValueError(f"label_smoothing smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [N, C], [N]
        check_targets(targets, self.num_classes)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        self.last_terms = {"ce_smoothed": loss.detach()}
        return loss


declaration = LossSpec(
    LabelSmoothingLoss,
    (Hyperparameter("smoothing", 0.1, "label smoothing ε", ge=0, lt=1, space=("uniform", 0.0, 0.3)),),
    posthoc=("pc", "raw"),
)
