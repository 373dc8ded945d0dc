"""The training losses: softmax CE and LADE-CE (``base``), LADER and LADE (``lade``, Eq. 15-20), the peers the
paper compares with (``peers``: logit adjustment, Focal loss, LDAM-DRW, Causal Norm) and the multi-expert methods
after it (``experts``: SADE, BalPoE).

All losses follow ``forward(logits, targets) -> scalar``. After each call ``last_terms`` holds the loss's own named
scalar terms (detached), for logging. ``head`` is the classifier head the loss trains (``lade_core.math.heads``), and
``set_epoch(e)`` is called before each training epoch. Which losses exist, their hyperparameters and post-hoc rules
are declared once, outside the math, in ``lade_core.methods``.
"""
from lade_core.math.losses.base import BalancedSoftmaxLoss, Loss, PriorLike, SoftmaxLoss, check_targets
from lade_core.math.losses.experts import EXPERT_EPS, MAX_EXPERT_STAGES, BalPoELoss, SADELoss, inverse_prior
from lade_core.math.losses.lade import ESTIMATORS, LADELoss, LADERLoss, lade_reference
from lade_core.math.losses.peers import CausalNormLoss, FocalLoss, LDAMDRWLoss, LogitAdjustedLoss

__all__ = ["Loss", "PriorLike", "check_targets", "SoftmaxLoss", "BalancedSoftmaxLoss", "LADERLoss", "LADELoss",
           "lade_reference", "ESTIMATORS", "LogitAdjustedLoss", "FocalLoss", "LDAMDRWLoss", "CausalNormLoss",
           "SADELoss", "BalPoELoss", "inverse_prior", "MAX_EXPERT_STAGES", "EXPERT_EPS"]
