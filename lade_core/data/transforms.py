"""Decode + augment for Ray Data ``map_batches`` (encoded image bytes -> uint8 [B, 3, H, W]) and ``normalize``, which
turns those into the model's float32 input on the training or inference worker.

Why uint8 out of Ray Data: each batch goes through Arrow and the object store to the worker; uint8 is 4x fewer
bytes than float32, and the float conversion then runs where the model runs (on its GPU when there is one)."""
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
_DEFAULT_SIZE = {"cifar": 32, "imagenet": 224}


def default_image_size(kind: str) -> int:
    """The crop size of a family when neither the config nor the prepared dataset sets one."""
    return _DEFAULT_SIZE[kind]


@lru_cache(maxsize=None)
def build_transform(kind: str, train: bool, image_size: int | None = None) -> v2.Compose:
    """The geometric (and, for ImageNet-family training, color) transform of a family, on uint8 [3, H, W]."""
    if kind not in _STATS:
        raise ValueError(f"unknown transform family {kind!r}; choose one of {TRANSFORM_KINDS}")
    if kind == "cifar":
        size = image_size or default_image_size(kind)
        geo = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(size)]
    else:
        size = image_size or default_image_size(kind)
        if train:
            geo = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)]
        else:
            geo = [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(geo)  # uint8 in, uint8 out: normalization is ``normalize``, on the worker


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W]. Preparation checks every image with this same decoder, so an image
    that passes preparation never fails in training."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_augment(batch: dict, kind: str, train: bool, image_size: int | None = None,
                   shard: tuple[int, int] | None = None) -> dict:
    """{"image": encoded bytes [B], "label": [B], "index": [B]} -> {"image": uint8 [B, 3, H, W], "label": int64 [B],
    "index": int64 [B]} (``index``: the sample's position in its source split, to trace a row back).

    ``shard=(rank, world)`` keeps only the rows with ``index % world == rank``, before decoding: each of ``world``
    inference workers decodes a disjoint share, and together they cover the split exactly once.
    """
    index = np.asarray(batch["index"], dtype=np.int64)
    keep = np.arange(len(index)) if shard is None else np.flatnonzero(index % shard[1] == shard[0])
    tf = build_transform(kind, train, image_size)
    images = [tf(decode_rgb(batch["image"][i])) for i in keep]
    size = image_size or default_image_size(kind)
    stacked = torch.stack(images).numpy() if images else np.zeros((0, 3, size, size), np.uint8)
    return {"image": stacked, "label": np.asarray(batch["label"], dtype=np.int64)[keep], "index": index[keep]}


def normalize(images: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 [B, 3, H, W] on any device -> float32 [B, 3, H, W], scaled to [0, 1] and normalized with the family's
    mean and std (torchvision's ``ToDtype(scale=True)`` + ``Normalize``, in one pass)."""
    mean, std = _STATS[kind]
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s
