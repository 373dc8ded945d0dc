"""Open a prepared dataset directory: manifest checks, the source prior, Ray Datasets per split."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from lade_core.compat import datasource_v1
from lade_core.data.augment import default_image_size
from lade_core.data.device_augment import device_decode_chunks, device_decode_works, device_steps
from lade_core.data.prepare import MANIFEST
from lade_core.data.sources import DataError
from lade_core.data.transforms import ImageTransform, decode_augment_chunks, decode_augment_threaded
from lade_core.math.priors import prior_from_counts

_REQUIRED = ("name", "num_classes", "transform", "splits")
# Where a training worker's images are decoded and augmented (``PreparedDataset.batches``; config key ``decode``).
DECODE_PLACES = ("auto", "worker", "ray_data", "device")
DECODE_READ_ROWS = 512  # encoded rows a worker that decodes its own images reads at a time


def decode_place(decode: str, device: torch.device, augment: list | None) -> str:
    """Where a training worker on ``device`` gets its training batches decoded and augmented by the resolved
    ``augment`` list (``decode``: one of DECODE_PLACES): ``worker`` (this process, on threads), ``ray_data`` (Ray
    Data's read tasks on the cluster's CPUs) or ``device`` (this process, on ``device``: ``device_augment``).

    ``auto`` decodes in the worker on a CPU: there the model's step costs milliseconds per image and decoding
    (tens of microseconds for a 32-px PNG, ~1 ms for a 224-px JPEG with its augmentation) is noise next to it, while
    Ray Data's read tasks cost processes that import torch, Arrow conversions and object-store copies on the same
    cores (bench/README.md, the default job). On a GPU the step is faster than one core decodes: the GPU decodes
    (nvJPEG) and augments when the list is one ``device_augment`` runs and nvJPEG works there
    (``device_decode_works``), else Ray Data decodes ahead on the cluster's CPUs. Evaluation batches are decoded
    in the worker only for ``worker``."""
    if decode == "device" and device_steps(augment) is None:
        raise ValueError(f"decode: device runs a bilinear RandomResizedCrop followed by flips and colour jitters; "
                         f"this run's augment list is {augment} (use decode: worker or ray_data)")
    if decode != "auto":
        return decode
    if device.type == "cpu":
        return "worker"
    return "device" if device_steps(augment) is not None and device_decode_works(device) else "ray_data"


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
        return override or self.image_size or default_image_size(self.family)

    @property
    def family(self) -> str:
        """The transform family (``cifar`` / ``imagenet``): the evaluation transform, and the default augment
        preset and normalization statistics (``lade_core.data.augment``)."""
        return self.manifest["transform"]

    @property
    def channel_stats(self) -> dict | None:
        """The training split's per-channel {mean, std} on the [0, 1] scale (None: prepared by an older lade)."""
        return self.manifest.get("channel_stats")

    def input_sizes(self, crop: int) -> list[tuple[int, int]]:
        """The (H, W) sizes images reach the augmentation in, to check an ``augment`` list on: the images' one
        size where the manifest records it (cifar-family data has one), else a square and a larger oblong one."""
        native = self.manifest.get("native_size")
        if native:
            return [tuple(native)]
        if self.family == "cifar" and self.image_size:
            return [(self.image_size, self.image_size)]
        return [(crop, crop), (2 * crop + 3, 3 * crop // 2 + 1)]

    def eval_transform(self, image_size: int | None = None) -> ImageTransform:
        """The deterministic evaluation transform at the crop size (``crop_size(image_size)``)."""
        return ImageTransform(self.family, self.crop_size(image_size))

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

    def epoch_rows(self, seed: int, epoch: int, rank: int, world: int) -> tuple[list[str], np.ndarray]:
        """(shard files, sorted split indices) training worker ``rank`` of ``world`` reads in ``epoch``: a function
        of (seed, epoch, rank, world) only, never of timing. The train split's shard files in an order seeded by
        (seed, epoch), their rows concatenated in that order, and rank r takes rows [r n, (r + 1) n) with
        n = N // world: equal counts (so equal batch counts) on every rank, each file read by one rank (two at a
        boundary), and the N mod world rows left out differ from epoch to epoch."""
        files = _train_files(str(self.root / "train"), self.manifest.get("fingerprint"))
        order = np.random.default_rng([int(seed), int(epoch), 0xF11E]).permutation(len(files))
        index = np.concatenate([files[i][1] for i in order])
        n = len(index) // world
        mine = index[rank * n:(rank + 1) * n]
        ends = np.cumsum([len(files[i][1]) for i in order])
        first = np.searchsorted(ends, rank * n, side="right")
        last = np.searchsorted(ends, (rank + 1) * n - 1, side="right")
        return [files[i][0] for i in order[first:last + 1]] if n else [], np.sort(mine)

    def rank_batches(self, tf: ImageTransform, *, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                     in_worker: bool = False, shuffle_buffer: int = 0, shuffle_seed: int | None = None,
                     decode_threads: int | None = None, device: torch.device | None = None):
        """Training worker ``rank``'s rows of ``epoch`` (``epoch_rows``), decoded and augmented by ``tf`` (its
        ``seed``: ``augment.augment_seed(seed, epoch)``), in file order, as ``batches``: with a seeded local shuffle
        buffer per worker (``training.epoch_batches``) this is how a class-sorted dataset is mixed; why it suffices at
        Places-LT's size (62 500 rows sorted by class):

        1. preparation wrote the rows in a seeded random order, so every shard file and every block read from it
           is a uniform sample of all classes: a batch from any window of the stream holds many classes;
        2. the file order is reseeded every epoch, so each worker gets other rows every epoch;
        3. the worker's local shuffle buffer, seeded by (seed, epoch, rank), reorders rows within its stream.
        No global ``random_shuffle``: it would move the whole split through the object store every epoch. Each
        worker reads only its files (with Ray Data tasks on the cluster's CPUs, or itself: ``in_worker``, on its
        ``device`` if given); Ray Data's
        ``streaming_split`` would hand blocks to whichever worker asks first, so runs would differ."""
        files, rows = self.epoch_rows(seed, epoch, rank, world)
        return self.batches("train", tf, batch_size=batch_size, in_worker=in_worker, files=files, rows=rows,
                            shuffle_buffer=shuffle_buffer, shuffle_seed=shuffle_seed, decode_threads=decode_threads,
                            device=device)

    def batches(self, split: str, tf: ImageTransform | None = None, *, batch_size: int, in_worker: bool = False,
                shard: tuple[int, int] | None = None, files: list[str] | None = None, rows: np.ndarray | None = None,
                shuffle_buffer: int = 0, shuffle_seed: int | None = None, decode_threads: int | None = None,
                device: torch.device | None = None):
        """Torch batches {"image": uint8 [B, 3, S, S], "label": int64 [B], "index": int64 [B]} of the rows
        ``ray_dataset`` selects with the same ``tf``, ``shard``, ``files`` and ``rows``, each image decoded and
        transformed the same (its augmentation is seeded per sample), ``batch_size`` rows at a time.
        ``shuffle_buffer`` > 0: a local shuffle buffer of that many rows, seeded by ``shuffle_seed``.

        ``in_worker`` False: Ray Data's read tasks decode on the cluster's CPUs, ahead of the consumer
        (``iter_torch_batches``). True: this process reads the Parquet files with pyarrow and decodes them itself on
        ``decode_threads`` threads ahead of the caller (None: as many as torch's, which Ray sets to a worker's
        CPUs), no Ray task involved (``decode_place`` says when that pays); with ``device`` as well, this process
        decodes and augments on that device (``device_augment``: "image" is on it). All are a function of the
        arguments alone; Ray Data's local shuffle draws differently from the others', so its order of a shuffled
        epoch differs."""
        if not in_worker:
            ds = self.ray_dataset(split, tf, shard=shard, files=files, rows=rows)
            return ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=shuffle_buffer or None,
                                         local_shuffle_seed=shuffle_seed if shuffle_buffer else None)
        threads = decode_threads or torch.get_num_threads()
        chunks = self._decoded_chunks(split, tf or self.eval_transform(), shard, files, rows, threads, device)
        return _rebatch(chunks, batch_size, shuffle_buffer, shuffle_seed)

    def _decoded_chunks(self, split: str, tf: ImageTransform, shard, files, rows, threads: int,
                        device: torch.device | None = None):
        """``ray_dataset``'s rows read and decoded in this process, through the same ``decode_augment`` on
        ``threads`` threads (``transforms.decode_augment_threaded``), or on ``device``
        (``device_augment.device_decode_chunks``): the shard files in ``files`` order (default: the split's files by
        name), each streamed in blocks of DECODE_READ_ROWS encoded rows (a shard of large JPEGs is never held
        whole)."""
        import pyarrow.parquet as pq

        self._check_split(split)
        def blocks():
            for path in files if files is not None else self.split_files(split):
                for batch in pq.ParquetFile(path).iter_batches(batch_size=DECODE_READ_ROWS,
                                                               columns=["image", "label", "index"]):
                    yield {"image": batch.column("image").to_numpy(zero_copy_only=False),
                           "label": batch.column("label").to_numpy(), "index": batch.column("index").to_numpy()}

        if device is not None:
            yield from device_decode_chunks(blocks(), tf, device, shard, rows)
        else:
            yield from decode_augment_threaded(blocks(), tf, shard, rows, threads=threads)

    def ray_dataset(self, split: str, tf: ImageTransform | None = None, *, shard: tuple[int, int] | None = None,
                    files: list[str] | None = None, rows: np.ndarray | None = None):
        """A Ray Dataset of {"image": uint8 [3, S, S], "label": int64, "index": int64}, decoded and transformed by
        ``tf`` (default: the evaluation transform); ``lade_core.data.transforms.normalize`` makes the model input
        on the worker. ``shard=(rank, world)``: only the rows with ``index % world == rank`` (one inference
        worker's disjoint share); ``files`` / ``rows``: only those shard files, in that order (rows come in file
        order), and of them only the rows with those split indices."""
        tf = tf or self.eval_transform()
        fn = partial(decode_augment_chunks, tf=tf, shard=shard, rows=rows)
        # batch_size=None: the decode runs inside the read task (fused, where the read is not split: _read_tasks), a
        # block at a time, in 64-row chunks.
        ds = self.encoded_dataset(split, files=files).map_batches(fn, batch_format="numpy", batch_size=None)
        if files is not None:  # a training worker's rows: in file order, whatever order the read tasks finish in
            ds.context.execution_options.preserve_order = True
        return ds

    def encoded_dataset(self, split: str, files: list[str] | None = None):
        """The split's rows as stored, {"image": encoded bytes, "label", "index"}, as a Ray Dataset (a streaming
        read of all its shard files, or of ``files``)."""
        import ray.data

        self._check_split(split)
        # Ray 2.60's default V2 Parquet path (ListFiles -> ReadFiles) costs ~4 s per execution on a 2-core machine
        # whatever the size, and a training loop re-executes the read every epoch; V1 takes ~0.2 s (bench/README.md,
        # train_overhead). The user's RAY_DATA_USE_DATASOURCE_V2 wins if set.
        user_set = "RAY_DATA_USE_DATASOURCE_V2" in os.environ
        paths = files if files is not None else self.split_files(split)
        with contextlib.nullcontext() if user_set else datasource_v1(ray.data.DataContext.get_current()):
            return ray.data.read_parquet(paths, columns=["image", "label", "index"],
                                         override_num_blocks=_read_tasks(len(paths)))

    def split_files(self, split: str) -> list[str]:
        """The split's shard files, in name order (the order a whole-split read takes them)."""
        return sorted(map(str, (self.root / split).glob("*.parquet")))

    def raw_split(self, split: str, columns: list[str] | None = None):
        """The split's Parquet rows as a pyarrow Table (encoded bytes), read without Ray."""
        import pyarrow.parquet as pq

        self._check_split(split)
        return pq.read_table(str(self.root / split), columns=columns)

    def raw_batches(self, split: str, columns: list[str], batch_size: int):
        """The split's Parquet rows as pyarrow RecordBatches of up to ``batch_size`` rows, streamed without Ray (the
        files are read ahead on Arrow's I/O threads): ``raw_split`` for a split too large to hold at once."""
        import pyarrow.dataset as pads

        self._check_split(split)
        yield from pads.dataset(str(self.root / split), format="parquet").to_batches(columns=columns,
                                                                                       batch_size=batch_size)


def _read_tasks(num_files: int) -> int | None:
    """Read tasks for ``num_files`` shard files: one per file where there are at least as many files as the
    cluster's CPUs, None (Ray Data's choice) where fewer.

    Why: Ray Data wants blocks of ~1 MB and ≥ 2 per CPU, so by default it cuts each file's read into several blocks
    (``SplitBlocks``), and a split read cannot fuse with the ``map_batches`` after it: the encoded bytes go through
    the object store to a second task per block. One task per file keeps the decode inside the read, +25-30 %
    images/s on 2 cores (bench/README.md, data_throughput). With fewer files than CPUs, Ray's split is what spreads
    the decoding over them."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    return num_files if cpus and num_files >= cpus else None


def _rebatch(chunks, batch_size: int, shuffle_buffer: int, seed: int | None):
    """Decoded chunks {"image", "label", "index"} (numpy; "image" may be a torch tensor on a device) -> torch
    batches of ``batch_size`` rows (the last one short), in order, or with ``shuffle_buffer`` > 0 through a seeded
    local shuffle buffer: each batch is drawn at random from the buffered rows once ``shuffle_buffer`` more than a
    batch are held, the rest shuffled at the end (the semantics of Ray Data's ``local_shuffle_buffer_size``)."""
    rng = np.random.default_rng(seed)
    held: dict[str, torch.Tensor] | None = None  # the rows read but not yet yielded, [n] / [n, 3, S, S]
    for chunk in chunks:
        part = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                for k, v in chunk.items()}
        held = part if held is None or not len(held["label"]) else {k: torch.cat([held[k], part[k]]) for k in part}
        while len(held["label"]) >= batch_size + shuffle_buffer:
            if not shuffle_buffer:  # in order: the first rows, the rest a view
                yield {k: v[:batch_size] for k, v in held.items()}
                held = {k: v[batch_size:] for k, v in held.items()}
                continue
            take = torch.from_numpy(rng.choice(len(held["label"]), batch_size, replace=False))
            rest = torch.ones(len(held["label"]), dtype=torch.bool)
            rest[take] = False
            yield {k: v[take.to(v.device)] for k, v in held.items()}
            held = {k: v[rest.to(v.device)] for k, v in held.items()}
    if held is not None and len(held["label"]):
        n = len(held["label"])
        order = torch.from_numpy(rng.permutation(n)) if shuffle_buffer else torch.arange(n)
        for start in range(0, n, batch_size):
            yield {k: v[order[start:start + batch_size].to(v.device)] for k, v in held.items()}


@lru_cache(maxsize=8)
def _train_files(directory: str, fingerprint: str | None) -> list[tuple[str, np.ndarray]]:
    """(path, split indices [n] in file order) of every shard file of a split, in name order: the index column
    alone is read (a few bytes per row). ``fingerprint``: the manifest's, so a dataset prepared again is read again."""
    import pyarrow.parquet as pq

    return [(str(p), pq.read_table(p, columns=["index"]).column("index").to_numpy().astype(np.int64))
            for p in sorted(Path(directory).glob("*.parquet"))]


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
                f"{manifest_path}: split {split!r} has class counts for {len(counts)} classes, manifest says "
                f"{manifest['num_classes']}"
            )
        if sum(counts) != info.get("num_samples"):
            raise DataError(f"{manifest_path}: split {split!r} counts sum to {sum(counts)}, num_samples is "
                            f"{info.get('num_samples')}")
        if not (root / split).is_dir() or not any((root / split).glob("*.parquet")):
            raise DataError(f"{root / split}: no Parquet shards for split {split!r}")
    return PreparedDataset(root, manifest)
