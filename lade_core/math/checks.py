"""The checks every module restated: labels inside [0, C), a scalar inside its range, and which indices are bad
(shown, at most ``SHOWN`` of them, in an error naming them). numpy and torch only: the math modules use them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SHOWN = 20  # indices an error message lists


def bad_indices(mask, shown: int = SHOWN) -> list[int]:
    """The first ``shown`` indices where ``mask`` (a bool array or tensor, [N]) is true, as Python ints."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.flatnonzero(m)[:shown].tolist()


def check_labels(labels, num_classes: int, what: str = "labels") -> None:
    """One error naming the range for labels (an int array or CPU tensor [N]) outside [0, ``num_classes``)."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")


def check_range(value, name: str, *, low: float = -math.inf, low_open: bool = False, high: float = math.inf,
                high_open: bool = False) -> float:
    """``value`` as a float within the given bounds (``low_open``/``high_open``: excluded), or one error naming the
    value and its range: ``tau (τ) must be a finite number > 0, got 0.0``. A boolean is not a number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "" if low == -math.inf else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high == math.inf else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be a finite number {' and '.join(b for b in (lo, hi) if b)}, got {value!r}")
    return float(value)
