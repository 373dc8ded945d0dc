"""Decode + augment training chunks on the training worker's device (config ``decode: device``, and ``auto`` on a GPU
where it works: ``decode_place``): a chunk's JPEGs decoded in one batched call (nvJPEG, through TorchCodec's
``decode_jpeg(..., device="cuda")``; TorchCodec decodes the CPU path too), then the imagenet family's augmentation
batched over the chunk.

The augment lists it runs are the seeded path's (``transforms.seeded_steps``) that start with a bilinear
RandomResizedCrop, followed by RandomHorizontalFlip and ColorJitter steps (``device_steps``):

- the draws are the seeded path's, from the same per-sample seeds: the same boxes, coins, orders and factors as
  torchvision's per-image pipeline (``draw_params``);
- RandomResizedCrop is one batched resample: PyTorch's separable (antialiased) bilinear filter, the weights of
  ``_upsample_bilinear2d_aa``, written as two matrices per image (rows [S, h], columns [S, w]), applied to the
  chunk's crops, zero-padded to one size, by two batched matmuls (``resample_crops``);
- the flip is one ``where``; ColorJitter's steps run in each image's own order, each over the images whose turn it
  is, one factor per image, with torchvision's arithmetic (``transforms._JITTER``).

Given the same crops, flip and jitter are torchvision's bits. The resample computes in float32 where torch's CPU
kernel uses 16-bit fixed point, and nvJPEG's IDCT is not libjpeg-turbo's: both differ from the CPU path's pixels
by rounding (tests/test_device_augment.py and bench/device_decode.py measure how far).
"""
from __future__ import annotations

import io
import logging
from functools import lru_cache

import numpy as np
import torch
from torchcodec import decoders
from torchvision.transforms import InterpolationMode, v2

from lade_core.data.augment import sample_seeds
from lade_core.data.transforms import (
    _JITTER,
    ImageTransform,
    _flip_coin,
    _jitter_params,
    _kept,
    _parts,
    _resized_crop_box,
    _uint8,
    checked_kind,
    decode_rgb,
    run_ahead,
    seeded_steps,
)

log = logging.getLogger(__name__)

# Bytes of float32 crops resampled at once: a chunk of large images is resampled in groups under this.
RESAMPLE_BYTES = 256 << 20
_BILINEAR = InterpolationMode.BILINEAR  # torchvision keeps a transform's mode as given: an enum or its string


def device_steps(augment: list | None) -> list | None:
    """The seeded steps (``transforms.seeded_steps``) of a resolved ``augment`` list that this module runs: a
    bilinear RandomResizedCrop first, then only flips and colour jitters; else None."""
    steps = seeded_steps(augment) if augment else None
    if not steps:
        return None
    first, rest = steps[0][1], [t for _, t in steps[1:]]
    if not isinstance(first, v2.RandomResizedCrop) or InterpolationMode(first.interpolation) is not _BILINEAR:
        return None
    return steps if all(isinstance(t, (v2.RandomHorizontalFlip, v2.ColorJitter)) for t in rest) else None


def draw_params(steps: list, shapes: list[tuple[int, int]], seeds: np.ndarray) -> list:
    """Per step of ``device_steps``, its draws for each image (``shapes``: (H_i, W_i); ``seeds`` [n], uint64),
    from a generator seeded as ``transforms.apply_seeded`` seeds it and drawn in its order: the crop boxes
    [(top, left, h, w)], the flip coins [bool], the jitter (order, factors) of each image."""
    gen = torch.Generator()
    params: list[list] = [[] for _ in steps]
    for (height, width), seed in zip(shapes, seeds):
        gen.manual_seed(int(seed >> np.uint64(1)))
        for k, (_, t) in enumerate(steps):
            if isinstance(t, v2.RandomResizedCrop):
                params[k].append(_resized_crop_box(t, height, width, gen))
            elif isinstance(t, v2.RandomHorizontalFlip):
                params[k].append(_flip_coin(t, gen))
            else:
                params[k].append(_jitter_params(t, gen))
    return params


def filter_weights(lengths: torch.Tensor, size: int, padded: int, antialias: bool) -> torch.Tensor:
    """The weights of PyTorch's bilinear resize of each of n crops of ``lengths`` [n] pixels to ``size`` along one
    axis, as a matrix over the crop zero-padded to ``padded``: float32 [n, size, padded], each row summing to 1.

    As ``_upsample_bilinear2d_aa`` computes them: output pixel i is centred at scale (i + 0.5), scale = length /
    size; its weights are the triangle filter max(0, 1 - |(j + 0.5 - centre) / support|) over input pixels j,
    normalized to sum to 1, with support = scale when shrinking with ``antialias`` (else 1: plain bilinear, which
    the same triangle gives, edges included)."""
    length = lengths.to(torch.float64).view(-1, 1, 1)  # [n, 1, 1]
    scale = length / size
    support = torch.where(antialias & (scale >= 1), scale, torch.ones_like(scale))
    centre = scale * (torch.arange(size, dtype=torch.float64).view(1, -1, 1) + 0.5)  # [n, size, 1]
    j = torch.arange(padded, dtype=torch.float64).view(1, 1, -1)  # [1, 1, padded]
    w = (1 - ((j + 0.5 - centre) / support).abs()).clamp_(min=0) * (j < length)
    return (w / w.sum(-1, keepdim=True)).float()


def resample_crops(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], size: list[int],
                   antialias: bool) -> torch.Tensor:
    """RandomResizedCrop's resample of each image (uint8 [3, H_i, W_i], one device) to ``size`` [S_h, S_w] from
    its box (top, left, h, w), in groups of crops padded to one size: float32 [n, 3, S_h, S_w] of integer values
    (rounded as torch's float path rounds). The matmuls run at torch's float32 matmul precision: a process that
    allows TF32 (``torch.set_float32_matmul_precision("high")``) gets more pixels off by 1 from rounding."""
    out, start = [], 0
    while start < len(images):
        stop, hmax, wmax = start, 0, 0
        while stop < len(images):  # the largest group under RESAMPLE_BYTES (at least one crop)
            h, w = max(hmax, boxes[stop][2]), max(wmax, boxes[stop][3])
            if stop > start and (stop + 1 - start) * 3 * h * w * 4 > RESAMPLE_BYTES:
                break
            stop, hmax, wmax = stop + 1, h, w
        device = images[start].device
        crops = torch.zeros((stop - start, 3, hmax, wmax), dtype=torch.float32, device=device)
        for c, im, (top, left, h, w) in zip(crops, images[start:stop], boxes[start:stop]):
            c[:, :h, :w] = im[:, top:top + h, left:left + w]
        heights = torch.tensor([b[2] for b in boxes[start:stop]])
        widths = torch.tensor([b[3] for b in boxes[start:stop]])
        rows = filter_weights(heights, size[0], hmax, antialias).to(device)  # [n, S_h, hmax]
        cols = filter_weights(widths, size[1], wmax, antialias).to(device)  # [n, S_w, wmax]
        # horizontal pass, then vertical, as torch's kernel: [n, 3, hmax, wmax] @ [n, 1, wmax, S_w] -> [n, 3, hmax, S_w]
        x = torch.matmul(crops, cols.transpose(1, 2).unsqueeze(1))
        out.append(torch.matmul(rows.unsqueeze(1), x).round_().clamp_(0, 255))  # [n, 3, S_h, S_w]
        start = stop
    return torch.cat(out)


def jitter_batch(x: torch.Tensor, params: list[tuple[list[int], list[float | None]]]) -> torch.Tensor:
    """ColorJitter on float32 images [n, 3, H, W] of integer values, in place, image i with its own (order,
    factors) ``params[i]``: at each of the 4 turns, each step runs on the images whose order puts it there."""
    order = torch.tensor([p[0] for p in params]).view(-1, 4)  # [n, 4]
    factors = torch.tensor([[np.nan if f is None else f for f in p[1]] for p in params],
                           dtype=torch.float64).view(-1, 4)  # [n, 4]; NaN: the step is off
    for turn in range(4):
        for step, fn in enumerate(_JITTER):
            chosen = (order[:, turn] == step) & ~factors[:, step].isnan()
            if chosen.any():
                idx = chosen.nonzero().squeeze(1)
                on = idx.to(x.device)
                x[on] = fn(x[on].contiguous(), factors[idx, step].to(x.device))
    return x


def decode_batch(encoded: list, device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> uint8 [3, H_i, W_i] each, on ``device``. Every header is checked first as
    ``transforms.decode_rgb`` checks it (the pixel limit). On a GPU the JPEGs go through nvJPEG in one call; other
    formats, and a batch nvJPEG refuses (a CMYK JPEG, say), are decoded on the CPU by ``decode_rgb`` and copied."""
    data = [d if isinstance(d, bytes) else bytes(d) for d in encoded]
    kinds = [checked_kind(d) for d in data]  # every header, before any decode
    out: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, k in enumerate(kinds) if k == "JPEG"] if device.type == "cuda" else []
    if jpegs:
        try:
            decoded = decoders.decode_jpeg([torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpegs],
                                           mode="RGB", device=device)
            for i, im in zip(jpegs, decoded):
                out[i] = im
        except RuntimeError as e:
            log.warning("nvJPEG refused a batch (%s); decoding it on the CPU", str(e).splitlines()[0][:160])
    return [im if im is not None else decode_rgb(d).to(device, non_blocking=True) for im, d in zip(out, data)]


def device_decode_augment(batch: dict, tf: ImageTransform, device: torch.device,
                          shard: tuple[int, int] | None = None, rows: np.ndarray | None = None) -> dict:
    """``transforms.decode_augment`` on ``device`` for a ``device_steps`` transform: {"image": uint8 [n, 3, S, S]
    on ``device`` (torch), "label": int64 [n], "index": int64 [n] (numpy)}."""
    steps = device_steps(tf.augment)
    if steps is None:
        raise ValueError(f"decode: device runs a bilinear RandomResizedCrop followed by flips and colour jitters; "
                         f"this augment list is {tf.augment}")
    keep, index = _kept(batch, shard, rows)
    labels = np.asarray(batch["label"], dtype=np.int64)[keep]
    crop = steps[0][1]
    if not len(keep):
        empty = torch.zeros((0, 3, *crop.size), dtype=torch.uint8, device=device)
        return {"image": empty, "label": labels, "index": index[keep]}
    seed = tf.seed if tf.seed is not None else int(torch.randint(0, 2**62, ()))
    images = decode_batch([batch["image"][i] for i in keep], device)
    params = draw_params(steps, [tuple(im.shape[-2:]) for im in images], sample_seeds(seed, index[keep]))
    x = resample_crops(images, params[0], crop.size, bool(crop.antialias))
    for (_, t), p in zip(steps[1:], params[1:]):
        if isinstance(t, v2.RandomHorizontalFlip):
            flip = torch.tensor(p, device=device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        else:
            x = jitter_batch(x, p)
    return {"image": _uint8(x), "label": labels, "index": index[keep]}


def device_decode_chunks(blocks, tf: ImageTransform, device: torch.device, shard: tuple[int, int] | None = None,
                         rows: np.ndarray | None = None, chunk: int = 64):
    """``device_decode_augment`` over ``blocks``, ``chunk`` rows at a time, one chunk ahead of the caller on a
    thread of its own (the Parquet reads, header checks and draws overlap the caller's training step)."""
    parts = (part for block in blocks for part in _parts(block, chunk))
    for out in run_ahead(lambda part: device_decode_augment(part, tf, device, shard, rows), parts, threads=1):
        if len(out["label"]):
            yield out


@lru_cache(maxsize=None)
def device_decode_works(device: torch.device) -> bool:
    """Whether ``decode: auto`` decodes on ``device``: a GPU whose nvJPEG decodes a small JPEG to within rounding
    of the CPU decoder's pixels (checked once per device; any failure says no, and Ray Data decodes instead)."""
    if device.type != "cuda":
        return False
    from PIL import Image

    ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)  # [48, 64]
    buf = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)).save(buf, format="JPEG", quality=90)
    try:
        data = buf.getvalue()
        gpu = decoders.decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode="RGB",
                                   device=device)[0].cpu()
        diff = (gpu.float() - decode_rgb(data).float()).abs().mean().item()
    except Exception as e:  # noqa: BLE001 - a missing or broken nvJPEG in any form: decode on the CPUs instead
        log.warning("nvJPEG on %s does not work (%s); Ray Data decodes the training images", device, e)
        return False
    return diff < 3
