"""A stored run evaluated as lade reports it: the targets (the shifted protocol, the knock-outs and the user's
prior files), the rows of Table 6 per post-hoc rule, and what estimating p_t costs on each target.

The math is ``lade_core.math.evaluation`` (tensors in, numbers out). This module adds what the math tier must not
know: which rules fit a loss (``lade_core.methods``), the files a user names on the command line, and the names
that become MLflow metric keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lade_core.data.prior_files import read_prior_file
from lade_core.math.evaluation import (
    KNOCKOUT_NAMES,
    PROTOCOL_NAMES,
    Target,
    aggregated_rows,
    evaluate_targets,
    labels_array,
    protocol_targets,
    target_from_values,
    tuned_rule_logits,
)
from lade_core.math.label_shift import estimate_target_prior, resolve_calibration, source_logits
from lade_core.math.posthoc import posthoc_offset
from lade_core.methods import default_rule, posthoc_rules, tuned_rules

__all__ = ["evaluation_targets", "rule_rows", "ESTIMATE_COLUMNS", "estimated_prior_rows"]


def evaluation_targets(labels, train_counts, prior_files: list[str] = (), per_class: int | None = None,
                       flag: str = "--target-prior") -> list[Target]:
    """The 11 targets of the shifted protocol and the 6 knock-outs, then one per target-prior file (named by its
    file's stem, which names the target in the stored metric keys ``shift/<target>/...``: MLflow allows only these
    characters there)."""
    targets = protocol_targets(labels, train_counts, per_class, knockouts=True)
    for f in prior_files:
        name = Path(f).stem
        if not re.fullmatch(r"[\w.\- ]+", name):
            raise ValueError(f"{flag} {f}: its file name {name!r} names the target in the metric keys, "
                             "which allow only letters, digits, '_', '-', '.' and spaces; rename the file")
        targets.append(target_from_values(name, read_prior_file(f), labels, len(train_counts)))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique; got {names} (rename a {flag} file)")
    return targets


def rule_rows(run, estimate: tuple[str, ...] | list[str] = (), aggregate_experts: bool = False) -> list[dict]:
    """The rows of Table 6 for one run (``artifacts.RunLogits``), one per post-hoc rule that fits its loss: its own
    first, then the rules tuned on validation (``methods.tuned_rules``: post-hoc logit adjustment, and τ-norm where
    the linear classifier is stored), each labelled with its τ. With ``estimate`` (``label_shift`` methods), per
    method the top-1 with p_t estimated from each target's own logits over the top-1 with the true p_t, on the run's
    own rule: mean and min over the 17 targets (the knock-outs included), and a row of that estimated-prior top-1
    per target.
    ``aggregate_experts``: a row of SADE's test-time aggregation (``aggregated_rows``; the run's ``expert_views``)."""
    targets = protocol_targets(run.labels, run.train_counts, knockouts=True)
    rules = [(rule, rule, run.logits) for rule in posthoc_rules(run.loss)]
    if run.val_logits is not None:
        for name in tuned_rules(run.loss, run.classifier is not None):
            tau, logits = tuned_rule_logits(name, run.logits, run.val_logits.double(), run.val_labels,
                                            run.source_prior, run.classifier)
            rules.append((f"{name} (τ={tau:g})", name, logits))
    name = f"{run.run_name} ({run.run_id[:8]})"

    def table_row(label: str, rows: list[dict]) -> dict:
        by_target = {r["target"]: r for r in rows}
        u, top1 = by_target.get("uniform", {}), {p: by_target[p]["top1"] for p in PROTOCOL_NAMES + KNOCKOUT_NAMES}
        return {"run": name, "loss": run.loss, "posthoc": label, **top1, "mean": float(np.mean(list(top1.values()))),
                **{k: u.get(k, float("nan")) for k in ("many", "medium", "few", "ece")}}

    out = [table_row(label, evaluate_targets(logits, run.labels, run.source_prior, run.train_counts, (rule,),
                                             targets))
           for label, rule, logits in rules]
    for method in estimate:
        est = estimated_prior_rows(run.logits, run.labels, run.source_prior, run.loss, targets, method,
                                   run.val_logits, run.val_labels)
        ratios = [r["ratio"] for r in est]
        out[0].update({f"{method}/true mean": float(sum(ratios) / len(ratios)), f"{method}/true min": min(ratios)})
        out.append(table_row(f"{rules[0][0]} ({method} estimate)",
                             [{"target": r["target"], "top1": r["top1_estimated"]} for r in est]))
    if aggregate_experts:
        if run.expert_views is None:
            raise ValueError(f"{name}: test-time aggregation needs the run's expert views (a multi-expert model: "
                             f"--loss sade or balpoe); loss {run.loss} stored none")
        ev = run.expert_views
        out.append(table_row("aggregate (self-supervised)", aggregated_rows(
            ev.logits, ev.eval_offset, run.labels, run.source_prior, run.train_counts, targets)))
    return out


ESTIMATE_COLUMNS: tuple[str, ...] = ("top1_true", "top1_estimated", "top1_uniform", "ratio", "tv", "kl")


def estimated_prior_rows(logits, labels, source_prior, loss: str, targets: list[Target], method: str = "em",
                         val_logits=None, val_labels=None, calibration: str | None = "auto") -> list[dict]:
    """Per target: top-1 under its true prior, under the prior estimated from its own (unlabeled) logits, and under
    the uniform prior, with the loss's post-hoc rule; ``ratio`` = estimated / true top-1; the estimation error as
    total variation and KL(true || estimate). ``calibration``: as for ``estimate_target_prior``, fitted once."""
    z = torch.as_tensor(logits).double()
    y = torch.as_tensor(labels_array(labels))
    num_classes, rule = z.shape[1], default_rule(loss)
    z_val = source_logits(val_logits, source_prior, loss) if val_logits is not None else None
    calibration = resolve_calibration(calibration, z_val, val_labels, source_prior)  # fitted once, for every target

    def top1(zt, yt, prior) -> float:
        return float(((zt + posthoc_offset(rule, source_prior, prior, num_classes)).argmax(1) == yt).double().mean())

    rows = []
    for t in targets:
        idx = torch.as_tensor(t.indices)
        zt, yt = z[idx], y[idx]
        est, _ = estimate_target_prior(zt, source_prior, loss=loss, method=method, calibration=calibration,
                                       val_logits=val_logits, val_labels=val_labels)
        true, with_est = top1(zt, yt, t.prior), top1(zt, yt, est)
        pos = t.prior > 0
        rows.append({"target": t.name, "n": int(idx.numel()), "calibrated": calibration is not None,
                     "top1_true": true, "top1_estimated": with_est,
                     "top1_uniform": top1(zt, yt, torch.full((num_classes,), 1 / num_classes, dtype=torch.float64)),
                     "ratio": with_est / true if true > 0 else float("nan"),
                     "tv": 0.5 * float((est - t.prior).abs().sum()),
                     "kl": float((t.prior[pos] * (t.prior[pos] / est[pos].clamp_min(1e-300)).log()).sum())})
    return rows


