"""A generated long-tailed image dataset: the embedded default, learnable by a small CNN in minutes on CPU.

Class c is an oriented sine grating (orientation pi*c/C, one of three frequencies) tinted with a class color,
with random phase, contrast and pixel noise, so both color and texture carry the label but no single pixel does.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from lade_core.data.sources import RawDataset, RawSplit
from lade_core.math.priors import long_tailed_counts


def _render(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S]
    theta = np.pi * labels / num_classes  # [N]
    freq = 2.0 + 1.5 * (labels % 3)  # [N]
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]  # [N, S, S]
    wave = np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    hue = 2 * np.pi * labels / num_classes
    color = 0.5 + 0.5 * np.stack([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)], axis=1)  # [N, 3]
    contrast = rng.uniform(0.25, 0.45, n)[:, None, None, None]
    img = 0.5 + contrast * wave[..., None] * color[:, None, None, :]  # [N, S, S, 3]
    img += rng.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic(
    num_classes: int = 10,
    image_size: int = 32,
    max_count: int = 300,
    imbalance_ratio: float = 10,
    val_per_class: int = 20,
    test_per_class: int = 100,
    seed: int = 0,
) -> RawDataset:
    options = dict(
        num_classes=num_classes, image_size=image_size, max_count=max_count, imbalance_ratio=imbalance_ratio,
        val_per_class=val_per_class, test_per_class=test_per_class, seed=seed,
    )
    rng = np.random.default_rng(seed)
    counts = {
        "train": long_tailed_counts(num_classes, max_count, imbalance_ratio),
        "val": [val_per_class] * num_classes,
        "test": [test_per_class] * num_classes,
    }
    splits = {}
    for split, per_class in counts.items():
        # Grouped by class, the order real datasets arrive in, so everything downstream is tested on that order.
        labels = np.repeat(np.arange(num_classes), per_class)
        splits[split] = RawSplit(labels=labels, images=_render(labels, num_classes, image_size, rng))
    return RawDataset(
        name=f"synthetic_c{num_classes}_r{imbalance_ratio:g}",
        num_classes=num_classes,
        splits=splits,
        transform="cifar",
        source={"kind": "synthetic", "layout": "generated"},
        class_names=[f"class_{c}" for c in range(num_classes)],
        options=options,
        input_hash=hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest(),
        validation={"source": "generated", "per_class": val_per_class},
    )
