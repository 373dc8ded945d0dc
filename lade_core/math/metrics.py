"""Evaluation metrics: top-1 by shot group (Many / Medium / Few), calibration (ECE, reliability), NLL, Brier."""
from __future__ import annotations

import numpy as np
import torch

from lade_core.math.checks import check_labels

__all__ = ["shot_accuracies", "expected_calibration_error", "reliability_bins", "calibration_bins", "ece_from_bins",
           "nll", "brier", "shot_groups"]


def _long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)).long().flatten()


def shot_groups(train_counts, many: int = 100, few: int = 20) -> dict[str, torch.Tensor]:
    """Boolean masks [C] of the Many (> many), Few (< few) and Medium (otherwise) classes."""
    n = torch.as_tensor(np.asarray(train_counts, dtype=np.float64))
    return {"many": n > many, "medium": (n <= many) & (n >= few), "few": n < few}


def shot_accuracies(predictions, labels, train_counts, many: int = 100, few: int = 20) -> dict[str, float]:
    """Top-1 overall ("all") and the mean per-class accuracy of each shot group.

    Only classes present in ``labels`` count toward a group; an empty group is NaN.
    """
    pred, y = _long(predictions), _long(labels)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(y.shape)} differ in shape")
    if y.numel() == 0:
        raise ValueError("no samples to evaluate")
    groups = shot_groups(train_counts, many, few)
    num_classes = groups["many"].numel()
    check_labels(y, num_classes)
    total = torch.bincount(y, minlength=num_classes).double()  # [C]
    correct = torch.bincount(y[pred == y], minlength=num_classes).double()  # [C]
    present = total > 0
    per_class = correct / total.clamp(min=1)
    out = {"all": float((pred == y).double().mean())}
    for name, mask in groups.items():
        m = mask & present
        out[name] = float(per_class[m].mean()) if m.any() else float("nan")
    return out


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 20) -> dict[str, torch.Tensor]:
    """Per-bin mean confidence, accuracy and count over equal-width bins (lo, hi] of the confidence [N]."""
    conf = torch.as_tensor(confidence).double().flatten()
    hit = torch.as_tensor(correct).double().flatten().to(conf.device)
    upper = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)[1:]
    idx = torch.bucketize(conf, upper, right=False).clamp_(max=n_bins - 1)  # bin b holds (b/n, (b+1)/n]
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=hit, minlength=n_bins)
    denom = count.clamp(min=1)
    return {
        "lower": upper - 1.0 / n_bins,
        "upper": upper,
        "confidence": conf_sum / denom,
        "accuracy": acc_sum / denom,
        "count": count,
    }


def ece_from_bins(bins: dict[str, torch.Tensor]) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b|."""
    n = bins["count"].sum()
    return float((bins["count"] / n * (bins["accuracy"] - bins["confidence"]).abs()).sum())


def reliability_bins(probs: torch.Tensor, labels, n_bins: int = 20) -> dict[str, torch.Tensor]:
    """``calibration_bins`` of the max probability of ``probs`` [N, C] and whether its argmax is the label."""
    p = torch.as_tensor(probs).double()
    conf, pred = p.max(dim=1)  # [N]
    return calibration_bins(conf, pred == _long(labels).to(pred.device), n_bins)


def expected_calibration_error(probs: torch.Tensor, labels, n_bins: int = 20) -> float:
    """ECE over equal-width bins (lo, hi] of the max probability of ``probs`` [N, C]."""
    return ece_from_bins(reliability_bins(probs, labels, n_bins))


def nll(logits: torch.Tensor, labels) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), computed from logits for stability."""
    z = torch.as_tensor(logits).double()
    return float(torch.nn.functional.cross_entropy(z, _long(labels).to(z.device)))


def brier(probs: torch.Tensor, labels) -> float:
    """Mean over samples of sum_c (p_c - [c = y])^2."""
    p = torch.as_tensor(probs).double()
    y = _long(labels).to(p.device)
    sq = (p * p).sum(dim=1) - 2 * p.gather(1, y[:, None])[:, 0] + 1
    return float(sq.mean())
