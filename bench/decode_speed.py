"""Images/s of the one decoder (``transforms.decode_rgb``: the size read from the header bytes for the pixel cap, then
TorchCodec; one frame, 8-bit RGB) against the torchvision decoder it replaced (``torchvision.io.decode_image``,
mode RGB, deprecated since torchvision 0.29),
on the images the data-path bench uses: 32x32 PNG (the cifar family) and ~340x256 JPEG q90 (the imagenet family).
One process, one core, the same bytes; best of --repeats passes. The last lines print
``decode <family> lade/torchvision <ratio>`` (above 1: the new decoder is faster).

  python bench/decode_speed.py [--images 2000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

from lade_core.data.transforms import decode_rgb


def natural_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields with a few shapes and mild noise, like bench/data_throughput.py's."""
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x0, y0, x0 + int(rng.integers(4, w)), y0 + int(rng.integers(4, h))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(im).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encoded(family: str, n: int) -> list[bytes]:
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        if family == "png32":
            natural_image(rng, 32, 32).save(buf, format="PNG")
        else:
            natural_image(rng, 340, 256).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(decode, images: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for data in images:
            decode(data)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

    def torchvision_decode(data: bytes) -> torch.Tensor:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    ratios = {}
    for family, n in (("png32", args.images), ("jpeg340x256", max(args.images // 8, 50))):
        images = encoded(family, n)
        assert torch.equal(decode_rgb(images[0]), torchvision_decode(images[0]))  # the same pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = rate(torchvision_decode, images, args.repeats)
        new = rate(decode_rgb, images, args.repeats)
        print(f"{family}: {n} images, torchvision {old:.0f} img/s, lade decode_rgb {new:.0f} img/s")
        ratios[family] = new / old
    for family, r in ratios.items():
        print(f"decode {family} lade/torchvision {r:.2f}")


if __name__ == "__main__":
    main()
