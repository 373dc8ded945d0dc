"""The paper's diagnostic figures as PNG files (matplotlib, no display needed).

Each function takes quantities computed by lade_core.math.evaluation and writes one file; it returns the path.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lade_core.math.metrics import ece_from_bins  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(bins_by_rule: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Paper Fig. 4: per-bin accuracy against confidence, one panel per post-hoc rule, with the ECE."""
    fig, axes = plt.subplots(1, len(bins_by_rule), figsize=(4.2 * len(bins_by_rule), 4), squeeze=False)
    for ax, (rule, b) in zip(axes[0], bins_by_rule.items()):
        lower, width = b["lower"].numpy(), float(b["upper"][0] - b["lower"][0])
        filled = b["count"].numpy() > 0
        acc, conf = b["accuracy"].numpy(), b["confidence"].numpy()
        ax.bar(lower[filled], acc[filled], width=width, align="edge", color="tab:blue", edgecolor="k", label="accuracy")
        ax.bar(lower[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, align="edge",
               color="tab:red", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{rule}  ECE {ece_from_bins(b):.3f}")
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def predicted_prior_figure(mean_prob_by_rule: dict[str, torch.Tensor], source_prior, target_prior,
                           path: str | Path, title: str = "") -> Path:
    """Paper Fig. 2: average predicted probability per class against p_s and p_t, classes by training frequency."""
    ps = np.asarray(source_prior, dtype=np.float64)
    order = np.argsort(-ps, kind="stable")
    x = np.arange(ps.size)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, ps[order], "k-", lw=2, label="source prior p_s")
    ax.plot(x, np.asarray(target_prior, dtype=np.float64)[order], "k--", lw=2, label="target prior p_t")
    for rule, p in mean_prob_by_rule.items():
        ax.plot(x, p.numpy()[order], marker=".", lw=1, label=f"mean predicted ({rule})")
    ax.set(xlabel="class (sorted by training frequency)", ylabel="probability",
           title=title or "predicted label distribution")
    ax.legend()
    return _save(fig, path)


def logit_figure(stats: dict[str, torch.Tensor], source_prior, path: str | Path, title: str = "") -> Path:
    """Paper Fig. 3: per-class mean ± std of positive and negative logits, with the log C reference line."""
    ps = np.asarray(source_prior, dtype=np.float64)
    order = np.argsort(-ps, kind="stable")
    x = np.arange(ps.size)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, color in (("pos", "tab:green"), ("neg", "tab:purple")):
        mean, std = stats[f"{kind}_mean"].numpy()[order], stats[f"{kind}_std"].numpy()[order]
        ax.plot(x, mean, color=color, lw=1.5, label="positive samples" if kind == "pos" else "negative samples")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25)
    ax.axhline(math.log(ps.size), color="k", ls="--", lw=1, label="log C")
    ax.set(xlabel="class (sorted by training frequency)", ylabel="logit", title=title or "logits by class")
    ax.legend()
    return _save(fig, path)


def shift_curve(rows: list[dict], target_names: list[str], path: str | Path, title: str = "") -> Path:
    """Top-1 accuracy across the shifted protocol (forward 50 .. backward 50), one line per post-hoc rule, with a
    band of ± its ``std`` where rows have one (a mean over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for rule in dict.fromkeys(r["mode"] for r in rows):
        by_target = {r["target"]: r for r in rows if r["mode"] == rule}
        mean = np.array([by_target[t]["top1"] if t in by_target else np.nan for t in target_names])
        (line,) = ax.plot(range(len(target_names)), mean, marker="o", label=rule)
        std = np.array([by_target[t].get("std", 0.0) if t in by_target else 0.0 for t in target_names])
        if std.any():  # a group of seeds: its mean ± std band
            ax.fill_between(range(len(target_names)), mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xticks(range(len(target_names)), target_names, rotation=45, ha="right")
    ax.set(ylabel="top-1 accuracy", title=title or "accuracy under label shift")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def run_figures(run, targets: list, rows: list[dict], out: Path) -> list[Path]:
    """A run's evaluation figures (``tracking.artifacts.RunLogits``, its ``evaluation_targets`` and their rows):
    reliability and predicted prior under the uniform target per post-hoc rule, logit statistics, top-1 across the
    shifted protocol."""
    from lade_core.math.evaluation import PROTOCOL_NAMES, calibration_by_rule, logit_statistics, mean_predicted_prior
    from lade_core.methods import posthoc_rules

    rules = posthoc_rules(run.loss)
    uniform = next(t for t in targets if t.name == "uniform")
    title = f"{run.run_name} ({run.loss})"
    protocol = list(PROTOCOL_NAMES)
    return [
        reliability_diagram(calibration_by_rule(run.logits, run.labels, run.source_prior, uniform, rules),
                            out / "reliability.png", f"{title}, uniform target"),
        predicted_prior_figure({m: mean_predicted_prior(run.logits, run.source_prior, uniform, m) for m in rules},
                               run.source_prior, uniform.prior, out / "predicted_prior.png", title),
        logit_figure(logit_statistics(run.logits, run.labels), run.source_prior, out / "logits.png", title),
        shift_curve([r for r in rows if r["target"] in protocol], protocol, out / "accuracy_vs_shift.png", title),
    ]
