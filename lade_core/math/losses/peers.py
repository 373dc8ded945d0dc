"""The peers of the paper's comparison (Tables 2-6): logit adjustment, Focal loss, LDAM-DRW and Causal Norm.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lade_core.math.checks import check_range
from lade_core.math.losses.base import (
    Loss,
    PriorLike,
    SoftmaxLoss,
    _CastCache,
    _check_logits,
    _source_prior,
)

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
