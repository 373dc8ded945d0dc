"""Images/s of the training input path: Ray Data (read Parquet -> decode + augment in ``map_batches`` -> uint8
batches -> ``iter_torch_batches``) against a torch DataLoader with as many worker processes as Ray has CPUs, and
the training worker decoding its rows itself (``decode: worker``, the default on CPUs: as many threads as the
DataLoader has processes, no other process).

Both run the same lade_core decode + train transform on the same encoded images, and both end with the same
``normalize`` on the consumer (what the training worker does), so the comparison is the input path alone:
  - cifar:    32x32 PNG (as CIFAR-100-LT is prepared), RandomCrop(32, pad 4) + flip;
  - imagenet: ~340x256 JPEG (quality 90), RandomResizedCrop(224) + flip + ColorJitter.
Images look natural (smooth colour fields with shapes and mild noise), so their JPEGs are photograph-sized rather
than the several-times-larger files of pure noise. Ray Data is timed on its second (warm) pass, best of --repeats.
The DataLoader runs in a process of its own, whose malloc is as a plain script has it (``--tuned-dataloader``: that
process keeps freed blocks too); this process keeps freed blocks in its heap as lade's training worker does
(``runtime.malloc``). The three paths' passes interleave, best of --repeats each: the box's speed drifts by tens of
% within minutes, and all three see the same drift.
The last lines print ``<family> ray_data/dataloader <ratio>`` and ``<family> worker/dataloader <ratio>``.

  python bench/data_throughput.py [--smoke-test] [--cpus 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lade_core.data.augment import resolve_augment, resolve_normalize
from lade_core.data.prepare import prepare_dataset
from lade_core.data.prepared import open_prepared
from lade_core.data.sources import RawDataset, RawSplit, load_image_folder
from lade_core.data.transforms import ImageTransform, decode_augment, normalize
from lade_core.runtime.local_ray import init_ray
from lade_core.runtime.malloc import keep_freed_blocks


def natural_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random colour field with a few shapes and mild sensor-like noise."""
    coarse = rng.integers(0, 256, (max(height // 48, 2), max(width // 48, 2), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(width // 8, width // 2), y0 + rng.integers(height // 8, height // 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


class _Encoded(torch.utils.data.Dataset):
    """The DataLoader side: the same encoded bytes, decoded and augmented per sample in the worker processes."""

    def __init__(self, images: list[bytes], tf: ImageTransform, labels=None):
        self.images, self.tf = images, tf
        self.labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        out = decode_augment({"image": [self.images[i]], "label": [self.labels[i]], "index": [i]}, self.tf)
        return torch.from_numpy(out["image"][0]), int(out["label"][0])


def make_dataset(kind: str, n: int, tmp: Path):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    if kind == "cifar":
        arrays = np.stack([np.asarray(natural_image(rng, 32, 32)) for _ in range(n)])
        raw = RawDataset(name="bench_cifar", num_classes=10, transform="cifar", source={"kind": "bench"},
                         input_hash=f"cifar{n}", splits={"train": RawSplit(labels=labels, images=arrays),
                                                         "val": RawSplit(labels=labels[:20], images=arrays[:20])})
    else:
        for split, count in (("train", n), ("val", 20)):
            for i in range(count):
                path = tmp / "imagefolder" / split / f"c{labels[i]}" / f"{i:05d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                natural_image(rng, 256, 340).save(path, format="JPEG", quality=90)
        raw = load_image_folder(tmp / "imagefolder", name="bench_imagenet", transform="imagenet")
    prepare_dataset(raw, tmp / kind, progress=False)
    return open_prepared(tmp / kind)


def train_transform(ds) -> ImageTransform:
    """The family's preset augmentation, resolved as a run resolves it (what the training workers get)."""
    size = ds.crop_size()
    return ImageTransform(ds.family, size, resolve_augment(None, ds.family, size, ds.input_sizes(size)), seed=0)


def lade_ips(ds, batch_size: int, epoch: int = 0, in_worker: bool = False, threads: int = 1) -> float:
    """What one training worker (of 1) reads in an epoch: ``PreparedDataset.rank_batches``, in file order, decoded
    by Ray Data's tasks or (``in_worker``) by this process on ``threads`` threads."""
    t0 = time.perf_counter()
    count, stats = 0, resolve_normalize(None, ds.family, None)
    for batch in ds.rank_batches(train_transform(ds), seed=0, epoch=epoch, rank=0, world=1, batch_size=batch_size,
                                 in_worker=in_worker, decode_threads=threads):
        normalize(batch["image"], stats)
        count += len(batch["label"])
    return count / (time.perf_counter() - t0)


def make_loader(encoded: list[bytes], tf: ImageTransform, batch_size: int, workers: int):
    # spawn: a forked child of a process that runs a Ray driver confuses the raylet; persistent, so that like Ray's
    # workers they start once and are timed warm.
    return torch.utils.data.DataLoader(_Encoded(encoded, tf), batch_size=batch_size, num_workers=workers,
                                       shuffle=True, persistent_workers=True, multiprocessing_context="spawn")


def dataloader_ips(loader, kind: str) -> float:
    t0 = time.perf_counter()
    count, stats = 0, resolve_normalize(None, kind, None)
    for images, labels in loader:
        normalize(images, stats)
        count += len(labels)
    return count / (time.perf_counter() - t0)


def _dataloader_process(conn, encoded: list[bytes], tf: ImageTransform, kind: str, workers: int,
                        tuned: bool) -> None:
    """The DataLoader's side in a process of its own, as a plain script has it (glibc's malloc untouched unless
    ``tuned``), timing one pass each time it is asked, so its passes interleave with lade's."""
    torch.set_num_threads(1)
    if tuned:
        keep_freed_blocks()
    loader = make_loader(encoded, tf, 64, workers)
    dataloader_ips(loader, kind)  # warm-up: starts the worker processes
    conn.send("ready")
    while conn.recv():
        conn.send(dataloader_ips(loader, kind))


class DataLoaderSide:
    """``DataLoaderSide(...).ips()``: one timed pass of the DataLoader in its own process (``_dataloader_process``)."""

    def __init__(self, encoded: list[bytes], tf: ImageTransform, kind: str, workers: int, tuned: bool):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a forked child of a process that runs a Ray driver confuses the raylet
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_dataloader_process, args=(child, encoded, tf, kind, workers, tuned))
        self.proc.start()
        assert self.conn.recv() == "ready"

    def ips(self) -> float:
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(False)
        self.proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--cpus", type=int, default=2, help="Ray's logical CPUs = DataLoader worker processes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["cifar", "imagenet"], choices=["cifar", "imagenet"])
    ap.add_argument("--scale", type=int, default=1, help="images per pass x this (per-pass start-up amortized)")
    ap.add_argument("--tuned-dataloader", action="store_true",
                    help="the DataLoader's consumer with lade's malloc tuning too (runtime.malloc)")
    args = ap.parse_args()
    init_ray(num_cpus=args.cpus)
    # The consumer stands in for the training worker, which would normalize on its GPU: one thread here, for both
    # sides, so its float conversion does not compete with the decoders for the cores.
    torch.set_num_threads(1)
    sizes = {"cifar": 512 if args.smoke_test else 8192 * args.scale,
             "imagenet": 64 if args.smoke_test else 768 * args.scale}
    cases = [(kind, sizes[kind]) for kind in args.families]
    ratios = {}
    print(f"{'family':>9} {'n':>6} {'mean bytes':>10} {'Ray Data img/s':>15} {'worker img/s':>13} "
          f"{'DataLoader img/s':>17} {'Ray Data/DL':>11} {'worker/DL':>9}")
    keep_freed_blocks()  # as lade's training worker does (lade_core.runtime.malloc); the DataLoader's own process not
    with tempfile.TemporaryDirectory() as d:
        for kind, n in cases:
            ds = make_dataset(kind, n, Path(d))
            encoded = ds.raw_split("train").column("image").to_pylist()
            loader = DataLoaderSide(encoded, train_transform(ds), kind, args.cpus, args.tuned_dataloader)
            lade_ips(ds, 64)  # warm-up: starts Ray's worker processes
            t = r = w = 0.0
            for epoch in range(1, args.repeats + 1):  # interleaved (the box's speed drifts), best of each
                t = max(t, loader.ips())
                r = max(r, lade_ips(ds, 64, epoch))
                w = max(w, lade_ips(ds, 64, epoch, in_worker=True, threads=args.cpus))
            loader.close()
            ratios[f"{kind} ray_data"], ratios[f"{kind} worker"] = r / t, w / t
            print(f"{kind:>9} {n:>6} {np.mean([len(b) for b in encoded]):>10.0f} {r:>15.0f} {w:>13.0f} {t:>17.0f} "
                  f"{r / t:>11.2f} {w / t:>9.2f}")
    for name, ratio in ratios.items():
        print(f"{name}/dataloader {ratio:.2f}")


if __name__ == "__main__":
    main()
