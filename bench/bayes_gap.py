"""How close each method gets to the Bayes-optimal classifier under every target prior of the shifted protocol.

Gaussian class-conditionals (C=50, d=8, means ~ N(0, I), sigma=1), long-tailed training counts
long_tailed_counts(50, 500, 100), a uniform test pool of 400/class. Each loss of the registry trains its classifier
head on the raw features (a linear layer for most: the Bayes rule here is linear; LDAM-DRW's cosine classifier;
Causal Norm's 2-head normalized classifier with TDE at inference); each of the 11 shifted test sets (shifted_subset)
is scored with the loss's own post-hoc rule as accuracy / Bayes accuracy, where Bayes = argmax of the true
log-likelihood + log p_t. Softmax also appears raw and as Decouple's τ-normalized classifier (τ chosen on the
validation sample) with log p_t injected.

A second table: what not knowing p_t costs. Each shifted test set's prior is estimated from its own unlabeled
logits (EM on the raw posteriors, and EM on posteriors BCTS-calibrated on a class-balanced validation sample of
--val-per-class images; lade_core.math.label_shift), and top-1 with the estimate is shown as a fraction of top-1 with
the true prior, beside the uniform prior's fraction.

Run: python bench/bayes_gap.py [--smoke-test] [--val-per-class 20]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from lade_core.math.evaluation import Target, select_tau
from lade_core.math.heads import build_head, tau_normalize
from lade_core.math.posthoc import inject_prior, posthoc_logits
from lade_core.math.priors import (
    SHIFT_PROTOCOL,
    long_tailed_counts,
    prior_from_counts,
    shift_protocol_name,
    shifted_subset,
)
from lade_core.methods import LOSSES, build_loss, default_rule
from lade_core.report.protocol import estimated_prior_rows

C, D, PER_CLASS_TEST = 50, 8, 400


def sample(means: torch.Tensor, counts: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return means[y] + torch.randn(len(y), means.shape[1], generator=g, dtype=torch.float64), y


def train_head(x, y, loss_fn, epochs: int, seed: int) -> torch.nn.Module:
    """The loss's classifier head on the features, trained with Adam; returned in eval mode (inference logits)."""
    torch.manual_seed(seed)
    kind, kwargs = loss_fn.head
    model = build_head(kind, D, C, **kwargs).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        loss_fn.set_epoch(epoch)
        model.train()
        for idx in torch.randperm(len(y)).split(256):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-per-class", type=int, default=20)
    args = ap.parse_args()
    epochs = 3 if args.smoke_test else 40
    g = torch.Generator().manual_seed(args.seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64)
    train_counts = long_tailed_counts(C, 500, 100)
    p_s = prior_from_counts(train_counts)
    x_tr, y_tr = sample(means, train_counts, g)
    x_te, y_te = sample(means, [PER_CLASS_TEST] * C, g)
    perm = torch.randperm(len(y_te), generator=g)  # dataset order for "first n_c per class"
    x_te, y_te = x_te[perm], y_te[perm]
    x_val, y_val = sample(means, [args.val_per_class] * C, g)

    # Each loss with its paper's hyperparameters (LADE: the synthetic recipe's alpha; DRW over the last 20 %).
    settings = {"lade": {"alpha": 0.1, "lam": 0.1}, "ldam_drw": {"drw_epoch": int(0.8 * epochs)}}
    losses = {k: build_loss(k, p_s, train_counts=train_counts, **settings.get(k, {})) for k in LOSSES}
    models = {k: train_head(x_tr, y_tr, fn, epochs, args.seed) for k, fn in losses.items()}
    with torch.no_grad():
        logits = {k: m(x_te) for k, m in models.items()}
        val_logits = {k: m(x_val) for k, m in models.items()}
        # True class-conditional log-likelihood up to a constant shared by all classes: -||x - mu_c||^2 / 2.
        loglik = -0.5 * torch.cdist(x_te, means) ** 2
    fc = models["softmax"]
    tau = select_tau(val_logits["softmax"], y_val, lambda z,
                     t: tau_normalize(z, fc.weight.detach(), fc.bias.detach(), t))
    tau_norm = tau_normalize(logits["softmax"], fc.weight.detach(), fc.bias.detach(), tau)

    methods = {"softmax raw": lambda pt, idx: logits["softmax"][idx],
               f"softmax τ-norm {tau:g}": lambda pt, idx: inject_prior(tau_norm[idx], pt)}
    for k in LOSSES:  # each loss with its own post-hoc rule (softmax / focal: PC; the others: injection)
        methods[f"{k} {default_rule(k)}"] = (lambda k: lambda pt, idx: posthoc_logits(
            logits[k][idx], default_rule(k), p_s, pt))(k)
    print(f"C={C} d={D} train={len(y_tr)} (imbalance 100) test pool={len(y_te)}; accuracy / Bayes accuracy")
    print(f"{'target prior':>13} {'n':>6} {'Bayes':>6} " + " ".join(f"{m:>22}" for m in methods))
    rows, targets = [], []
    for direction, ratio in SHIFT_PROTOCOL:
        idx = torch.as_tensor(shifted_subset(y_te, train_counts, PER_CLASS_TEST, ratio, direction))
        p_t = prior_from_counts(torch.bincount(y_te[idx], minlength=C), smoothing=0)
        y = y_te[idx]
        targets.append(Target(shift_protocol_name(direction, ratio), idx.numpy(), p_t))
        bayes = (inject_prior(loglik[idx], p_t).argmax(1) == y).double().mean().item()
        fracs = [((fn(p_t, idx).argmax(1) == y).double().mean().item()) / bayes for fn in methods.values()]
        rows.append(fracs)
        name = shift_protocol_name(direction, ratio)
        print(f"{name:>13} {len(idx):>6} {bayes:>6.3f} " + " ".join(f"{f:>22.3f}" for f in fracs))
    mean = np.mean(rows, axis=0)
    print(f"{'mean':>13} {'':>6} {'':>6} " + " ".join(f"{f:>22.3f}" for f in mean))

    print(f"\nEstimated p_t: top-1 with the EM estimate / with the true p_t (raw posteriors; BCTS on "
          f"{args.val_per_class}/class validation), uniform p_t / true p_t")
    cal = {"EM": None, "EM+BCTS": "bcts"}
    est = {(k, c): estimated_prior_rows(logits[k], y_te, p_s, k, targets, "em", val_logits[k], y_val, v)
           for k in ("softmax", "lade") for c, v in cal.items()}
    heads = [f"{name} {h}" for name in ("PC", "LADE") for h in (*cal, "unif")]
    print(f"{'target prior':>13} {'n':>6} " + " ".join(f"{h:>12}" for h in heads))
    for i, t in enumerate(targets):
        cells = [v for k in ("softmax", "lade") for v in (
            *(est[k, c][i]["ratio"] for c in cal), est[k, "EM"][i]["top1_uniform"] / est[k, "EM"][i]["top1_true"])]
        print(f"{t.name:>13} {len(t.indices):>6} " + " ".join(f"{v:>12.3f}" for v in cells))


if __name__ == "__main__":
    main()
