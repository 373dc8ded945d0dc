"""Forward+backward time of every registry loss vs plain cross-entropy, and of LADELoss vs a masked C x N
formulation and vs its readable reference (``losses.lade_reference``, autograd).

Run: python bench/loss_speed.py [--smoke-test] [--device cuda]. Prints ratios measured in one run (best of k,
interleaved), last as ``<loss>/ce@<C> <ratio>`` lines (target: lade/ce <= 2). A multi-expert loss (``sade``,
``balpoe``) takes logits [N, E, C] and is timed against cross-entropy on its N*E rows. ``--before <git rev>`` also
times the LADELoss of that revision, in the same run (``lade_before/ce@<C>``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_times  # noqa: E402

from lade_core.math.losses import LADELoss, lade_reference
from lade_core.methods import LOSSES, build_loss  # noqa: E402


def masked_lade(z, y, log_ps, alpha, lam, weights):
    """The straightforward formulation (as the authors' code): a [C, N] masked copy of the logits."""
    n, c = z.shape
    ce = F.cross_entropy(z + log_ps, y)
    mask = y[None, :] == torch.arange(c, device=z.device)[:, None]  # [C, N]
    first = (z.T * mask).sum(1) / (mask.sum(1) + 1e-8)  # [C]
    second = torch.logsumexp(z.T - log_ps[:, None] - math.log(c), dim=1) - math.log(n)  # [C]
    return ce - alpha * (weights * (first - second - lam * second**2)).sum()


def _lade_at(rev: str):
    """LADELoss as it was at git revision ``rev``: its lade_core tree exported to a temporary directory and
    imported under another package name, so both versions run interleaved in one process."""
    import importlib
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="lade_before_"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "lade_core"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "lade_core").rename(tmp / "lade_core_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("lade_core_before.math.losses").LADELoss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true", help="tiny sizes, few repeats")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--before", default=None, help="a git revision whose LADELoss is timed beside this one")
    args = ap.parse_args()
    before_cls = _lade_at(args.before) if args.before else None
    sizes = [100] if args.smoke_test else [100, 1000, 8142]
    repeats = 3 if args.smoke_test else 30
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}"
    print(f"N={args.batch}, torch {torch.__version__}, {device.type} ({where})")
    print(f"{'C':>6} {'CE ms':>8} {'LADE ms':>8} {'masked ms':>9} {'readable ms':>11} {'LADE/CE':>8} "
          f"{'masked/LADE':>11}")
    ratios = {}
    for c in sizes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(args.batch, c, generator=g).to(device).requires_grad_()
        y = torch.randint(0, c, (args.batch,), generator=g).to(device)
        counts = torch.tensor([max(1, int(500 * 0.01 ** (k / max(c - 1, 1)))) for k in range(c)], dtype=torch.float64)
        prior = counts / counts.sum()
        lade = LADELoss(prior, alpha=0.1, lam=0.1).to(device)
        log_ps, weights = prior.log().float().to(device), prior.float().to(device)
        offset = lade.lader.released_offset.float().to(device)[None, :]
        losses = {name: build_loss(name, prior, train_counts=counts.long().tolist()).to(device) for name in LOSSES
                  if name not in ("lade", "causal_norm")}  # causal_norm trains softmax CE on its head's logits
        before = before_cls(prior, alpha=0.1, lam=0.1).to(device) if before_cls else None
        experts = {name: fn.num_experts for name, fn in losses.items() if hasattr(fn, "num_experts")}
        ze = {e: torch.randn(args.batch, e, c, generator=g).to(device).requires_grad_() for e in set(experts.values())}
        zc = (torch.rand(args.batch, c, generator=g) * 2 - 1).to(device).requires_grad_()  # cosines in [-1, 1]

        def step(loss_fn, x=z):
            def run():
                x.grad = None
                loss_fn().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()  # time the kernels, not their launch
            return run

        t = best_times(
            {
                "ce": step(lambda: F.cross_entropy(z, y)),
                "lade": step(lambda: lade(z, y)),
                "masked": step(lambda: masked_lade(z, y, log_ps, 0.1, 0.1, weights)),
                "readable": step(lambda: lade_reference(z, y, log_ps, offset, weights, 0.1, 0.1)),
                **({"lade_before": step(lambda: before(z, y))} if before else {}),
                **{name: step(lambda fn=fn: fn(z, y)) for name, fn in losses.items()
                   if name not in experts and fn.head[0] != "cosine"},
                # A cosine classifier's loss gets cosines: s * c of randn "logits" (|s c| ~ 100) would time
                # float32 subnormals in its softmax, not the loss.
                **{name: step(lambda fn=fn: fn(zc, y), zc) for name, fn in losses.items() if fn.head[0] == "cosine"},
                **{f"ce x{e}": step(lambda x=x: F.cross_entropy(x.flatten(0, 1), y.repeat_interleave(x.shape[1])), x)
                   for e, x in ze.items()},
                **{name: step(lambda fn=losses[name], x=ze[e]: fn(x, y), ze[e]) for name, e in experts.items()},
            },
            repeats=repeats,
        )
        print(
            f"{c:>6} {t['ce'] * 1e3:>8.3f} {t['lade'] * 1e3:>8.3f} {t['masked'] * 1e3:>9.3f} "
            f"{t['readable'] * 1e3:>11.3f} "
            f"{t['lade'] / t['ce']:>8.2f} {t['masked'] / t['lade']:>11.2f}"
        )
        ratios.update({f"{name}/ce@{c}": t[name] / t[f"ce x{experts[name]}" if name in experts else "ce"]
                       for name in ("lade", *(("lade_before",) if before_cls else ()), *losses)})
    for name, r in ratios.items():
        print(f"{name} {r:.2f}")


if __name__ == "__main__":
    main()
