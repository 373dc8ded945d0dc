"""The online prior on a drifting stream: accuracy with ``OnlinePrior``'s estimate against the true prior and uniform.

The stream's label mix moves from the source prior (long-tailed, imbalance 100) to backward 50 (paper Table 6: the
tail is now the head) and back. Images are class-conditional Gaussians whose source posteriors p_s(y|x) are exact
(calibrated by construction, as BCTS makes a model's), so what is measured is the estimator, not a model's
calibration. Each batch is answered with the estimate held *before* it (as a served request is), uniform until the
estimate is trusted, then added to it. Per window of images: top-1 with the true p_t (the Bayes rule for the
mix: the ceiling), with the online estimate, with uniform, and online / true.

  python bench/online_prior.py [--window 500] [--plot bench/online_prior.png] [--smoke-test]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lade_core.math.label_shift import OnlinePrior
from lade_core.math.priors import long_tailed_counts, prior_from_counts, shifted_counts

C, DIM = 10, 16


def stream(prior: torch.Tensor, n: int, source_prior: torch.Tensor, g: torch.Generator, scale: float):
    mu = scale * torch.randn(C, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.multinomial(prior, n, replacement=True, generator=g)
    x = mu[y] + torch.randn(n, DIM, generator=g, dtype=torch.float64)
    log_lik = -0.5 * ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    return y, torch.softmax(log_lik + source_prior.log(), 1)  # exact p_s(y|x) [n, C]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=500, help="OnlinePrior's window (images)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="images per request")
    ap.add_argument("--phase", type=int, default=8000, help="images per phase")
    ap.add_argument("--report", type=int, default=500, help="images per reported window")
    ap.add_argument("--scale", type=float, default=0.5, help="class-mean spread (sets the task's difficulty)")
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed")
    ap.add_argument("--plot", help="write the accuracy-per-window figure here")
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    if args.smoke_test:
        args.phase, args.report = 1000, 500
    counts = long_tailed_counts(C, 1000, 100)
    ps = prior_from_counts(counts)
    backward = prior_from_counts(shifted_counts(counts, 1000, 50, "backward"))
    phases = [("source", ps), ("backward_50", backward), ("source", ps)]
    g = torch.Generator().manual_seed(args.seed)
    online = OnlinePrior(ps, window=args.window, warmup=args.warmup)
    rows, seen, detected, phase_rows = [], 0, [], []
    for name, prior in phases:
        y, post = stream(prior, args.phase, ps, g, args.scale)
        hits = {"true": [], "online": [], "uniform": []}
        for yb, pb in zip(y.split(args.batch), post.split(args.batch)):
            q = online.prior if online.trusted else torch.full((C,), 1 / C, dtype=torch.float64)
            for key, target in (("true", prior), ("online", q), ("uniform", torch.full((C,), 1 / C))):
                hits[key].append((pb * (target / ps)).argmax(1) == yb)
            before = online.changes
            online.update(pb)
            if online.changes > before:
                detected.append(online.seen)
        flat = {k: torch.cat(v) for k, v in hits.items()}
        rest = {k: float(v[args.report:].double().mean()) for k, v in flat.items()}
        first = {k: float(v[:args.report].double().mean()) for k, v in flat.items()}
        phase_rows.append((name, rest["online"] / rest["true"], first["online"] - first["uniform"]))
        for start in range(0, args.phase, args.report):
            acc = {k: float(v[start:start + args.report].double().mean()) for k, v in flat.items()}
            rows.append({"phase": name, "images": f"{seen + start}-{seen + start + args.report}", **acc,
                         "online/true": acc["online"] / acc["true"], "online-uniform": acc["online"] - acc["uniform"]})
        seen += args.phase
    print(f"window {args.window}, warm-up {args.warmup}, batches of {args.batch}, {args.report} images per row")
    print("| phase | images | top-1 true p_t | top-1 online | top-1 uniform | online / true | online − uniform |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['images']} | {r['true']:.4f} | {r['online']:.4f} | {r['uniform']:.4f} | "
              f"{r['online/true']:.3f} | {r['online-uniform']:+.4f} |")
    first = {i for i in range(len(rows)) if i % (args.phase // args.report) == 0}  # each phase's first window
    settled = [r["online/true"] for i, r in enumerate(rows) if i not in first]
    print(f"online / true after each phase's first window: min {min(settled):.3f}, "
          f"mean {sum(settled) / len(settled):.3f}")
    for name, ratio, gap in phase_rows:
        print(f"phase {name}: online / true over the phase after its first window {ratio:.3f}; "
              f"online - uniform in its first window {gap:+.4f}")
    print(f"changes of mix detected after image {detected} (the mix changed at {[args.phase, 2 * args.phase]})")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        xs = range(len(rows))
        for key in ("true", "online", "uniform"):
            ax.plot(xs, [r[key] for r in rows], marker="o", ms=3, label=key)
        ax.set_xticks(list(xs)[::2], [r["images"].split("-")[0] for r in rows][::2], rotation=45, fontsize=7)
        ax.set_xlabel("images into the stream (phases: source, backward 50, source)")
        ax.set_ylabel("top-1")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.plot), dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
