"""Label distributions: the source prior p_s(y), target priors p_t(y), and the shifted-test protocol.

Every prior is a float64 probability vector of shape [C]. Validation lives here so that every entry point
(losses, post-hoc compensation, evaluation, data preparation) rejects a bad prior with the same message.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch

from lade_core.math.checks import bad_indices, check_labels

__all__ = [
    "prior_from_counts",
    "uniform_prior",
    "validate_prior",
    "long_tailed_counts",
    "shifted_counts",
    "shifted_subset",
    "subset_with_counts",
    "tempered_class_weights",
    "SHIFT_PROTOCOL",
    "shift_protocol_name",
    "KNOCKOUT_PROTOCOL",
    "knockout_name",
    "knockout_counts",
]

Direction = Literal["forward", "backward"]

# The 11 target distributions of the paper's shifted protocol (Table 6): (direction, imbalance ratio).
SHIFT_PROTOCOL: tuple[tuple[str, int], ...] = (
    ("forward", 50), ("forward", 25), ("forward", 10), ("forward", 5), ("forward", 2),
    ("uniform", 1),
    ("backward", 2), ("backward", 5), ("backward", 10), ("backward", 25), ("backward", 50),
)


def shift_protocol_name(direction: str, imbalance_ratio: float) -> str:
    """Stable metric-friendly name of one protocol entry, e.g. ``forward_50`` or ``uniform``."""
    return "uniform" if direction == "uniform" or imbalance_ratio == 1 else f"{direction}_{imbalance_ratio:g}"


# Knock-out targets: a share of the classes has no test image at all (a region without some species, a season
# without some products), the rest uniform: (which classes go, percent of the classes). MAPLS's
# batch_imb_knockout configs; beside the 11 smooth shifts above.
KNOCKOUT_PROTOCOL: tuple[tuple[str, int], ...] = (
    ("head", 25), ("head", 50), ("tail", 25), ("tail", 50), ("random", 25), ("random", 50),
)
KNOCKOUT_SEED = 0  # the random knock-outs: the same classes in every run, so that runs compare


def knockout_name(kind: str, percent: int) -> str:
    """Metric-friendly name of one knock-out target, e.g. ``knockout_tail_50``."""
    return f"knockout_{kind}_{percent}"


def knockout_counts(train_counts: Sequence[int] | np.ndarray | torch.Tensor, per_class: int, kind: str,
                    percent: int) -> list[int]:
    """Per-class test counts of one knock-out target: ``round(percent / 100 * C)`` classes get 0 (``head``: the most
    frequent in training, ``tail``: the least, ties by class index; ``random``: drawn with ``KNOCKOUT_SEED``), every
    other class ``per_class``."""
    n = _as_float64_vector(train_counts, "train_counts")
    if kind not in ("head", "tail", "random"):
        raise ValueError(f"knock-out kind must be 'head', 'tail' or 'random', got {kind!r}")
    if not 0 < percent < 100:
        raise ValueError(f"knock-out percent must be in (0, 100), got {percent}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    num_classes = n.numel()
    k = int(round(percent / 100 * num_classes))
    order = (np.random.default_rng(KNOCKOUT_SEED).permutation(num_classes).tolist() if kind == "random"
             else _ranked_by_train_count(n))
    dropped = set(order[num_classes - k:] if kind == "tail" else order[:k])
    return [0 if c in dropped else int(per_class) for c in range(num_classes)]


def _ranked_by_train_count(n: torch.Tensor) -> list[int]:
    """Class indices, most frequent in training first; a stable sort on -count keeps class-index order among ties."""
    return sorted(range(n.numel()), key=lambda c: (-float(n[c]), c))


def _as_float64_vector(x: Sequence[float] | np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D vector over classes, got shape {tuple(t.shape)}")
    return t


def _indices(mask: torch.Tensor, limit: int = 20) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    more = f" (and {len(idx) - limit} more)" if len(idx) > limit else ""
    return f"{idx[:limit]}{more}"


def prior_from_counts(counts: Sequence[float] | np.ndarray | torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """p(c) = (n_c + smoothing) / sum_k (n_k + smoothing), float64 [C].

    A class with zero count makes log p(c) = -inf in every loss and post-hoc rule, so it is an error unless
    ``smoothing > 0`` says how to handle it.
    """
    n = _as_float64_vector(counts, "counts")
    if n.numel() == 0:
        raise ValueError("counts is empty: need at least one class")
    if not math.isfinite(smoothing) or smoothing < 0:
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing}")
    bad = ~torch.isfinite(n)
    if bad.any():
        raise ValueError(f"counts are NaN or infinite for class indices {_indices(bad)}")
    neg = n < 0
    if neg.any():
        raise ValueError(f"counts are negative for class indices {_indices(neg)}")
    if n.sum() + smoothing * n.numel() <= 0:
        raise ValueError("counts sum to zero: no samples at all")
    zero = n == 0
    if smoothing == 0 and zero.any():
        raise ValueError(
            f"classes with zero samples: class indices {_indices(zero)}; every class needs at least one "
            "training sample (or pass smoothing > 0)"
        )
    n = n + smoothing
    return n / n.sum()


def uniform_prior(num_classes: int) -> torch.Tensor:
    """The uniform label distribution 1/C, float64 [C]."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)


def validate_prior(p: Sequence[float] | np.ndarray | torch.Tensor, num_classes: int,
                   name: str = "prior") -> torch.Tensor:
    """Check that ``p`` is a probability vector over ``num_classes`` classes; return it as float64 [C]."""
    t = _as_float64_vector(p, name)
    if t.numel() != num_classes:
        raise ValueError(f"{name} has wrong length: {t.numel()} entries for {num_classes} classes")
    nan = torch.isnan(t)
    if nan.any():
        raise ValueError(f"{name} is NaN at class indices {_indices(nan)}")
    inf = torch.isinf(t)
    if inf.any():
        raise ValueError(f"{name} is infinite at class indices {_indices(inf)}")
    neg = t < 0
    if neg.any():
        raise ValueError(f"{name} is negative at class indices {_indices(neg)}")
    total = float(t.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} does not sum to 1 (sum = {total:.8g}); normalize it or pass counts")
    return t


def long_tailed_counts(num_classes: int, max_count: int, imbalance_ratio: float) -> list[int]:
    """Exponential long-tail profile: class k keeps int(max_count * (1/ratio) ** (k/(C-1))) samples."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [int(max_count)]
    return [int(max_count * (1.0 / imbalance_ratio) ** (k / (num_classes - 1))) for k in range(num_classes)]


def shifted_counts(
    train_counts: Sequence[int] | np.ndarray | torch.Tensor,
    per_class: int,
    imbalance_ratio: float,
    direction: Direction | str,
) -> list[int]:
    """Per-class test counts of one shifted target distribution (paper Table 6).

    Classes are ranked by training count, most frequent first, ties broken by class index. ``forward`` keeps the
    source's order (head classes stay frequent), ``backward`` reverses it (head classes become rare).
    """
    n = _as_float64_vector(train_counts, "train_counts")
    if direction not in ("forward", "backward", "uniform"):
        raise ValueError(f"direction must be 'forward', 'backward' or 'uniform', got {direction!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    num_classes = n.numel()
    if direction == "uniform" or imbalance_ratio == 1:
        return [int(per_class)] * num_classes
    profile = long_tailed_counts(num_classes, per_class, imbalance_ratio)  # by rank
    ranked = _ranked_by_train_count(n)
    out = [0] * num_classes
    for rank, c in enumerate(ranked):
        out[c] = profile[rank] if direction == "forward" else profile[num_classes - 1 - rank]
    return out


def shifted_subset(
    test_labels: Sequence[int] | np.ndarray | torch.Tensor,
    train_counts: Sequence[int] | np.ndarray | torch.Tensor,
    per_class: int,
    imbalance_ratio: float,
    direction: Direction | str,
) -> np.ndarray:
    """Indices into the test set for one shifted target distribution.

    Keeps the first n_c test samples of each class in dataset order, as the published protocol lists do, so the
    subset is deterministic. Returns sorted int64 indices.
    """
    wanted = shifted_counts(train_counts, per_class, imbalance_ratio, direction)
    return subset_with_counts(test_labels, wanted, f"target prior {direction} {imbalance_ratio:g}")


def subset_with_counts(
    test_labels: Sequence[int] | np.ndarray | torch.Tensor, wanted: Sequence[int] | np.ndarray,
                       what: str = "target prior"
) -> np.ndarray:
    """Sorted int64 indices of the first ``wanted[c]`` test samples of each class c, in dataset order."""
    labels = np.asarray(test_labels.cpu() if isinstance(test_labels, torch.Tensor) else test_labels, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    num_classes = wanted.size
    check_labels(labels, num_classes, "test labels")
    if (wanted < 0).any():
        raise ValueError(f"{what}: negative counts at class indices {bad_indices(wanted < 0)}")
    available = np.bincount(labels, minlength=num_classes)
    short = np.nonzero(available < wanted)[0]
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"{what} asks for more test samples than exist: class {c} needs "
            f"{wanted[c]} but the test split has {available[c]} (classes short: {short[:20].tolist()})"
        )
    # Rank of each sample within its class in dataset order, without a Python loop over samples.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(available)[:-1]])
    rank_in_class = np.empty_like(order)
    rank_in_class[order] = np.arange(labels.size) - np.repeat(starts, available)
    return np.nonzero(rank_in_class < wanted[labels])[0].astype(np.int64)


def tempered_class_weights(source_prior: Sequence[float] | np.ndarray | torch.Tensor, power: float) -> torch.Tensor:
    """LADER class weights alpha_c = p_s(c)^power / sum_k p_s(k)^power, float64 [C].

    power = 1 is the paper's alpha_c = p_s(c); power = 0 weighs every class equally (1/C); in between interpolates.
    """
    if not (isinstance(power, (int, float)) and 0 <= power <= 1):
        raise ValueError(f"class_weight_power must lie in [0, 1], got {power!r}")
    p = validate_prior(source_prior, len(source_prior), "source_prior")
    w = p.pow(float(power))
    return w / w.sum()
