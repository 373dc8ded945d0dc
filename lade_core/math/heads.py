"""Classifier heads other than the plain linear layer, for the losses that train one (torch only).

A head maps pooled features x [B, D] to logits [B, C]. In ``train()`` mode it returns what its loss takes; in
``eval()`` mode it returns the model's *inference* logits, the ones stored, evaluated and served (softmax of them
is the model's posterior, before any post-hoc rule):
- ``CosineClassifier`` (LDAM, Cao et al. 2019): training output cos(w_c, x) [B, C] (the LDAM loss subtracts the
  margin and scales by s); inference output s * cos(w_c, x), the logits the loss trained softmax on.
- ``CausalNormClassifier`` (Tang et al. 2020): training output the multi-head normalized logits (Eq. 3 there);
  inference output the TDE logits, which subtract alpha times the effect of the moving-average feature direction.
- ``AdjustedLinear`` (logit adjustment, Menon et al. 2021): a linear layer whose inference output adds
  (tau - 1) * log p_s, so the stored logits are disentangled from p_s like a Balanced Softmax model's.
- ``CosineLinear`` (LIFT, Shi et al. 2024): s * cos(w_c, x) in both modes (plus an adjusted head's eval offset at
  inference): any logit-training loss on a text-initialised classifier.
- ``ExpertHeads`` (multi-expert models: SADE, Zhang et al. 2022; BalPoE, Sanchez Aimar et al. 2023): E linear
  classifiers on the shared features or on each expert's own; training output every expert's logits [B, E, C],
  inference output their weighted sum (``expert_weights``, default 1/E each) plus a fixed per-class
  ``eval_offset``.
``HEADS`` names them; ``lade_core.methods`` says which loss trains which head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lade_core.math.aggregation import aggregated
from lade_core.registry import Registry

__all__ = ["CosineClassifier", "CosineLinear", "CausalNormClassifier", "AdjustedLinear", "ExpertHeads", "HEADS",
           "build_head", "tau_normalize"]


class CosineClassifier(nn.Module):
    """Normalized linear classifier without bias: cos(w_c, x) = w_c.x / (|w_c| |x|)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.scale = float(scale)  # range-checked by the loss that trains the head (losses.LDAMDRWLoss)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # [C, D]
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] -> [B, C]
        cosine = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()
        return cosine if self.training else self.scale * cosine


class CausalNormClassifier(nn.Module):
    """The multi-head normalized classifier of Causal Norm with its TDE inference (Tang et al. 2020, Eq. 3 and 7).

    The D feature dimensions are split into K heads of D/K. Per head k, with w^k the class weights and x^k the
    feature slice:
      training logits   z_c = (tau / K) sum_k  w_c^k . x^k / ((|w_c^k| + gamma) |x^k|)
      TDE logits        z_c = (tau / K) sum_k  w_c^k . (x^k/|x^k| - alpha cos(x^k, d^k) d^k/|d^k|) / (|w_c^k| + gamma)
    where d is the moving-average feature direction, d <- mu d + mean_batch(x) in every training forward (mu = 0.9,
    as the authors' code), kept as the buffer ``feature_direction`` so it is saved with the model.
    """

    MOMENTUM = 0.9

    def __init__(self, in_features: int, num_classes: int, tau: float = 16.0, gamma: float = 1 / 32, heads: int = 2,
                 alpha: float = 1.5):
        super().__init__()
        # tau, gamma and alpha are range-checked by the loss that trains the head (losses.CausalNormLoss); only the
        # head knows the feature dimension its heads must divide.
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or in_features % heads:
            raise ValueError(f"causal_norm heads must be a positive integer dividing the feature dimension "
                             f"{in_features}, got {heads!r}")
        self.tau, self.gamma, self.heads, self.alpha = float(tau), float(gamma), heads, float(alpha)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # [C, D]
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        self.register_buffer("feature_direction", torch.zeros(in_features))  # [D], d (unnormalized)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., K, D/K]
        return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] -> [B, C]
        xk = F.normalize(self._split(x), dim=-1)  # [B, K, D/K], x^k / |x^k|
        wk = self._split(self.weight)  # [C, K, D/K]
        wk = wk / (wk.norm(dim=-1, keepdim=True) + self.gamma)
        if self.training:
            with torch.no_grad():
                self.feature_direction.mul_(self.MOMENTUM).add_(x.detach().to(self.feature_direction.dtype).mean(0))
        else:
            # TDE: remove the projection of each head's feature on the head's moving-average direction.
            dk = F.normalize(self._split(self.feature_direction.to(x.dtype)), dim=-1)  # [K, D/K]
            xk = xk - self.alpha * (xk * dk).sum(-1, keepdim=True) * dk
        return (self.tau / self.heads) * torch.einsum("bkd,ckd->bc", xk, wk)


class AdjustedLinear(nn.Linear):
    """A linear layer whose inference output is shifted by a fixed per-class ``eval_offset`` [C] (a buffer)."""

    def __init__(self, in_features: int, num_classes: int, eval_offset: torch.Tensor | None = None):
        super().__init__(in_features, num_classes)
        offset = torch.zeros(num_classes) if eval_offset is None else torch.as_tensor(eval_offset, dtype=torch.float32)
        self.register_buffer("eval_offset", offset.reshape(num_classes).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return z if self.training else z + self.eval_offset.to(z.dtype)


class CosineLinear(nn.Module):
    """s * cos(w_c, x) in training and at inference, plus a fixed per-class ``eval_offset`` [C] at inference (a
    logit-adjusted loss's): the cosine classifier of LIFT (Shi et al. 2024), whose class weights start as the CLIP
    text embeddings of the class names (``foundation.init_head_from_text``), for any loss that trains logits."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 25.0,
                 eval_offset: torch.Tensor | None = None):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # [C, D]
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        offset = torch.zeros(num_classes) if eval_offset is None else torch.as_tensor(eval_offset, dtype=torch.float32)
        self.register_buffer("eval_offset", offset.reshape(num_classes).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] -> [B, C]
        z = self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t())
        return z if self.training else z + self.eval_offset.to(z.dtype)


class ExpertHeads(nn.Module):
    """E experts' linear classifiers (lade's multi-expert models).

    The experts read either one shared feature x [B, D] (a backbone shared whole) or each its own, x [E * B, D]
    expert-major, rows e * B .. (e + 1) * B - 1 from expert e's own last backbone stages (``own_features``: SADE's
    and RIDE's layout, built by ``models.build_model``). Training output: z [B, E, C], z_e = W_e x_e + b_e.
    Inference output: sum_e w_e z_e + eval_offset [B, C], with ``expert_weights`` w [E] (default 1/E each:
    BalPoE's average, SADE's fixed aggregation; test-time aggregation sets learned ones) and ``eval_offset`` [C]
    (BalPoE: (mean tau - 1) log p_s, so the inference logits are balanced like a Balanced Softmax model's). Both
    are buffers, saved with the model and served with it. The experts' losses (``losses.SADELoss``,
    ``losses.BalPoELoss``) make them skilled at different label distributions."""

    def __init__(self, in_features: int, num_classes: int, num_experts: int = 3,
                 expert_weights: list[float] | None = None, eval_offset: list[float] | None = None,
                 own_features: bool = False, scale: float | None = None):
        super().__init__()
        # scale: cosine experts, z_e = s * cos(W_e, x_e) without bias (a text-initialised head, foundation.py).
        self.scale = None if scale is None else float(scale)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"a multi-expert head needs num_experts >= 1 (an integer), got {num_experts!r}")
        self.num_experts, self.own_features = num_experts, bool(own_features)
        self.weight = nn.Parameter(torch.empty(num_experts, num_classes, in_features))  # [E, C, D]
        self.bias = nn.Parameter(torch.empty(num_experts, num_classes))  # [E, C]
        bound = 1 / math.sqrt(in_features)
        for e in range(num_experts):  # each expert initialized as nn.Linear initializes itself
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)
        w = [1 / num_experts] * num_experts if expert_weights is None else check_expert_weights(expert_weights,
                                                                                                 num_experts)
        self.register_buffer("expert_weights", torch.tensor(w, dtype=torch.float32))
        offset = torch.zeros(num_classes) if eval_offset is None else torch.as_tensor(eval_offset, dtype=torch.float32)
        self.register_buffer("eval_offset", offset.reshape(num_classes).clone())

    # Inference that returns the experts' own logits [B, E, C] (``inference.expert_outputs``): what test-time
    # aggregation learns its weights from. A plain attribute, not state: it is never saved with the model.
    emit_experts: bool = False

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] or [E * B, D] (own_features) -> [B, E, C]
        w, b = self.weight, self.bias
        if self.scale is not None:  # cosine experts
            x, w, b = F.normalize(x, dim=-1), self.scale * F.normalize(w, dim=-1), b * 0  # in the graph: DDP
        if self.own_features:
            x = x.view(self.num_experts, -1, x.shape[-1])  # [E, B, D]: expert e's features are its rows
            return torch.einsum("ebd,ecd->bec", x, w) + b
        return torch.einsum("bd,ecd->bec", x, w) + b

    def combine(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:  # z [B, E, C] -> [B, C]
        """The inference logits of expert logits z: sum_e w_e z_e + eval_offset, with w the head's
        ``expert_weights`` or ``weights`` [E] (learned by test-time aggregation)."""
        return aggregated(z, self.expert_weights if weights is None else weights, self.eval_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] -> [B, E, C] (train) or [B, C] (eval)
        z = self.expert_logits(x)
        return z if self.training or self.emit_experts else self.combine(z)


def check_expert_weights(weights, num_experts: int) -> list[float]:
    """Aggregation weights of ``num_experts`` experts: finite, >= 0, not all 0, one per expert (plain floats: the
    check runs before any tensor exists, also where a model is built on the meta device)."""
    w = [float(v) for v in weights] if isinstance(weights, (list, tuple)) else None
    if w is None or len(w) != num_experts or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"expert weights must be {num_experts} finite numbers >= 0, not all 0; got {weights!r}")
    return w


HEADS: Registry[type[nn.Module]] = Registry("classifier head", {
    "linear": nn.Linear, "cosine": CosineClassifier, "cosine_linear": CosineLinear,
    "causal_norm": CausalNormClassifier, "adjusted_linear": AdjustedLinear, "experts": ExpertHeads})


def build_head(kind: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    return HEADS.lookup(kind)(in_features, num_classes, **kwargs)


def check_head_state(kind: str, state: dict) -> None:
    """A stored model must carry what its head needs at inference: a Causal Norm model without its moving-average
    feature direction cannot compute TDE logits (it would silently fall back to the biased ones)."""
    if kind == "causal_norm":
        d = state.get("fc.feature_direction")
        if d is None or not torch.isfinite(d).all() or float(d.norm()) == 0:
            raise ValueError("this Causal Norm model has no saved feature direction (fc.feature_direction is "
                             f"{'missing' if d is None else 'zero or not finite'}): it was not trained as a Causal "
                             f"Norm model, so its TDE logits cannot be computed")


def tau_normalize(logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Decouple's τ-normalized classifier (Kang et al. 2020) from a linear model's stored logits, no features needed.

    The τ-normalized logits are (w_c / |w_c|^tau) . f; since z_c = w_c . f + b_c, they equal (z_c - b_c) / |w_c|^tau:
    a per-class affine map of the stored logits. logits [N, C], weight [C, D], bias [C] or None -> [N, C].
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau-normalization needs a finite tau >= 0, got {tau!r}")
    z = logits if bias is None else logits - bias.to(logits)
    return z / weight.to(logits).norm(dim=1).pow(tau)
