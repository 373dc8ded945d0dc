"""EM against MAPLS with many classes and few target images, and how often the bootstrap intervals cover the truth.

C classes (default 1 000), a long-tailed source prior (imbalance 100), a target prior drawn from a Dirichlet around
uniform, N target images (default 2 000: 2 per class). Each image is a signal ``--snr`` on its class's coordinate in
N(0, I) noise, so the source posteriors p_s(y|x) ∝ p_s(y) exp(snr * s_y) are exact: what is measured is the
estimator, not a model's calibration. Per seed: total variation to the true prior of EM and of MAPLS (and of the
source prior and uniform, for scale), MAPLS's lambda, and, with ``--interval``, the share of classes whose bootstrap
interval holds the true p_t.

  python bench/prior_estimation.py [--classes 1000] [--images 2000] [--seeds 1 2 3 4 5] [--interval 0.9]
"""
from __future__ import annotations

import argparse
import time

import torch

from lade_core.math.label_shift import em_prior, estimate_target_prior, mapls_prior
from lade_core.math.priors import long_tailed_counts, prior_from_counts


def problem(c: int, n: int, snr: float, concentration: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    ps = prior_from_counts(long_tailed_counts(c, 500, 5))
    p_true = torch.distributions.Dirichlet(torch.full((c,), concentration, dtype=torch.float64)).sample()
    y = torch.multinomial(p_true, n, replacement=True, generator=g)
    s = snr * torch.nn.functional.one_hot(y, c).double() + torch.randn(n, c, generator=g, dtype=torch.float64)
    return ps, p_true, snr * s  # a LADE model's exact logits: p_s(y|x) = softmax(logits + log p_s)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=4.0, help="signal on the true class (sets the task's difficulty)")
    ap.add_argument("--concentration", type=float, default=5.0, help="Dirichlet concentration of the target prior")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--interval", type=float, default=None, help="also the bootstrap coverage at this level")
    ap.add_argument("--n-boot", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)  # the Dirichlet draw
    cols = ["seed", "TV em", "TV mapls", "mapls/em", "lambda", "TV p_s", "TV uniform"]
    if args.interval:
        cols += [f"covered em {args.interval:g}", f"covered mapls {args.interval:g}"]
    print(f"C = {args.classes}, N = {args.images}, snr {args.snr:g}, Dirichlet({args.concentration:g}) targets\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    ratios = []
    for seed in args.seeds:
        ps, p_true, logits = problem(args.classes, args.images, args.snr, args.concentration, seed)
        post = torch.softmax(logits + ps.log(), 1)
        t0 = time.perf_counter()
        em, _ = em_prior(post, ps)
        mapls, info = mapls_prior(post, ps)
        row = [seed, tv(em, p_true), tv(mapls, p_true), tv(mapls, p_true) / tv(em, p_true), info["lambda"],
               tv(ps, p_true), tv(torch.full_like(ps, 1 / len(ps)), p_true)]
        ratios.append(row[3])
        if args.interval:
            for method in ("em", "mapls"):
                _, est = estimate_target_prior(logits, ps, loss="lade", method=method, interval=args.interval,
                                               n_boot=args.n_boot, seed=seed)
                lo, hi = (torch.tensor(est["interval"][k]) for k in ("lower", "upper"))
                row.append(float(((lo <= p_true) & (p_true <= hi)).double().mean()))
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |",
              f"<!-- {time.perf_counter() - t0:.1f} s -->")
    print(f"\nMAPLS / EM total variation: mean {sum(ratios) / len(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
