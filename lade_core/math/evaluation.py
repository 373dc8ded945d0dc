"""Evaluate stored test logits under any target prior p_t: the shifted protocol (paper Table 6) and user priors.

Pure functions over tensors (torch and numpy only). A target is a subset of the test split (its rows) together
with the prior p_t it realises. Every post-hoc rule is a per-class shift of the logits (``posthoc_offset``), so one
target costs one pass over its rows: shift, max, logsumexp. ``raw`` logits do not depend on the target and are
reduced once for the whole split. No Python loop over samples anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lade_core.math.aggregation import self_supervised_aggregation
from lade_core.math.checks import bad_indices
from lade_core.math.metrics import calibration_bins, ece_from_bins, shot_accuracies
from lade_core.math.posthoc import RULES, TAU_GRID, posthoc_offset
from lade_core.math.priors import (
    KNOCKOUT_PROTOCOL,
    SHIFT_PROTOCOL,
    knockout_counts,
    knockout_name,
    shift_protocol_name,
    shifted_counts,
    subset_with_counts,
    validate_prior,
)

__all__ = ["Target", "protocol_targets", "target_from_values", "evaluate_targets", "METRICS", "logit_statistics",
           "aggregated_rows", "AGGREGATE_MODE", "mean_predicted_prior", "calibration_by_rule", "protocol_mean_top1",
           "TAU_GRID", "select_tau", "tuned_rule_logits", "PROTOCOL_NAMES", "KNOCKOUT_NAMES"]

METRICS: tuple[str, ...] = ("top1", "many", "medium", "few", "nll", "ece")


@dataclass(frozen=True)
class Target:
    """One target distribution: rows of the test split [n] and the prior they realise, float64 [C]."""

    name: str
    indices: np.ndarray
    prior: torch.Tensor


def labels_array(labels) -> np.ndarray:
    """Class labels [N] (a tensor on any device, or a sequence) as int64 numpy."""
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)


def protocol_targets(labels, train_counts, per_class: int | None = None, knockouts: bool = False) -> list[Target]:
    """The 11 shifted target distributions (forward 50 .. uniform .. backward 50) built with ``shifted_subset``;
    with ``knockouts``, then the 6 of ``KNOCKOUT_PROTOCOL`` (head / tail / random 25 % and 50 % of the classes
    without a test image, the others ``per_class`` each).

    ``per_class`` (the head class's count) defaults to the smallest class count of the test split, as in the
    paper's protocol (ImageNet-LT: 50).
    """
    y = labels_array(labels)
    num_classes = len(train_counts)
    available = np.bincount(y, minlength=num_classes)
    if per_class is None:
        if (available == 0).any():
            raise ValueError(f"the test split has no samples of classes {bad_indices(available == 0)}; "
                             "the shifted protocol needs every class")
        per_class = int(available.min())
    wanted = [(shift_protocol_name(d, r), shifted_counts(train_counts, per_class, r, d)) for d, r in SHIFT_PROTOCOL]
    if knockouts:
        wanted += [(knockout_name(k, p), knockout_counts(train_counts, per_class, k, p)) for k, p in KNOCKOUT_PROTOCOL]
    out = []
    for name, counts in wanted:
        counts = np.asarray(counts, dtype=np.int64)
        out.append(Target(name, subset_with_counts(y, counts, f"target prior {name}"),
                          torch.as_tensor(counts / counts.sum(), dtype=torch.float64)))
    return out


def target_from_values(name: str, values, labels, num_classes: int) -> Target:
    """A user target from per-class counts (non-negative integers) or probabilities (summing to 1).

    Counts select the first n_c test samples of each class. Probabilities select the largest subset whose class
    proportions match them (n_c = floor(p_c * s), s as large as the test split allows).
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if v.dim() != 1 or v.numel() != num_classes:
        raise ValueError(f"target prior {name!r} has wrong length: {v.numel()} entries for {num_classes} classes")
    if torch.isnan(v).any() or torch.isinf(v).any():
        raise ValueError(f"target prior {name!r} is NaN or infinite at class indices "
                         f"{bad_indices(~torch.isfinite(v))}")
    if (v < 0).any():
        raise ValueError(f"target prior {name!r} is negative at class indices {bad_indices(v < 0)}")
    y = labels_array(labels)
    available = np.bincount(y, minlength=num_classes).astype(np.float64)
    is_counts = bool((v == v.round()).all()) and abs(float(v.sum()) - 1.0) > 1e-6
    if is_counts:
        counts = v.numpy().astype(np.int64)
        if counts.sum() == 0:
            raise ValueError(f"target prior {name!r}: all counts are zero")
        prior = torch.as_tensor(counts / counts.sum(), dtype=torch.float64)
    else:
        prior = validate_prior(v, num_classes, f"target prior {name!r}")
        p = prior.numpy()
        pos = p > 0
        if (available[pos] == 0).any():
            c = int(np.nonzero(pos & (available == 0))[0][0])
            raise ValueError(f"target prior {name!r} asks for more test samples than exist: class {c} has probability "
                             f"{p[c]:.3g} but the test split has no sample of it")
        scale = float(np.min(available[pos] / p[pos]))
        counts = np.floor(p * scale + 1e-9).astype(np.int64)
    return Target(name, subset_with_counts(y, counts, f"target prior {name!r}"), prior)


def _row_stats(z: torch.Tensor, y: torch.Tensor, offset: torch.Tensor | None):
    """Per-row prediction, confidence (max softmax) and NLL of shift(z) = z + offset; z [n, C] -> three [n]."""
    w = z + offset.to(z.dtype) if offset is not None else z.clone()  # [n, C], the only full-size temporary
    zy = w.gather(1, y[:, None])[:, 0]
    zmax, pred = w.max(dim=1)
    sumexp = w.sub_(zmax[:, None]).exp_().sum(dim=1)  # in place: exp(w - max) in (0, 1]
    lse = zmax + sumexp.log()
    return pred, sumexp.reciprocal(), (lse - zy)


def _metrics(pred, conf, nll_rows, y, train_counts, n_bins: int) -> dict[str, float]:
    acc = shot_accuracies(pred, y, train_counts)
    correct = pred == y
    return {"top1": acc["all"], "many": acc["many"], "medium": acc["medium"], "few": acc["few"],
            "nll": float(nll_rows.double().mean()), "ece": ece_from_bins(calibration_bins(conf, correct, n_bins))}


def evaluate_targets(
    logits: torch.Tensor,
    labels,
    source_prior,
    train_counts,
    rules: tuple[str, ...] | list[str],
    targets: list[Target],
    n_bins: int = 20,
) -> list[dict]:
    """One row per (target, post-hoc rule): {"target", "mode", "n", top1, many, medium, few, nll, ece}.

    logits [N, C] (any float dtype; reductions are accumulated in float64), labels [N].
    """
    z = torch.as_tensor(logits)
    if not z.is_floating_point() or z.dim() != 2:
        raise ValueError(f"logits must be a float tensor [N, C], got {z.dtype} {tuple(z.shape)}")
    y = torch.as_tensor(labels_array(labels))
    num_classes = z.shape[1]
    if y.shape != (z.shape[0],):
        raise ValueError(f"{z.shape[0]} logits rows but {y.numel()} labels")
    validate_prior(source_prior, num_classes, "source_prior")
    if len(train_counts) != num_classes:
        raise ValueError(f"train_counts has wrong length: {len(train_counts)} entries for {num_classes} classes")
    rows, raw = [], None
    for target in targets:
        idx = torch.as_tensor(target.indices)
        yt = y[idx]
        for rule in rules:
            offset = posthoc_offset(rule, source_prior, target.prior, num_classes)
            if offset is None:  # raw: the same per-row statistics for every target, reduced once
                if raw is None:
                    raw = _row_stats(z, y, None)
                stats = tuple(s[idx] for s in raw)
            else:
                stats = _row_stats(z[idx], yt, offset)
            rows.append({"target": target.name, "mode": rule, "n": int(idx.numel()),
                         **_metrics(*stats, yt, train_counts, n_bins)})
    return rows


# --- Test-time aggregation of a multi-expert model (SADE) ------------------------------------------------------

AGGREGATE_MODE = "aggregate"  # the rule name of its rows, beside the post-hoc rules'


def aggregated_rows(expert_views, eval_offset, labels, source_prior, train_counts, targets: list[Target],
                    seed: int = 0, n_bins: int = 20) -> list[dict]:
    """One row per target, as ``evaluate_targets`` with mode ``aggregate``: SADE's test-time self-supervised
    aggregation (``aggregation.learn_expert_weights``) learns the expert weights w [E] from the two augmented views
    of the target's own (unlabeled) images, and scores sum_e w_e z_e + eval_offset on their clean expert logits; no
    prior is injected (SADE's rule). Each row also holds ``weights`` (w as a list) and ``stopped_early``.

    expert_views [N, 3, E, C]: the experts' logits on the clean image, view a and view b (``inference.EXPERT_VIEWS``);
    eval_offset [C]: the head's fixed inference offset (BalPoE's; zero for SADE)."""
    v = torch.as_tensor(expert_views).double()
    y = torch.as_tensor(labels_array(labels))
    rows = []
    for target in targets:
        idx = torch.as_tensor(target.indices)
        logits, info = self_supervised_aggregation(v[idx], eval_offset, seed)
        own = Target(target.name, np.arange(len(idx)), target.prior)  # the target's rows, renumbered
        row = evaluate_targets(logits, y[idx], source_prior, train_counts, ("raw",), [own], n_bins)[0]
        rows.append({**row, "mode": AGGREGATE_MODE, "weights": info["weights"],
                     "stopped_early": info["stopped_early"]})
    return rows


def protocol_mean_top1(logits, labels, source_prior, train_counts, rule: str) -> float:
    """Mean top-1 over the 11 shifted target priors (a label-shift-robust model selection objective).

    NaN when the split lacks a class (the protocol needs every class).
    """
    if (np.bincount(labels_array(labels), minlength=len(train_counts)) == 0).any():
        return float("nan")
    rows = evaluate_targets(logits, labels, source_prior, train_counts, (rule,), protocol_targets(labels, train_counts))
    return float(np.mean([r["top1"] for r in rows]))


# --- Post-hoc rules with a tau chosen on validation: Decouple's τ-norm, Menon's logit adjustment ---------------

def select_tau(val_logits, val_labels, logits_at, grid: tuple[float, ...] = TAU_GRID) -> float:
    """The tau of ``grid`` whose validation logits ``logits_at(z_val, tau)`` have the best top-1 on the (class-
    balanced) validation split, the smallest such tau on ties. Never chosen on the test split. E.g.
    ``logits_at = lambda z, t: heads.tau_normalize(z, w, b, t)`` (τ-norm) or
    ``lambda z, t: posthoc.logit_adjust(z, p_s, uniform, t)`` (post-hoc logit adjustment)."""
    z, y = torch.as_tensor(val_logits).double(), torch.as_tensor(labels_array(val_labels))
    scores = [float((logits_at(z, t).argmax(1) == y).double().mean()) for t in grid]
    return grid[int(np.argmax(scores))]


def tuned_rule_logits(rule: str, logits, val_logits, val_labels, source_prior, classifier=None):
    """(τ, transformed test logits [N, C] float64) of the tuned rule ``RULES[rule]``: τ chosen on the validation
    logits over the rule's grid; the result then takes the rule's offset (``inject``) for any p_t."""
    r = RULES[rule]
    at = lambda z, t: r.transform(z, t, source_prior, classifier)  # noqa: E731
    # On the class-balanced validation split p_t is uniform: the offset is one constant, which no argmax sees.
    tau = select_tau(val_logits, val_labels, at, r.grid)
    return tau, at(torch.as_tensor(logits).double(), tau)


# Table 6's columns: top-1 under each of the 11 shifted target priors (forward 50 .. backward 50); then the
# knock-outs and the mean over all of them.
PROTOCOL_NAMES: tuple[str, ...] = tuple(shift_protocol_name(d, r) for d, r in SHIFT_PROTOCOL)
KNOCKOUT_NAMES: tuple[str, ...] = tuple(knockout_name(k, p) for k, p in KNOCKOUT_PROTOCOL)


# --- Quantities behind the paper's figures -------------------------------------------------------------------

def calibration_by_rule(logits, labels, source_prior, target: Target, rules, n_bins: int = 20) -> dict[str, dict]:
    """Reliability bins (paper Fig. 4) of each post-hoc rule on one target."""
    z, y = torch.as_tensor(logits), torch.as_tensor(labels_array(labels))
    idx = torch.as_tensor(target.indices)
    out = {}
    for rule in rules:
        pred, conf, _ = _row_stats(z[idx], y[idx], posthoc_offset(rule, source_prior, target.prior, z.shape[1]))
        out[rule] = calibration_bins(conf, pred == y[idx], n_bins)
    return out


def mean_predicted_prior(logits, source_prior, target: Target, rule: str) -> torch.Tensor:
    """Average predicted probability of each class over the target's rows, float64 [C] (paper Fig. 2)."""
    z = torch.as_tensor(logits)[torch.as_tensor(target.indices)].double()
    offset = posthoc_offset(rule, source_prior, target.prior, z.shape[1])
    return torch.softmax(z if offset is None else z + offset, dim=1).mean(dim=0)


def logit_statistics(logits, labels) -> dict[str, torch.Tensor]:
    """Per class c: mean and std of the logit z_c over positive samples (y = c) and negatives (y != c) (Fig. 3).

    Returns float64 [C] tensors pos_mean, pos_std, neg_mean, neg_std (NaN where a class has no positives).
    """
    z = torch.as_tensor(logits).double()  # [N, C]
    y = torch.as_tensor(labels_array(labels))
    n, num_classes = z.shape
    zy = z.gather(1, y[:, None])[:, 0]  # [N] positive logit of each sample's own class
    n_pos = torch.bincount(y, minlength=num_classes).double()
    pos_sum = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, zy)
    pos_sq = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, zy * zy)
    n_neg = n - n_pos
    neg_sum, neg_sq = z.sum(0) - pos_sum, (z * z).sum(0) - pos_sq

    def mean_std(s, sq, k):
        mean = s / k
        return mean, (sq / k - mean * mean).clamp(min=0).sqrt()

    pos_mean, pos_std = mean_std(pos_sum, pos_sq, n_pos)
    neg_mean, neg_std = mean_std(neg_sum, neg_sq, n_neg)
    return {"pos_mean": pos_mean, "pos_std": pos_std, "neg_mean": neg_mean, "neg_std": neg_std}
