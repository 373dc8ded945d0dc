"""Decode + augment for Ray Data ``map_batches`` (encoded image bytes -> uint8 [B, 3, H, W]) and ``normalize``, which
turns those into the model's float32 input on the training or inference worker. What to apply is the run's augmentation
(``lade_core.data.augment``: the ``augment`` list, the evaluation transform, the normalization statistics).

Why uint8 out of Ray Data: each batch goes through Arrow and the object store to the worker; uint8 is 4x fewer
bytes than float32, and the float conversion then runs where the model runs (on its GPU when there is one)."""
from __future__ import annotations

import io
import math
import os
import struct
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchcodec import decoders
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lade_core.data.augment import augment_seed, build_augment, crop_flip, eval_transform, sample_seeds, view_augment

# Pixels (width x height) an image may have, checked from its header before anything is decoded: a 4 kB PNG can
# declare 27 000 x 1 000 pixels and decode to 108 MB. 40 MP holds any camera photo; raise it for scans and slides.
MAX_PIXELS = int(float(os.environ.get("LADE_MAX_IMAGE_MEGAPIXELS", "40")) * 1_000_000)
# Pillow modes (BMP, TIFF, ...) and what they hold: 16-bit integer samples (scaled to 8 bits), or modes converted
# to RGB as they are.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_TO_RGB = {"RGB", "RGBA", "RGBa", "RGBX", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageDecodeError(ValueError):
    """An image the decoder refuses: oversized, or of a kind it does not turn into 8-bit RGB."""


def decode_rgb(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W], the one decoder of preparation, training, evaluation and the served
    model, so an image that passes preparation never fails (or is read differently) later.

    The size comes from the header first: an image over ``max_pixels`` (default ``MAX_PIXELS``, env
    ``LADE_MAX_IMAGE_MEGAPIXELS``) is refused before it is decoded. One frame: an animated GIF / WebP / PNG gives its
    first. 8-bit RGB out: grayscale, palette, alpha and CMYK images are converted; 16-bit samples v are scaled to
    round(v * 255 / 65535), never clipped or passed on as values up to 65 535; float images are refused by name.

    JPEG, PNG, WebP and GIF are decoded by TorchCodec (what torchvision's deprecated decoders moved to: the same
    libjpeg-turbo / libpng speed), their sizes read from the header bytes here; other formats (BMP, TIFF) by Pillow.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    data = data if isinstance(data, bytes) else bytes(data)
    kind = checked_kind(data, limit)
    if kind is None:
        return _decode_pillow(data, limit)
    # The format's own decoder on a tensor of the bytes: no second format sniffing, no copy inside TorchCodec
    # (bench/decode_speed.py: on par with torchvision's decoder; decoders.decode_image on bytes is ~20 % slower).
    decode = _DECODERS.get(kind, decoders.decode_image)
    try:
        image = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")  # [N, 3, H, W] if animated
    except (RuntimeError, ValueError) as e:  # a truncated or corrupt file, found while decoding
        raise ImageDecodeError(f"corrupt image data ({str(e).splitlines()[0][:160]})") from None
    return image[0] if image.ndim == 4 else image


def checked_kind(data: bytes, limit: int = MAX_PIXELS) -> str | None:
    """The format the header of ``data`` names (PNG, JPEG, GIF, WebP; None: one Pillow reads, checked as it
    decodes), its declared size checked against ``limit`` pixels before anything is decoded."""
    kind, size = _header_size(data)
    if kind is not None and size is None:
        raise ImageDecodeError(f"corrupt {kind} header")
    if size is not None:
        _check_pixels(*size, limit)
    return kind


def _check_pixels(w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise ImageDecodeError(f"{w} x {h} pixels is over the {limit / 1e6:g}-megapixel limit "
                               f"(LADE_MAX_IMAGE_MEGAPIXELS)")


def _header_size(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(format, (width, height)) from the first bytes of a PNG, JPEG, GIF or WebP; (None, None) for other formats,
    (format, None) for a header of that format that cannot be read."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", (struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" and len(data) >= 24 else None)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", (struct.unpack("<HH", data[6:10]) if len(data) >= 10 else None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8X" and len(data) >= 30:
            return "WebP", (1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little"))
        if chunk == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return "WebP", (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
        if chunk == b"VP8 " and len(data) >= 30:
            w, h = struct.unpack("<HH", data[26:30])
            return "WebP", (w & 0x3FFF, h & 0x3FFF)
        return "WebP", None
    if data[:2] == b"\xff\xd8":
        return "JPEG", _jpeg_size(data)
    return None, None


_DECODERS = {"PNG": decoders.decode_png, "JPEG": decoders.decode_jpeg}

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the image's size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _decode_pillow(data: bytes, limit: int) -> torch.Tensor:
    """Formats TorchCodec does not read (BMP, TIFF, ...): Pillow, its header read before the pixels."""
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError) as e:
        raise ImageDecodeError(f"not an image lade can read ({e})") from e
    with im:
        _check_pixels(*im.size, limit)
        try:
            im.seek(0)  # the first frame of a multi-page file
            if im.mode in _SIXTEEN_BIT:
                gray = np.asarray(im, dtype=np.int64)  # [H, W] samples in [0, 65535]
                if gray.min() < 0 or gray.max() > 65535:
                    raise ImageDecodeError(f"{im.mode} image with samples outside 16 bits")
                eight = (gray * 255 + 32767) // 65535  # round(v * 255 / 65535), as TorchCodec scales
                rgb = np.repeat(eight.astype(np.uint8)[:, :, None], 3, axis=2)
            elif im.mode in _TO_RGB:
                rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # [H, W, 3], writable
            else:
                raise ImageDecodeError(f"images of mode {im.mode} (e.g. floating-point) are not supported: save it "
                                       "as 8- or 16-bit")
        except (OSError, SyntaxError, ValueError) as e:  # a truncated or corrupt file, found while decoding
            if isinstance(e, ImageDecodeError):
                raise
            raise ImageDecodeError(f"corrupt image data ({e})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1)  # [3, H, W] view of the [H, W, 3] pixels


@dataclass(frozen=True)
class ImageTransform:
    """What turns decoded images into a model batch at crop size ``size``: the training ``augment`` list
    (``augment.resolve_augment``) seeded per (``seed``, sample), or, with ``augment`` None, the deterministic
    evaluation transform of ``family``."""

    family: str
    size: int
    augment: list | None = None
    seed: int | None = None  # augment.augment_seed of the epoch; None: a fresh random one per batch
    # JPEGs decoded at the reduced size their RandomResizedCrop allows (``reduced_steps``): close to the full
    # decode's pixels, not equal, so it is a run's choice (config key ``reduced_decode``).
    reduced_decode: bool = False

    @property
    def train(self) -> bool:
        return self.augment is not None


# Seeds of "epochs" no run reaches: the augmented views of test-time aggregation never repeat a training crop.
VIEW_EPOCH = 1 << 40


def expert_view_transforms(family: str, size: int, input_sizes: list[tuple[int, int]], seed: int
                           ) -> list[ImageTransform]:
    """The transforms of the two augmented views of each target image that test-time aggregation compares
    (``augment.view_augment``, SADE's), seeded per (``seed``, view, sample index): the stored views of a run with
    seed s and a prediction job's with ``--seed s`` are the same crops of the same images."""
    views = view_augment(family, size, input_sizes)
    return [ImageTransform(family, size, views, augment_seed(seed, VIEW_EPOCH + v)) for v in range(2)]


# Test-time ensembling's views (``tta_views``): the evaluation view alone, with its mirror image, or LIFT's five crops.
TTA_MODES = ("none", "flip", "five_crop")


def tta_views(images: list[torch.Tensor], family: str, size: int, tta: str) -> list[torch.Tensor]:
    """The views test-time ensembling averages over, each uint8 [B, 3, S, S] of decoded images (uint8 [3, H, W]):
    ``none``: the evaluation transform's; ``flip``: it and its horizontal mirror; ``five_crop``: LIFT's (its
    ``tte``): the shorter side resized to S * 8 / 7 (the evaluation transform's S * 256 / 224), then the four
    corner crops and the centre crop of S."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
    if tta == "five_crop":
        from torchvision.transforms import v2

        resize, crop = v2.Resize(int(size * 256 / 224), antialias=True), v2.FiveCrop(size)
        crops = [crop(resize(im)) for im in images]  # per image: top-left, top-right, bottom-left, -right, centre
        return [torch.stack([c[v] for c in crops]) if crops else torch.zeros((0, 3, size, size), dtype=torch.uint8)
                for v in range(5)]
    x = transform_batch(images, ImageTransform(family, size))
    return [x, x.flip(-1)] if tta == "flip" else [x]


def decode_augment(batch: dict, tf: ImageTransform, shard: tuple[int, int] | None = None,
                   rows: np.ndarray | None = None) -> dict:
    """{"image": encoded bytes [B], "label": [B], "index": [B]} -> {"image": uint8 [B, 3, S, S], "label": int64 [B],
    "index": int64 [B]} (``index``: the sample's position in its source split, to trace a row back).

    Rows are selected before decoding: ``shard=(rank, world)`` keeps ``index % world == rank`` (each of ``world``
    inference workers decodes a disjoint share); ``rows`` (sorted split indices) keeps those (a training worker's
    rows of the epoch, ``PreparedDataset.rank_batches``).
    """
    steps = reduced_steps(tf)
    if steps is None:
        return augment_decoded(decode_rows(batch, shard, rows), tf)
    keep, index = _kept(batch, shard, rows)
    gen, seeds = torch.Generator(), sample_seeds(tf.seed, index[keep])
    images = [decode_crop_seeded(batch["image"][i], steps, gen, s) for i, s in zip(keep, seeds)]
    stacked = torch.stack(images) if images else torch.zeros((0, 3, tf.size, tf.size), dtype=torch.uint8)
    return {"image": stacked.numpy(), "label": np.asarray(batch["label"], dtype=np.int64)[keep], "index": index[keep]}


def _kept(batch: dict, shard: tuple[int, int] | None, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the rows ``decode_augment`` keeps [n], the batch's split indices [B])."""
    index = np.asarray(batch["index"], dtype=np.int64)
    keep = np.arange(len(index))
    if shard is not None:
        keep = np.flatnonzero(index % shard[1] == shard[0])
    if rows is not None:
        keep = keep[np.isin(index[keep], rows, assume_unique=True)]
    return keep, index


def decode_rows(batch: dict, shard: tuple[int, int] | None = None, rows: np.ndarray | None = None) -> dict:
    """``decode_augment``'s first half: its rows selected and decoded, {"image": [uint8 [3, H_i, W_i]], "label",
    "index"}."""
    keep, index = _kept(batch, shard, rows)
    return {"image": [decode_rgb(batch["image"][i]) for i in keep],
            "label": np.asarray(batch["label"], dtype=np.int64)[keep], "index": index[keep]}


def augment_decoded(decoded: dict, tf: ImageTransform) -> dict:
    """``decode_augment``'s second half: ``decode_rows``'s images through ``tf``, stacked (numpy uint8)."""
    return {**decoded, "image": transform_batch(decoded["image"], tf, decoded["index"]).numpy()}


def off_thread_safe(images: list[torch.Tensor], tf: ImageTransform) -> bool:
    """Whether ``transform_batch(images, tf)`` may run on another thread beside the caller's: it draws nothing from
    torch's global generator (the evaluation transforms, the vectorized crop + flip, the seeded path), so the
    caller's own draws (dropout, mixup) and every image stay what they are in one thread."""
    if not tf.train:
        return True
    return tf.seed is not None and ((crop_flip(tf.augment) is not None and len({im.shape for im in images}) == 1)
                                    or seeded_steps(tf.augment) is not None)


def decode_augment_threaded(blocks, tf: ImageTransform, shard: tuple[int, int] | None = None,
                            rows: np.ndarray | None = None, threads: int = 1, chunk: int = 64):
    """``decode_augment`` over ``blocks`` (dicts as it takes), ``chunk`` rows at a time, on ``threads`` threads
    ahead of the caller, yielded in order: what a DataLoader's worker processes give, in threads.

    Why threads suffice: TorchCodec's decoders and torch's kernels release the GIL, and the seeded path leaves only
    a few Python lines per image (bench/README.md, data_throughput). The output is the one-thread output: each chunk
    is a function of its rows and seeds, and a transform that draws from torch's global generator
    (``off_thread_safe``) runs in the caller's thread, after its images were decoded on the pool."""
    reduced = reduced_steps(tf) is not None  # decoded and cropped together, drawing from its own generator

    def work(part: dict) -> dict:
        if reduced:
            return decode_augment(part, tf, shard, rows)
        decoded = decode_rows(part, shard, rows)
        return augment_decoded(decoded, tf) if off_thread_safe(decoded["image"], tf) else decoded

    parts = (part for block in blocks for part in _parts(block, chunk))
    for out in run_ahead(work, parts, threads):
        yield from _finished(out, tf)


def run_ahead(work, items, threads: int):
    """``work(item)`` of each of ``items`` on ``threads`` threads, up to 2 per thread ahead of the caller, the
    results yielded in ``items``' order."""
    from concurrent.futures import ThreadPoolExecutor

    pool, pending = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lade-decode"), []
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > 2 * threads:  # a bounded lookahead: 2 items per thread
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finished(out: dict, tf: ImageTransform):
    if isinstance(out["image"], list):  # decoded only: its transform draws from the global generator (here)
        out = augment_decoded(out, tf)
    if len(out["label"]):
        yield out


def transform_batch(images: list[torch.Tensor], tf: ImageTransform, index: np.ndarray | None = None) -> torch.Tensor:
    """Decoded images (uint8 [3, H_i, W_i] each) -> ``tf``, stacked: uint8 [B, 3, S, S]. ``index`` [B]: the
    samples' split indices, which seed their augmentation (``augment.sample_seeds``)."""
    if not images:
        return torch.zeros((0, 3, tf.size, tf.size), dtype=torch.uint8)
    same = len({im.shape for im in images}) == 1
    if not tf.train:
        if tf.family == "cifar" and same:
            return center_crop_batch(torch.stack(images), tf.size)  # one vectorized pass
        t = eval_transform(tf.family, tf.size)
        return torch.stack([t(im) for im in images])
    seed = tf.seed if tf.seed is not None else int(torch.randint(0, 2**62, ()))
    seeds = sample_seeds(seed, np.arange(len(images)) if index is None else index)
    fast = crop_flip(tf.augment)
    if fast and same:
        return crop_flip_batch(torch.stack(images), *fast, seeds)  # one vectorized pass
    steps = seeded_steps(tf.augment)
    if steps is not None:  # the same images, drawn from a generator of this call's own: threads may run it at once
        gen = torch.Generator()
        return torch.stack([apply_seeded(steps, im, gen, s) for im, s in zip(images, seeds)])
    compose, gen = build_augment(tf.augment), torch.default_generator
    out = []
    # v2 transforms draw from torch's global CPU generator (so this part runs in the caller's thread:
    # off_thread_safe).
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        for im, s in zip(images, seeds):
            gen.manual_seed(int(s >> np.uint64(1)))
            out.append(compose(im))
    return torch.stack(out)



# --- the seeded path: torchvision's draws and kernels, each call with its own generator --------------------------
#
# Why: torchvision's v2 transforms draw their parameters from torch's global generator, so two threads augmenting
# at once would interleave their draws, and their per-image Python (input flattening, kernel dispatch) holds the GIL.
# For the steps below the same draws are made, in the same order, from a generator the call owns (seeded as
# transform_batch seeds the global one), and the same arithmetic runs: the images are bit-identical
# (tests/test_augment.py). ColorJitter's steps keep the image in float32 between them instead of converting it to
# uint8 and back after each: torchvision's uint8 kernels compute in float32 and truncate, and the floats here hold
# the same integers after each step (clamped to [0, 255], then floored), so one conversion at the end gives the same
# bytes; torch's float32 -> uint8 ``to`` is also 6x slower on these CPUs than numpy's (bench/README.md).

def _uint8(x: torch.Tensor) -> torch.Tensor:
    """float32 integer values in [0, 255] -> uint8 (what ``Tensor.to(torch.uint8)`` gives them)."""
    if x.device.type != "cpu":
        return x.to(torch.uint8)
    return torch.from_numpy(x.numpy().astype(np.uint8))


_SCRATCH = threading.local()


def _scratch(name: str, like: torch.Tensor) -> torch.Tensor:
    """A float32 buffer of ``like``'s shape on its device; on the CPU this thread's, reused image after image.
    Why: a fresh 600 kB tensor per image is a fresh mapping of pages from the OS on these VMs (glibc maps large
    blocks), and faulting them in costs 10x the arithmetic (bench/README.md). A GPU's caching allocator already
    reuses its blocks."""
    if like.device.type != "cpu":
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    key = (name, tuple(like.shape))
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    if key not in buffers:
        buffers[key] = torch.empty(like.shape, dtype=torch.float32)
    return buffers[key]


def _ratio(f: float | torch.Tensor) -> float | torch.Tensor:
    """A factor as torchvision's kernels take it: a Python float, or one float64 factor per image [n], made
    [n, 1, 1, 1] float32 as the kernel casts a Python float."""
    return f.float().view(-1, 1, 1, 1) if isinstance(f, torch.Tensor) else f


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of images [..., 3, H, W] of integer values: float32 [..., 1, H, W] (a scratch buffer),
    floored as its uint8 kernels floor it."""
    r, g, b = x.unbind(-3)
    out = torch.mul(r, 0.2989, out=_scratch("gray", r))
    return out.add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(-3)


def _blend_(x: torch.Tensor, other: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` of a uint8 image (here float32 ``x``, in place) with ``other``: x * r + other *
    (1 - r), clamped to [0, 255] and truncated to an integer. ``ratio`` per image [n]: torch's ``add_`` takes its
    ``alpha`` as one number and fuses it (x * r + other * alpha, rounded once), so the sum is made in float64 from
    the same float32 terms and rounded once to float32: the same bits (tests/test_augment.py)."""
    if not isinstance(ratio, torch.Tensor):
        return x.mul_(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 255).floor_()
    alpha = (1 - ratio).float().double().view(-1, 1, 1, 1)  # the float32 alpha, as add_ casts a Python float
    fused = x.mul_(_ratio(ratio)).double().add_(other.double() * alpha)
    return x.copy_(fused).clamp_(0, 255).floor_()


def _jitter_brightness(x: torch.Tensor, f: float | torch.Tensor) -> torch.Tensor:
    return x.mul_(_ratio(f)).clamp_(0, 255).floor_()


def _jitter_contrast(x: torch.Tensor, f: float | torch.Tensor) -> torch.Tensor:
    gray = _gray(x)
    if x.ndim == 3:
        mean = torch.mean(gray, dim=(-3, -2, -1), keepdim=True)
    else:  # one mean per image, each reduced as a lone image's is (a batched reduction may sum in another order)
        mean = torch.stack([torch.mean(g, dim=(-3, -2, -1), keepdim=True) for g in gray])
    return _blend_(x, mean, f)


def _jitter_saturation(x: torch.Tensor, f: float | torch.Tensor) -> torch.Tensor:
    return _blend_(x, _gray(x), f)


def _jitter_hue(x: torch.Tensor, f: float | torch.Tensor) -> torch.Tensor:
    if isinstance(f, torch.Tensor):  # torchvision's kernel takes one factor: image by image
        return torch.stack([_jitter_hue(im, float(v)) for im, v in zip(x, f)])
    return F.adjust_hue_image(_uint8(x), f).float()  # HSV arithmetic: torchvision's kernel on the uint8 image


_JITTER = (_jitter_brightness, _jitter_contrast, _jitter_saturation, _jitter_hue)  # ColorJitter's fn_idx order


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=gen).item())


def _resized_crop_box(t: v2.RandomResizedCrop, height: int, width: int, gen: torch.Generator
                      ) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.make_params`` of a ``height`` x ``width`` image: (top, left, h, w), up to 10 tries,
    then the central crop."""
    area, log_ratio = height * width, torch.log(torch.tensor(t.ratio))  # float32 logs, as torchvision takes them
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(t.scale[0], t.scale[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=gen).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=gen).item()
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(t.ratio):
        w, h = width, int(round(width / min(t.ratio)))
    elif in_ratio > max(t.ratio):
        w, h = int(round(height * max(t.ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resized_crop(t: v2.RandomResizedCrop, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    top, left, h, w = _resized_crop_box(t, x.shape[-2], x.shape[-1], gen)
    return F.resized_crop_image(x, top, left, h, w, size=t.size, interpolation=t.interpolation,
                                antialias=t.antialias)


def _flip_coin(t: v2.RandomHorizontalFlip, gen: torch.Generator) -> bool:
    """``RandomHorizontalFlip``'s draw: whether this image is mirrored."""
    return bool(torch.rand(1, generator=gen) < t.p)


def _flip(t: v2.RandomHorizontalFlip, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.flip(-1) if _flip_coin(t, gen) else x


def _jitter_params(t: v2.ColorJitter, gen: torch.Generator) -> tuple[list[int], list[float | None]]:
    """``ColorJitter.make_params``: the order of its 4 steps, then each factor (None where the step is off)."""
    order = torch.randperm(4, generator=gen).tolist()
    ranges = (t.brightness, t.contrast, t.saturation, t.hue)  # each None or (low, high)
    return order, [None if r is None else _uniform(r[0], r[1], gen) for r in ranges]


def _color_jitter(t: v2.ColorJitter, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``ColorJitter``'s draws and its kernels in their order."""
    order, factors = _jitter_params(t, gen)
    y = _scratch("image", x).copy_(x)  # [3, H, W], uint8's integers
    for i in order:
        if factors[i] is not None:
            y = _JITTER[i](y, factors[i])
    return _uint8(y)


# The v2 transforms (exactly these classes, not subclasses) the seeded path runs; any other step in a list sends the
# whole list through torchvision's own pipeline.
_SEEDED = {v2.RandomResizedCrop: _resized_crop, v2.RandomHorizontalFlip: _flip, v2.ColorJitter: _color_jitter}


def seeded_steps(specs: list[dict]) -> list | None:
    """[(step function, built transform)] of a resolved ``augment`` list whose every step the seeded path runs,
    else None (built once per list: ``augment.build_augment``)."""
    steps = [(_SEEDED.get(type(t)), t) for t in build_augment(specs).transforms]
    return None if any(fn is None for fn, _ in steps) else steps


def apply_seeded(steps: list, image: torch.Tensor, gen: torch.Generator, seed: np.uint64) -> torch.Tensor:
    """One image (uint8 [3, H, W]) through ``seeded_steps``, ``gen`` seeded with the sample's ``seed`` as
    ``transform_batch`` seeds torch's global generator for torchvision's pipeline: the same uint8 [3, S, S]."""
    gen.manual_seed(int(seed >> np.uint64(1)))
    for fn, t in steps:
        image = fn(t, image, gen)
    return image


# --- reduced-size JPEG decoding (``ImageTransform.reduced_decode``) ----------------------------------------------
#
# A RandomResizedCrop draws its box from the image's size alone, which the header gives before any pixel is decoded.
# Where the box, shrunk k times (k = 2, 4 or 8), still holds the crop size on each side, libjpeg can decode the image
# at 1/k of its size straight from its DCT coefficients (Pillow's ``draft``): k^2 fewer pixels decoded and resized.
# The result is close to, not equal to, the full decode's (bench/README.md, decode_speed: mean absolute difference),
# so it is the run's choice (``augment.reduced_decode``), recorded with its config.

def _draft_scale(box_h: int, box_w: int, size: list[int]) -> int:
    """The largest k in (8, 4, 2) at which the crop box, k times smaller, is still the crop size on each side (the
    resize still shrinks), else 1."""
    return next((k for k in (8, 4, 2) if box_h // k >= size[0] and box_w // k >= size[1]), 1)


def decode_jpeg_reduced(data: bytes, k: int) -> torch.Tensor:
    """A JPEG decoded at 1/k of its size (k in 1, 2, 4, 8; libjpeg's DCT scaling through Pillow's ``draft``):
    uint8 [3, ceil(H / k), ceil(W / k)]."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            im.draft("RGB", (width // k, height // k))  # Pillow takes the largest scale that holds this size
            rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # [h, w, 3], writable
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt image data ({e})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)  # [3, h, w] view, as TorchCodec lays it out


def reduced_steps(tf: ImageTransform) -> list | None:
    """The seeded steps of ``tf`` when it decodes at reduced size (``reduced_decode``, a seeded list that starts
    with RandomResizedCrop), else None."""
    if not (tf.train and tf.reduced_decode and tf.seed is not None):
        return None
    steps = seeded_steps(tf.augment)
    return steps if steps and steps[0][0] is _resized_crop else None


def decode_crop_seeded(data: bytes, steps: list, gen: torch.Generator, seed: np.uint64) -> torch.Tensor:
    """One encoded image through ``steps`` (``reduced_steps``) with the draws of ``apply_seeded``: the crop box is
    drawn from the header's size, the JPEG decoded at the reduced size that box allows (``_draft_scale``), the box
    scaled to it; other formats, and boxes too small to shrink, are decoded in full (the same image as
    ``apply_seeded``'s)."""
    data = data if isinstance(data, bytes) else bytes(data)
    kind, size = _header_size(data)
    if kind != "JPEG" or size is None:
        return apply_seeded(steps, decode_rgb(data), gen, seed)
    _check_pixels(*size, MAX_PIXELS)
    (width, height), (_, crop) = size, steps[0]
    gen.manual_seed(int(seed >> np.uint64(1)))
    top, left, h, w = _resized_crop_box(crop, height, width, gen)
    # Pillow refuses (or warns about) images over its own MAX_IMAGE_PIXELS, which LADE_MAX_IMAGE_MEGAPIXELS may exceed:
    # those are decoded in full by TorchCodec, under lade's limit alone.
    k = _draft_scale(h, w, crop.size) if width * height <= (Image.MAX_IMAGE_PIXELS or math.inf) else 1
    if k == 1:
        image = decode_rgb(data)
    else:
        image = decode_jpeg_reduced(data, k)
        sy, sx = image.shape[-2] / height, image.shape[-1] / width
        top, left = min(int(round(top * sy)), image.shape[-2] - 1), min(int(round(left * sx)), image.shape[-1] - 1)
        h, w = min(int(round(h * sy)), image.shape[-2] - top), min(int(round(w * sx)), image.shape[-1] - left)
    x = F.resized_crop_image(image, top, left, h, w, size=crop.size, interpolation=crop.interpolation,
                             antialias=crop.antialias)
    for fn, t in steps[1:]:
        x = fn(t, x, gen)
    return x


def decode_augment_chunks(batch: dict, tf: ImageTransform, shard: tuple[int, int] | None = None,
                          rows: np.ndarray | None = None, chunk: int = 64):
    """``decode_augment`` over a whole block, yielded ``chunk`` rows at a time.

    Why: with ``map_batches(batch_size=None)`` Ray Data fuses the decode into the Parquet read task (one task per
    block instead of a read task plus a map task, and the encoded bytes never go through the object store); a
    generator keeps each output block small whatever the size of the block it reads (bench/README.md)."""
    for part in _parts(batch, chunk):
        out = decode_augment(part, tf, shard, rows)
        if len(out["label"]):
            yield out


def _parts(block: dict, chunk: int):
    """A block's columns ``chunk`` rows at a time."""
    for start in range(0, len(block["label"]), chunk):
        yield {k: v[start:start + chunk] for k, v in block.items()}


def center_crop_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """CenterCrop(size) of a uint8 batch [B, 3, H, W] of equal-sized images at least ``size`` on each side (the
    cifar family's evaluation transform); smaller images go through ``eval_transform``, which pads."""
    b, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if h < size or w < size:
        return torch.stack([eval_transform("cifar", size)(im) for im in images])
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return images[:, :, top:top + size, left:left + size].contiguous()


def crop_flip_batch(images: torch.Tensor, size: int, padding: int, p: float, seeds: np.ndarray) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip(p) on a whole uint8 batch [B, 3, H, W] of equal-sized
    images at once, each image its own crop and coin from its seed (``seeds`` [B], uint64): the same distribution
    as the torchvision pipeline applied image by image, without its per-image Python overhead, which dominates
    at 32 pixels."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images  # zero fill, RandomCrop's default
    span_h, span_w = h + 2 * padding - size + 1, w + 2 * padding - size + 1
    if span_h < 1 or span_w < 1:
        raise ValueError(f"RandomCrop({size}, padding={padding}) of {h}x{w} images: the crop is larger than the image")
    top = torch.from_numpy((seeds % np.uint64(span_h)).astype(np.int64))
    left = torch.from_numpy(((seeds >> np.uint64(20)) % np.uint64(span_w)).astype(np.int64))
    rows = (top[:, None] + torch.arange(size))[:, None, :, None]  # [B, 1, S, 1]
    cols = (left[:, None] + torch.arange(size))[:, None, None, :]  # [B, 1, 1, S]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.from_numpy(((seeds >> np.uint64(40)) & np.uint64(0x7FFFFF)).astype(np.float64) / 2 ** 23 < p)
    out[flip] = out[flip].flip(-1)
    return out


def normalize(images: torch.Tensor, stats: dict) -> torch.Tensor:
    """uint8 [B, 3, H, W] on any device -> float32 [B, 3, H, W], scaled to [0, 1] and normalized with
    ``stats`` = {"mean": [3], "std": [3]} (``augment.resolve_normalize``): torchvision's ``ToDtype(scale=True)`` +
    ``Normalize``, in one pass."""
    m = torch.tensor(stats["mean"], device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    s = torch.tensor(stats["std"], device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return images.float().sub_(m).div_(s)  # (x / 255 - mean) / std, in two in-place passes
