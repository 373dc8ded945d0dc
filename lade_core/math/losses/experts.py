"""The multi-expert methods after the paper, SADE and BalPoE: logits [N, E, C], one row per expert.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lade_core.math.checks import check_range
from lade_core.math.losses.base import (
    Loss,
    PriorLike,
    _CastCache,
    _source_prior,
    check_targets,
)

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
