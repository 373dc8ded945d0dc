"""Images/s of the training input path on the worker's device (``decode: device``: the chunk's JPEGs decoded in one
batched call, nvJPEG on a GPU, then the imagenet preset batched: ``lade_core.data.device_augment``) against the
CPU path a worker runs (``decode: worker``: TorchCodec + the seeded path on the worker's threads,
``transforms.decode_augment_threaded``), on the same JPEG bytes, 64-image chunks, RandomResizedCrop 224 + flip +
ColorJitter(0.4, 0.4, 0.4). Torch only (no Ray, no MLflow): it runs as it is on a lent GPU machine.

For each image size it prints both rates, their ratio, and the mean absolute difference of the two paths' images
(the same draws; the difference is the resample's and the decoder's rounding, and for scale two different crops of
the same images differ by ~40-60). The last lines print ``device_augment <size> device/cpu <ratio>``.

  python bench/device_augment.py [--device cuda] [--images 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from lade_core.data.augment import augment_seed, resolve_augment
from lade_core.data.device_augment import device_decode_augment
from lade_core.data.transforms import ImageTransform, decode_augment_threaded


def photo_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """JPEG q90 of smooth random colour fields with mild noise: photograph-sized files."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (max(height // 48, 2), max(width // 48, 2), 3), np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(field + rng.normal(0, 3, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="the CPU path's decode threads")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    ratios = {}
    for width, height in ((340, 256), (500, 375)):
        data = photo_jpegs(args.images, width, height)
        specs = resolve_augment("imagenet", "imagenet", 224, [(height, width)])
        tf = ImageTransform("imagenet", 224, specs, augment_seed(0, 1))
        block = {"image": np.array(data, dtype=object), "label": np.zeros(len(data), np.int64),
                 "index": np.arange(len(data))}
        chunks = [{k: v[i:i + 64] for k, v in block.items()} for i in range(0, len(data), 64)]

        def on_device() -> list[torch.Tensor]:
            out = [device_decode_augment(c, tf, device)["image"] for c in chunks]
            _sync(device)
            return out

        def on_cpu() -> list[np.ndarray]:
            return [c["image"] for c in decode_augment_threaded([block], tf, threads=args.threads)]

        rates = {}
        for name, fn in (("device", on_device), ("cpu", on_cpu)):
            fn()  # warm-up: nvJPEG's handles, the caching allocator, the thread pool
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rates[name] = len(data) / best
        dev = torch.cat(on_device()).cpu().float()
        cpu = torch.from_numpy(np.concatenate(on_cpu())).float()
        mad = (dev - cpu).abs().mean().item()
        ratios[f"{width}x{height}"] = rates["device"] / rates["cpu"]
        print(f"{width}x{height}: device {rates['device']:.0f} img/s, cpu ({args.threads} threads) "
              f"{rates['cpu']:.0f} img/s, mean abs difference {mad:.2f}")
    print("\n".join(f"device_augment {size} device/cpu {ratio:.2f}" for size, ratio in ratios.items()))


if __name__ == "__main__":
    main()
