"""All 11 shifted priors x all metrics on ImageNet-LT-scale stored logits (50 000 x 1 000 float32). Target <= 2 s.

Both post-hoc modes of a LADE run (prior injection and raw), top-1, Many/Medium/Few, NLL and ECE (20 bins) per
(prior, mode), exactly as pipelines/evaluate.py computes them. Also times a float64 reference that materialises
softmax probabilities per prior with the lade_core metric functions, to show what the one-pass path saves.
Run: python bench/eval_speed.py [--smoke-test]
"""
from __future__ import annotations

import argparse
import time

import torch

from lade_core.math.evaluation import evaluate_targets, protocol_targets
from lade_core.math.metrics import expected_calibration_error, nll, shot_accuracies
from lade_core.math.posthoc import posthoc_logits
from lade_core.math.priors import long_tailed_counts, prior_from_counts


def reference(logits, labels, source_prior, train_counts, targets):
    """The direct formulation: float64 post-hoc logits and a full softmax per (prior, mode)."""
    for t in targets:
        idx = torch.as_tensor(t.indices)
        z, y = logits[idx].double(), labels[idx]
        for mode in ("inject", "raw"):
            w = posthoc_logits(z, mode, source_prior, t.prior)
            shot_accuracies(w.argmax(1), y, train_counts)
            nll(w, y)
            expected_calibration_error(torch.softmax(w, 1), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    num_classes, per_class = (100, 20) if args.smoke_test else (1000, 50)
    train_counts = long_tailed_counts(num_classes, 1280, 256)  # ImageNet-LT: 1280 .. 5 images per class
    source_prior = prior_from_counts(train_counts)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    logits = torch.randn(labels.numel(), num_classes, generator=g) * 2
    logits[torch.arange(labels.numel()), labels] += 3  # a classifier with some skill

    t0 = time.perf_counter()
    targets = protocol_targets(labels, train_counts)
    rows = evaluate_targets(logits, labels, source_prior, train_counts, ("inject", "raw"), targets)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference(logits, labels, source_prior, train_counts, targets)
    ref = time.perf_counter() - t0
    print(f"logits {tuple(logits.shape)} float32, {len(targets)} priors x 2 modes = {len(rows)} rows, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"lade_core.math.evaluation: {fast:.2f} s (target <= 2 s)   float64 reference: {ref:.2f} s   "
          f"ratio {ref / fast:.1f}x")


if __name__ == "__main__":
    main()
