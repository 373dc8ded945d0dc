"""Test-time aggregation of a multi-expert model's experts on unlabeled target images (SADE: Zhang et al., NeurIPS
2022, Sec. 4.2, "test-time self-supervised aggregation"; torch only).

A model with E experts (``heads.ExpertHeads``) predicts with a weighted sum of the experts' logits,
z = sum_e w_e z_e. Without labels of the target, SADE picks w = softmax(theta) by *prediction stability*: two
augmented views a, b of each target image should get the same aggregated prediction, so theta maximizes

    S(theta) = mean_n cos( softmax(sum_e w_e z^a_ne), softmax(sum_e w_e z^b_ne) )

by SGD over batches of the target images (SADE's settings: theta initialised to 1/E each, lr 0.025, momentum 0.9,
Nesterov, weight decay 5e-4, batches of 128, a few passes, stopping after a pass in which a weight fell below
0.05). The expert whose predictions hold across views on *this* target gets the weight: on a tail-heavy target the
balanced and inverse experts, on a head-heavy one the softmax expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["aggregate", "learn_expert_weights", "stability"]

# SADE's test-time training settings (test_training_*.py and configs/test_time_*.json of its release).
LR, MOMENTUM, WEIGHT_DECAY, BATCH_SIZE, EPOCHS, MIN_WEIGHT = 0.025, 0.9, 5e-4, 128, 5, 0.05
COS_EPS = 1e-6  # torch.nn.CosineSimilarity(dim=1, eps=1e-6), as SADE's code


def aggregate(expert_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e w_e z_e: expert logits [N, E, C], weights [E] -> logits [N, C]."""
    return torch.einsum("nec,e->nc", expert_logits, weights.to(expert_logits.dtype))


def aggregated(expert_logits: torch.Tensor, weights: torch.Tensor, eval_offset: torch.Tensor) -> torch.Tensor:
    """The inference logits of a multi-expert head: sum_e w_e z_e + eval_offset (expert logits [N, E, C], weights
    [E], the head's fixed offset [C], e.g. BalPoE's; zero for SADE), in the expert logits' dtype."""
    offset = torch.as_tensor(eval_offset).to(expert_logits.device, expert_logits.dtype)
    return aggregate(expert_logits, weights.to(expert_logits.device)) + offset.reshape(expert_logits.shape[2])


def stability(view_a: torch.Tensor, view_b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """S: the mean cosine similarity of the two views' aggregated posteriors ([N, E, C] each, weights [E])."""
    pa, pb = F.softmax(aggregate(view_a, weights), dim=1), F.softmax(aggregate(view_b, weights), dim=1)
    return F.cosine_similarity(pa, pb, dim=1, eps=COS_EPS).mean()


def _check_views(view_a: torch.Tensor, view_b: torch.Tensor) -> None:
    if view_a.dim() != 3 or view_a.shape != view_b.shape:
        raise ValueError(f"test-time aggregation needs the experts' logits [N, E, C] of two views of the same "
                         f"images, got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    if view_a.shape[0] == 0:
        raise ValueError("test-time aggregation needs unlabeled target images: got none")
    if not (torch.isfinite(view_a).all() and torch.isfinite(view_b).all()):
        raise ValueError("test-time aggregation: the experts' logits are not all finite")


def learn_expert_weights(view_a: torch.Tensor, view_b: torch.Tensor, *, epochs: int = EPOCHS, lr: float = LR,
                         batch_size: int = BATCH_SIZE, min_weight: float = MIN_WEIGHT,
                         seed: int = 0) -> tuple[torch.Tensor, dict]:
    """SADE's aggregation weights w [E] for the target whose images' two augmented views have expert logits
    ``view_a`` and ``view_b`` [N, E, C] (row n of both: the same image), and ``{"weights": w as a list, "epochs":
    passes run, "stopped_early": whether a weight fell below ``min_weight``, "stability": S before and after}``.

    Each pass visits the images in a random order seeded by (``seed``, pass); the objective is ``stability``."""
    _check_views(view_a, view_b)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"test-time aggregation needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    a, b = view_a.detach().double(), view_b.detach().double()
    n, num_experts = a.shape[0], a.shape[1]
    theta = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    before = float(stability(a, b, F.softmax(theta.detach(), 0)))
    done, stopped = 0, False
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            loss = -stability(a[rows], b[rows], F.softmax(theta, 0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        done += 1
        if bool((F.softmax(theta.detach(), 0) < min_weight).any()):  # SADE's stopping rule, after the pass
            stopped = True
            break
    w = F.softmax(theta.detach(), 0)
    return w, {"weights": w.tolist(), "epochs": done, "stopped_early": stopped,
               "stability": {"before": before, "after": float(stability(a, b, w))}}


def self_supervised_aggregation(expert_views: torch.Tensor, eval_offset: torch.Tensor,
                                seed: int = 0) -> tuple[torch.Tensor, dict]:
    """SADE's test-time self-supervised aggregation over one target's unlabeled images: the expert weights learned
    on the two augmented views (``learn_expert_weights``) applied to the clean view (``aggregated``); no prior is
    injected (SADE's rule). expert_views [N, 3, E, C] (clean, view a, view b) -> (logits [N, C], the weights' info).
    """
    if expert_views.dim() != 4 or expert_views.shape[1] != 3:
        raise ValueError(f"expert views must be [N, 3, E, C] (clean, view a, view b), got {tuple(expert_views.shape)}")
    weights, info = learn_expert_weights(expert_views[:, 1], expert_views[:, 2], seed=seed)
    return aggregated(expert_views[:, 0], weights, eval_offset), info
