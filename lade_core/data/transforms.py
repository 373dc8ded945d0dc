"""Decode + augment for Ray Data ``map_batches``: encoded image bytes -> float32 [B, 3, H, W] ready for the model."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

# Per-family normalization statistics (CIFAR-100 and ImageNet, as in torchvision's references).
_STATS = {
    "cifar": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
TRANSFORM_KINDS = tuple(_STATS)


@lru_cache(maxsize=None)
def build_transform(kind: str, train: bool, image_size: int | None = None) -> v2.Compose:
    if kind not in _STATS:
        raise ValueError(f"unknown transform family {kind!r}; choose one of {TRANSFORM_KINDS}")
    mean, std = _STATS[kind]
    if kind == "cifar":
        size = image_size or 32
        geo = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(size)]
    else:
        size = image_size or 224
        if train:
            geo = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)]
        else:
            geo = [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*geo, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W]. Preparation checks every image with this same decoder, so an image
    that passes preparation never fails in training."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_augment(batch: dict, kind: str, train: bool, image_size: int | None = None) -> dict:
    """{"image": encoded bytes [B], "label": [B], "index": [B]} -> {"image": float32 [B, 3, H, W], "label": int64
    [B], "index": int64 [B]} (``index``: the sample's position in its source split, to trace a row back)."""
    tf = build_transform(kind, train, image_size)
    out = []
    for data in batch["image"]:
        out.append(tf(decode_rgb(data)))
    return {"image": torch.stack(out).numpy(), "label": np.asarray(batch["label"], dtype=np.int64),
            "index": np.asarray(batch["index"], dtype=np.int64)}
