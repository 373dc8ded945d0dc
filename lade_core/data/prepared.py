"""Open a prepared dataset directory: manifest checks, the source prior, Ray Datasets per split."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..priors import prior_from_counts
from .prepare import MANIFEST
from .sources import DataError
from .transforms import decode_augment_chunks, default_image_size

_REQUIRED = ("name", "num_classes", "transform", "splits")


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def class_counts(self, split: str = "train") -> list[int]:
        self._check_split(split)
        return list(self.manifest["splits"][split]["class_counts"])

    @property
    def source_prior(self) -> torch.Tensor:
        """p_s from the training split's class counts, float64 [C]."""
        return prior_from_counts(self.class_counts("train"))

    @property
    def image_size(self) -> int | None:
        """The crop size training and evaluation use (None: the transform family's default)."""
        return self.manifest.get("image_size")

    def crop_size(self, override: int | None = None) -> int:
        """The crop size the model sees: ``override`` (a config's image_size), else the manifest's, else the
        transform family's default."""
        return override or self.image_size or default_image_size(self.transform)

    @property
    def transform(self) -> str:
        """The transform family (``cifar`` / ``imagenet``): augmentation and the normalization statistics."""
        return self.manifest["transform"]

    @property
    def test_split(self) -> str:
        """The split final results are reported on: ``test``, else ``val`` for a dataset published without one."""
        return "test" if "test" in self.manifest["splits"] else "val"

    def check_validation_split(self) -> None:
        """Validation, Tune's objective and the champion must never be chosen on the test split."""
        if "val" not in self.manifest["splits"]:
            raise DataError(f"{self.root} has no validation split (prepared by an older lade); prepare it again with "
                            "pipelines/prepare_data.py --overwrite, which holds one out of train")

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.root}: no split {split!r}; it has {self.splits}")

    def train_dataset(self, seed: int, image_size: int | None = None):
        """The training split for ``TorchTrainer``: decoded, augmented, its shard files in a new seeded order every
        epoch. With ``lade_core.training.epoch_batches`` (a seeded local shuffle buffer per worker) this is how a
        class-sorted dataset is mixed; why it suffices at Places-LT's size (62 500 rows sorted by class):

        1. preparation wrote the rows in a seeded random order, so every shard file and every block read from it
           is a uniform sample of all classes: a batch from any window of the stream holds many classes;
        2. ``shuffle=FileShuffleConfig(seed, reseed_after_execution=True)`` gives each execution of the read (one
           per epoch) another seeded file order, so the streaming split hands each DDP worker different rows
           every epoch; it is applied while listing files, so reading stays streaming (``randomize_block_order``
           after the read would be a barrier that materializes the whole split first);
        3. the worker's local shuffle buffer, seeded by (seed, epoch, rank), reorders rows within its stream, so
           batch composition changes every epoch even for a split stored in one file.
        No global ``random_shuffle``: it would move the whole split through the object store every epoch.
        """
        from ray.data import FileShuffleConfig

        return self.ray_dataset("train", train=True, image_size=image_size,
                                shuffle=FileShuffleConfig(seed=int(seed), reseed_after_execution=True))

    def ray_dataset(self, split: str, *, train: bool | None = None, image_size: int | None = None, shuffle=None,
                    shard: tuple[int, int] | None = None):
        """A Ray Dataset of {"image": uint8 [3, H, W], "label": int64, "index": int64}, decoded and (train split)
        augmented; ``lade_core.data.transforms.normalize`` makes the model input on the worker.
        ``shuffle``: passed to ``read_parquet`` (file order). ``shard=(rank, world)``: only the rows with
        ``index % world == rank`` (one inference worker's disjoint share)."""
        augment = (split == "train") if train is None else train
        size = image_size or self.image_size
        fn = partial(decode_augment_chunks, kind=self.manifest["transform"], train=augment, image_size=size, shard=shard)
        # batch_size=None: the decode runs inside the read task (fused), a block at a time, in 64-row chunks.
        return self.encoded_dataset(split, shuffle=shuffle).map_batches(fn, batch_format="numpy", batch_size=None)

    def encoded_dataset(self, split: str, shuffle=None):
        """The split's rows as stored, {"image": encoded bytes, "label", "index"}, as a Ray Dataset (streaming
        read; ``shuffle`` is passed to ``read_parquet``)."""
        import ray.data

        self._check_split(split)
        ctx = ray.data.DataContext.get_current()
        v2 = ctx.use_datasource_v2
        if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
            # Ray 2.60's default V2 Parquet path (ListFiles -> ReadFiles) costs ~4 s per execution on a 2-core
            # machine whatever the size, and a training loop re-executes the read every epoch; V1 takes ~0.2 s
            # (bench/README.md, train_overhead). The user's RAY_DATA_USE_DATASOURCE_V2 wins if set.
            ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(str(self.root / split), shuffle=shuffle, columns=["image", "label", "index"])
        finally:
            ctx.use_datasource_v2 = v2

    def raw_split(self, split: str, columns: list[str] | None = None):
        """The split's Parquet rows as a pyarrow Table (encoded bytes), read without Ray."""
        import pyarrow.parquet as pq

        self._check_split(split)
        return pq.read_table(str(self.root / split), columns=columns)


def open_prepared(path: str | Path) -> PreparedDataset:
    """Open and check a prepared dataset directory; errors name what is missing or inconsistent."""
    root = Path(path).resolve()
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{root} is not a prepared dataset: {MANIFEST} is missing (run pipelines/prepare_data.py)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path}: not valid JSON ({e})") from e
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"{manifest_path}: missing keys {missing}")
    if "train" not in manifest["splits"]:
        raise DataError(f"{manifest_path}: no train split")
    for split, info in manifest["splits"].items():
        counts = info.get("class_counts", [])
        if len(counts) != manifest["num_classes"]:
            raise DataError(
                f"{manifest_path}: split {split!r} has class counts for {len(counts)} classes, manifest says {manifest['num_classes']}"
            )
        if sum(counts) != info.get("num_samples"):
            raise DataError(f"{manifest_path}: split {split!r} counts sum to {sum(counts)}, num_samples is {info.get('num_samples')}")
        if not (root / split).is_dir() or not any((root / split).glob("*.parquet")):
            raise DataError(f"{root / split}: no Parquet shards for split {split!r}")
    return PreparedDataset(root, manifest)
