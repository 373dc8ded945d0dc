"""Readers for the raw datasets in their standard published layouts.

Each reader returns a ``RawDataset``: per split either in-memory uint8 images [N, H, W, 3] (CIFAR, synthetic) or
image paths under a root (ImageNet-LT, Places-LT, iNaturalist 2018), plus int labels. Readers only parse and
check structure; pixel-level checks happen in ``prepare`` before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..priors import long_tailed_counts


class DataError(ValueError):
    """A problem with the user's data, naming the file, line or class at fault."""


@dataclass
class RawSplit:
    labels: np.ndarray  # [N] int64
    images: np.ndarray | None = None  # [N, H, W, 3] uint8, in-memory sources
    paths: list[str] | None = None  # relative to RawDataset.image_root, file-based sources
    index: np.ndarray | None = None  # [N] position in the original split (for tracing back)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.index is None:
            self.index = np.arange(self.labels.size, dtype=np.int64)


@dataclass
class RawDataset:
    name: str
    num_classes: int
    splits: dict[str, RawSplit]
    transform: str  # "cifar" (32x32 pad-crop) or "imagenet" (random-resized-crop 224)
    source: dict  # what was read: kind, layout, files
    class_names: list[str] | None = None
    image_root: str | None = None
    options: dict = field(default_factory=dict)  # everything that changes the output (ratio, seed, ...)
    input_hash: str = ""  # content hash of the input files


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_split_list(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse a ``<relative image path> <label>`` list (ImageNet-LT / Places-LT / iNat lists)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"split list not found: {path}")
    paths, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: malformed line {line!r}; expected '<relative path> <integer label>'")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"split list is empty: {path}")
    return paths, np.asarray(labels, dtype=np.int64)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if bad.size:
        raise DataError(
            f"{where}: label {labels[bad[0]]} at sample {bad[0]} is outside [0, {num_classes}) "
            f"({bad.size} such samples)"
        )


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"missing CIFAR pickle: {path}")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar100_lt(root: str | Path, imbalance_ratio: float = 100, seed: int = 0) -> RawDataset:
    """CIFAR-100-LT from the standard ``cifar-100-python/`` pickles (``train``, ``test``, ``meta``).

    Train keeps ``long_tailed_counts(100, 500, ratio)`` images per class, chosen by a seeded RNG; test stays
    uniform (100 per class).
    """
    root = Path(root)
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    files = [root / "train", root / "test", root / "meta"]
    train, test, meta = (_unpickle(p) for p in files)
    class_names = list(meta.get("fine_label_names", [])) or None

    def arrays(d: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
        for key in ("data", "fine_labels"):
            if key not in d:
                raise DataError(f"{root / name}: pickle has no {key!r} key (keys: {sorted(d)})")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{root / name}: 'data' must be [N, 3072] uint8, got {data.shape}")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        check_labels(labels, 100, str(root / name))
        return images, labels

    x_tr, y_tr = arrays(train, "train")
    x_te, y_te = arrays(test, "test")
    wanted = long_tailed_counts(100, 500, imbalance_ratio)
    rng = np.random.default_rng(seed)
    keep = []
    for c, n_c in enumerate(wanted):
        idx = np.nonzero(y_tr == c)[0]
        if idx.size < n_c:
            raise DataError(f"{root / 'train'}: class {c} has {idx.size} images, the long tail needs {n_c}")
        keep.append(np.sort(rng.choice(idx, size=n_c, replace=False)))
    keep = np.concatenate(keep)
    return RawDataset(
        name=f"cifar100_lt_r{imbalance_ratio:g}",
        num_classes=100,
        splits={
            "train": RawSplit(labels=y_tr[keep], images=x_tr[keep], index=keep),
            "test": RawSplit(labels=y_te, images=x_te),
        },
        transform="cifar",
        source={"kind": "cifar100_lt", "layout": "cifar-100-python pickles", "root": str(root)},
        class_names=class_names,
        options={"imbalance_ratio": imbalance_ratio, "seed": seed},
        input_hash=hash_files(files),
    )


def load_split_lists(
    name: str, image_root: str | Path, lists: dict[str, str | Path], num_classes: int | None = None
) -> RawDataset:
    """ImageNet-LT / Places-LT / iNat-style split lists (``<relative path> <label>``) plus an image root."""
    if "train" not in lists:
        raise DataError(f"{name}: a train split list is required (got splits {sorted(lists)})")
    splits, files = {}, []
    for split, list_path in lists.items():
        paths, labels = read_split_list(Path(list_path))
        splits[split] = RawSplit(labels=labels, paths=paths)
        files.append(Path(list_path))
    inferred = {s: int(r.labels.max()) + 1 for s, r in splits.items()}
    if num_classes is None:
        num_classes = inferred["train"]
        mismatched = {s: c for s, c in inferred.items() if c != num_classes and s != "train"}
        if mismatched:
            raise DataError(
                f"{name}: mismatched class count between splits: train has {num_classes} classes, "
                + ", ".join(f"{s} has {c}" for s, c in mismatched.items())
            )
    for split, raw in splits.items():
        check_labels(raw.labels, num_classes, str(lists[split]))
    return RawDataset(
        name=name,
        num_classes=num_classes,
        splits=splits,
        transform="imagenet",
        source={"kind": "split_lists", "layout": "<relative path> <label> lists", "lists": {s: str(p) for s, p in lists.items()}},
        image_root=str(image_root),
        input_hash=hash_files(files),
    )


def load_inat2018_json(image_root: str | Path, annotations: dict[str, str | Path]) -> RawDataset:
    """iNaturalist 2018 from the official ``train2018.json`` / ``val2018.json`` (COCO-style) annotation files."""
    splits, files, class_names = {}, [], None
    for split, ann_path in annotations.items():
        ann_path = Path(ann_path)
        if not ann_path.exists():
            raise DataError(f"annotation file not found: {ann_path}")
        try:
            ann = json.loads(ann_path.read_text())
            by_image = {a["image_id"]: int(a["category_id"]) for a in ann["annotations"]}
            images = ann["images"]
            paths = [im["file_name"] for im in images]
            labels = [by_image[im["id"]] for im in images]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataError(f"{ann_path}: not an iNaturalist annotation file ({type(e).__name__}: {e})") from e
        if "categories" in ann and class_names is None:
            cats = sorted(ann["categories"], key=lambda c: c["id"])
            class_names = [c.get("name", str(c["id"])) for c in cats]
        splits[split] = RawSplit(labels=np.asarray(labels), paths=paths)
        files.append(ann_path)
    num_classes = len(class_names) if class_names else int(splits["train"].labels.max()) + 1
    for split, raw in splits.items():
        check_labels(raw.labels, num_classes, str(annotations[split]))
    return RawDataset(
        name="inat2018",
        num_classes=num_classes,
        splits=splits,
        transform="imagenet",
        source={"kind": "inat2018", "layout": "iNaturalist 2018 json", "annotations": {s: str(p) for s, p in annotations.items()}},
        class_names=class_names,
        image_root=str(image_root),
        input_hash=hash_files(files),
    )
