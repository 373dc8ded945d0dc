"""Images/s of the one decoder (``transforms.decode_rgb``: the size read from the header bytes for the pixel cap, then
TorchCodec; one frame, 8-bit RGB) against the torchvision decoder it replaced (``torchvision.io.decode_image``,
mode RGB, deprecated since torchvision 0.29),
on the images the data-path bench uses: 32x32 PNG (the cifar family) and ~340x256 JPEG q90 (the imagenet family).
One process, one core, the same bytes; best of --repeats passes. The last lines print
``decode <family> lade/torchvision <ratio>`` (above 1: the new decoder is faster).

Then the imagenet preset's training transform (RandomResizedCrop 224 + flip + ColorJitter) on 340x256, 500x375,
1024x768 and 2048x1536 JPEGs: torchvision's pipeline image by image, lade's seeded path (the same bytes, checked),
and the seeded path with ``reduced_decode`` (libjpeg's DCT scaling where the crop allows it), each including the
decode, with the share of images decoded at reduced size and the mean absolute difference of their crops from the
full decode's (the same boxes; for scale, two different crops of the same images differ by ~40-60).

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

from lade_core.data.augment import augment_seed, resolve_augment
from lade_core.data.transforms import ImageTransform, _draft_scale, _header_size, decode_augment, decode_rgb


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


def encoded(family: str, n: int, size: tuple[int, int] = (340, 256)) -> list[bytes]:
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        if family == "png32":
            natural_image(rng, 32, 32).save(buf, format="PNG")
        else:
            natural_image(rng, *size).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def augment_rates(images: list[bytes], w: int, h: int, repeats: int) -> dict:
    """img/s of decode + the imagenet preset at 224 through torchvision's pipeline, the seeded path and the seeded
    path with reduced decoding, the share of crops decoded reduced and their mean absolute difference."""
    import lade_core.data.transforms as T

    specs = resolve_augment("imagenet", "imagenet", 224, [(h, w)])
    batch = {"image": np.array(images, dtype=object), "label": np.zeros(len(images), np.int64),
             "index": np.arange(len(images))}
    full = ImageTransform("imagenet", 224, specs, augment_seed(0, 1))
    reduced = ImageTransform("imagenet", 224, specs, augment_seed(0, 1), reduced_decode=True)
    seeded_steps = T.seeded_steps

    def torchvision() -> np.ndarray:
        T.seeded_steps = lambda specs: None  # the pipeline every other list takes
        try:
            return decode_augment(batch, full)["image"]
        finally:
            T.seeded_steps = seeded_steps

    out, timed = {}, {"torchvision": torchvision, "seeded": lambda: decode_augment(batch, full)["image"],
                      "reduced": lambda: decode_augment(batch, reduced)["image"]}
    for name, fn in timed.items():
        out[name] = fn()
        out[f"{name} img/s"] = len(images) / min(_seconds(fn) for _ in range(repeats))
    assert np.array_equal(out["torchvision"], out["seeded"])  # the same bytes
    diff = np.abs(out["seeded"].astype(np.int64) - out["reduced"].astype(np.int64)).mean(axis=(1, 2, 3))
    # which images the reduced path decoded small: their box allowed k > 1 (the draw is the seeded path's)
    gen, seeds = __import__("torch").Generator(), T.sample_seeds(full.seed, batch["index"])
    steps, small = T.seeded_steps(specs), []
    for data, s in zip(images, seeds):
        gen.manual_seed(int(s >> np.uint64(1)))
        (width, height) = _header_size(data)[1]
        box = T._resized_crop_box(steps[0][1], height, width, gen)
        small.append(_draft_scale(box[2], box[3], steps[0][1].size) > 1)
    small = np.array(small)
    out["share"] = small.mean()
    out["mad"] = diff[small].mean() if small.any() else 0.0
    return out


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    print("imagenet preset at 224, decode included (img/s, one thread):")
    for w, h in ((340, 256), (500, 375), (1024, 768), (2048, 1536)):
        r = augment_rates(encoded("jpeg", max(args.images // 20, 20), (w, h)), w, h, args.repeats)
        print(f"  {w}x{h}: torchvision {r['torchvision img/s']:.0f}, seeded {r['seeded img/s']:.0f} "
              f"({r['seeded img/s'] / r['torchvision img/s']:.2f}x), reduced {r['reduced img/s']:.0f} "
              f"({r['reduced img/s'] / r['seeded img/s']:.2f}x of seeded); decoded reduced {r['share']:.0%}, "
              f"their mean abs difference {r['mad']:.2f}")


if __name__ == "__main__":
    main()
