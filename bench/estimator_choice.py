"""Which target-prior estimator to trust, and whether ``auto`` picks it: EM, MAPLS, the Dirichlet MAP and ``auto``
(the one of the three with the best 5-fold held-out likelihood) over a grid of classes, images per class, model
strength and target kind.

Exact source posteriors (a signal ``snr`` on the true class's coordinate in N(0, I) noise; p_s long-tailed,
imbalance 50), so the estimators alone are measured. Targets: a Dirichlet(5) draw near uniform, the source order
reversed at imbalance 10 (``backward10``), and half the classes knocked out (tail and random, ``knockout_counts``).
Per cell: total variation to the true prior of each estimator and which one ``auto`` chose; at the end each
estimator's regret (its TV minus the best of the three) averaged over the grid.

  python bench/estimator_choice.py [--classes 10 100] [--per-class 1 3 10 40] [--snr 2 3.5]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from lade_core.math.label_shift import LABEL_FREE, estimate_target_prior
from lade_core.math.priors import knockout_counts, long_tailed_counts, prior_from_counts

TARGETS = ("dir5", "backward10", "knockout_tail50", "knockout_random50")


def target_prior(kind: str, counts: list[int]) -> torch.Tensor:
    c = len(counts)
    if kind == "dir5":
        return torch.distributions.Dirichlet(torch.full((c,), 5.0, dtype=torch.float64)).sample()
    if kind == "backward10":
        return prior_from_counts(long_tailed_counts(c, 500, 10)).flip(0)
    kc = torch.tensor(knockout_counts(counts, 10, kind.split("_")[1].rstrip("0123456789"), 50), dtype=torch.float64)
    return kc / kc.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--per-class", type=int, nargs="+", default=[1, 3, 10, 40], help="target images per class")
    ap.add_argument("--snr", type=float, nargs="+", default=[2.0, 3.5])
    args = ap.parse_args()
    torch.manual_seed(0)  # the Dirichlet draws
    methods = (*LABEL_FREE, "auto")
    print("| C | images/class | snr | target | " + " | ".join(f"TV {m}" for m in methods) + " | auto chose |")
    print("|---" * (len(methods) + 5) + "|")
    regret = {m: [] for m in methods}
    t0 = time.perf_counter()
    for c, per, snr in itertools.product(args.classes, args.per_class, args.snr):
        counts = long_tailed_counts(c, 500, 50)
        ps = prior_from_counts(counts)
        for kind in TARGETS:
            g = torch.Generator().manual_seed(c + per)
            p_true = target_prior(kind, counts)
            y = torch.multinomial(p_true, c * per, replacement=True, generator=g)
            s = snr * torch.nn.functional.one_hot(y, c).double() + torch.randn(len(y), c, generator=g,
                                                                                dtype=torch.float64)
            tv, chose = {}, ""
            for m in methods:
                est, info = estimate_target_prior(snr * s, ps, loss="lade", method=m)
                tv[m] = 0.5 * float((est - p_true).abs().sum())
                chose = info["method"] if m == "auto" else chose
            best = min(tv[m] for m in LABEL_FREE)
            for m in methods:
                regret[m].append(tv[m] - best)
            print(f"| {c} | {per} | {snr:g} | {kind} | " + " | ".join(f"{tv[m]:.4f}" for m in methods)
                  + f" | {chose} |")
    print(f"\nmean regret to the best of {', '.join(LABEL_FREE)} over {len(regret['auto'])} cells "
          f"({time.perf_counter() - t0:.0f} s):")
    for m in methods:
        print(f"  {m:9s} mean {sum(regret[m]) / len(regret[m]):.4f}  max {max(regret[m]):.4f}")


if __name__ == "__main__":
    main()
