"""Images/s through decode + train augment: Ray Data map_batches vs a plain torch DataLoader (2 workers).

Both pipelines run the same lade_core transform on the same encoded images (PNG 32x32 for the CIFAR family,
JPEG 256x256 -> random-resized-crop 224 for the ImageNet family). Run: python bench/data_throughput.py [--smoke-test]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lade_core.data.prepare import prepare_dataset
from lade_core.data.prepared import open_prepared
from lade_core.data.sources import RawDataset, RawSplit
from lade_core.data.transforms import decode_augment
from lade_core.runtime import init_ray


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], labels: np.ndarray, kind: str):
        self.images, self.labels, self.kind = images, labels, kind

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        out = decode_augment({"image": [self.images[i]], "label": [self.labels[i]], "index": [i]}, self.kind, train=True)
        return torch.from_numpy(out["image"][0]), int(out["label"][0])


def run(kind: str, size: int, n: int, tmp: Path) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    raw = RawDataset(name=f"bench_{kind}", num_classes=10, splits={"train": RawSplit(labels=labels, images=arrays), "val": RawSplit(labels=labels[:64], images=arrays[:64])},
                     transform=kind, source={"kind": "bench"}, input_hash=f"{kind}{n}{size}")
    prepare_dataset(raw, tmp / kind, progress=False)
    ds = open_prepared(tmp / kind)
    ray_ips = 0.0
    for _ in range(2):  # the first pass also starts Ray's worker processes; report the warm one
        t0 = time.perf_counter()
        count = sum(len(b["label"]) for b in ds.ray_dataset("train").iter_batches(batch_size=64))
        ray_ips = count / (time.perf_counter() - t0)
    encoded = ds.raw_split("train").column("image").to_pylist()
    loader = torch.utils.data.DataLoader(_Encoded(encoded, labels, kind), batch_size=64, num_workers=2)
    t0 = time.perf_counter()
    count = sum(len(y) for _, y in loader)
    torch_ips = count / (time.perf_counter() - t0)
    return ray_ips, torch_ips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    init_ray(num_cpus=2)
    cases = [("cifar", 32, 512 if args.smoke_test else 8192), ("imagenet", 256, 64 if args.smoke_test else 768)]
    print(f"{'family':>9} {'input':>8} {'n':>6} {'Ray Data img/s':>15} {'DataLoader img/s':>17} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as d:
        for kind, size, n in cases:
            r, t = run(kind, size, n, Path(d))
            print(f"{kind:>9} {size:>4}x{size:<3} {n:>6} {r:>15.0f} {t:>17.0f} {r / t:>6.2f}")


if __name__ == "__main__":
    main()
