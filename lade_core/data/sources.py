"""Readers for the raw datasets in their standard published layouts.

Each reader returns a ``RawDataset``: per split either in-memory uint8 images [N, H, W, 3] (CIFAR, synthetic) or
image paths under a root (ImageNet-LT, Places-LT, iNaturalist 2018, an ImageFolder tree), plus int labels.
Readers only parse and check structure; pixel-level checks happen in ``prepare`` before anything is written.

Every dataset gets a validation split that is disjoint from test: the published val list or json where there is
one; for CIFAR-100-LT a class-balanced set from the CIFAR-100 training images the long tail left unused; for any
other dataset without one, a seeded class-balanced hold-out from train (``holdout_validation``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lade_core.data.augment import PRESETS
from lade_core.math.priors import long_tailed_counts

# Validation images per class when a dataset brings none (ImageNet-LT and Places-LT publish 20 per class), and the
# fewest training images the hold-out may leave a class.
VAL_PER_CLASS = 20
MIN_TRAIN_PER_CLASS = 2
# The default hold-out takes at most this share of the smallest class (at least 1 image): 12 images a class give 2
# to validation and keep 10 for training, not 10 and 2. More with --val-per-class.
HOLDOUT_SHARE = 0.2
MIN_IMAGE_SIZE = 8
# What the one decoder (transforms.decode_rgb, on Pillow) is meant for; an ImageFolder tree's other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


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

    def take(self, rows: np.ndarray) -> "RawSplit":
        """The rows at positions ``rows`` [K] (in that order), images or paths and source index with them."""
        return RawSplit(labels=self.labels[rows], images=None if self.images is None else self.images[rows],
                        paths=None if self.paths is None else [self.paths[i] for i in rows], index=self.index[rows])


@dataclass
class RawDataset:
    name: str
    num_classes: int
    splits: dict[str, RawSplit]
    transform: str  # "cifar" (pad-crop at native size) or "imagenet" (random-resized-crop)
    source: dict  # what was read: kind, layout, files
    class_names: list[str] | None = None
    image_root: str | None = None
    options: dict = field(default_factory=dict)  # everything that changes the output (ratio, seed, ...)
    input_hash: str = ""  # content hash of the input files
    image_size: int | None = None  # training/eval crop size; None: the family's default (or the native size)
    validation: dict = field(default_factory=dict)  # how the val split was made, for the manifest


def check_image_size(image_size, name: str = "image size") -> None:
    """None (the dataset's or family's default) or an integer crop size >= MIN_IMAGE_SIZE; booleans are not sizes."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < MIN_IMAGE_SIZE):
        raise DataError(f"{name} must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")


def check_transform(transform: str, image_size: int | None) -> None:
    """One clear error for a transform family or image size training could not use."""
    if transform not in PRESETS:
        raise DataError(PRESETS.unknown(transform))
    check_image_size(image_size)


def check_no_empty_class(counts, class_names: list[str] | None) -> None:
    """Every class needs a training image: log p_s(c) = -inf otherwise. The error names the classes."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        names = f" ({[class_names[c] for c in empty[:20]]})" if class_names else ""
        raise DataError(f"classes with zero training images: class indices {empty[:20]}{names}"
                        + (" ..." if len(empty) > 20 else ""))


def resolved_paths(paths: list[str], root: str | Path) -> list[str]:
    """The real path of each ``root``-relative path (symbolic links followed, as the reader will follow them).

    Each folder is resolved once (a dataset has few folders and many files); a file is resolved on its own only if
    it is itself a link, so a 62 500-image list costs one ``lstat`` per image.
    """
    folders: dict[str, str] = {}
    out = []
    for p in paths:
        full = os.path.join(root, p)
        if os.path.islink(full):
            out.append(os.path.realpath(full))
            continue
        folder, name = os.path.split(full)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        out.append(os.path.join(folders[folder], name))
    return out


def check_inside_root(paths: list[str], root: str | Path, where: str) -> None:
    """Image paths from a list, json or folder walk must name files under the image root ``root``: relative, no
    ``..``, and no symbolic link (a folder's or the file's own) that leads out of the root. The error names the
    first path that leaves it, and where it leads."""
    for i, p in enumerate(paths):
        parts = p.replace("\\", "/").split("/")
        if os.path.isabs(p) or ".." in parts:
            raise DataError(f"{where}: image path {p!r} (entry {i + 1}) leaves the image root; paths must be "
                            "relative and stay inside it")
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep
    outside = [(i, r) for i, r in enumerate(resolved_paths(paths, root)) if not r.startswith(inside)]
    if outside:
        i, real = outside[0]
        raise DataError(f"{where}: image path {paths[i]!r} (entry {i + 1}) leads through a symbolic link to {real}, "
                        f"outside the image root {real_root} ({len(outside)} such paths); paths must stay inside it")


def holdout_validation(train: RawSplit, num_classes: int, *, val_per_class: int | None = None,
                       min_train_per_class: int = MIN_TRAIN_PER_CLASS, seed: int = 0,
                       class_names: list[str] | None = None) -> tuple[RawSplit, RawSplit, dict]:
    """A seeded, class-balanced validation split held out of ``train``: (train, val, manifest record).

    Balanced (the same count per class, like the published ImageNet-LT / Places-LT val lists) so that validation
    top-1 under the uniform prior and the shifted protocol mean what they mean on test. ``val_per_class=None``
    takes HOLDOUT_SHARE of the smallest class (at least 1, at most VAL_PER_CLASS), and never so many that a class
    keeps fewer than ``min_train_per_class``; a given ``val_per_class`` that would leave some class below the
    minimum is an error naming those classes. The record says how many images that took from train, and what share.
    """
    if min_train_per_class < 1:
        raise DataError(f"--min-train-per-class must be >= 1, got {min_train_per_class}")
    counts = np.bincount(train.labels, minlength=num_classes)
    name = (lambda c: f"{c} ({class_names[c]})") if class_names else str
    check_no_empty_class(counts, class_names)
    if val_per_class is None:
        smallest = int(counts.min())
        val_per_class = min(VAL_PER_CLASS, max(1, int(HOLDOUT_SHARE * smallest)), smallest - min_train_per_class)
        if val_per_class < 1:
            small = [f"{name(c)}: {counts[c]} images" for c in np.argsort(counts, kind="stable")[:5]
                     if counts[c] - 1 < min_train_per_class]
            raise DataError(f"no validation split given, and holding out even 1 image per class would leave classes "
                            f"below --min-train-per-class {min_train_per_class}: {', '.join(small)}; pass a val list "
                            "or lower --min-train-per-class")
    elif val_per_class < 1:
        raise DataError(f"--val-per-class must be >= 1, got {val_per_class}")
    short = [c for c in range(num_classes) if counts[c] - val_per_class < min_train_per_class]
    if short:
        shown = ", ".join(f"{name(c)}: {counts[c]} images" for c in short[:10])
        raise DataError(f"--val-per-class {val_per_class} would leave {len(short)} classes below --min-train-per-class "
                        f"{min_train_per_class} ({shown}{' ...' if len(short) > 10 else ''}); the smallest class "
                        f"allows at most {max(int(counts.min()) - min_train_per_class, 0)}")
    rng = np.random.default_rng(seed)
    held = np.zeros(train.labels.size, dtype=bool)
    for c in range(num_classes):
        held[rng.choice(np.nonzero(train.labels == c)[0], size=val_per_class, replace=False)] = True
    record = {"source": "held out of train (seeded, class-balanced)", "per_class": val_per_class,
              "min_train_per_class": min_train_per_class, "seed": seed, "images": int(held.sum()),
              "share_of_train": round(float(held.sum()) / train.labels.size, 4)}
    return train.take(np.nonzero(~held)[0]), train.take(np.nonzero(held)[0]), record


def with_validation(raw: RawDataset, *, val_per_class: int | None, min_train_per_class: int, seed: int) -> RawDataset:
    """``raw`` with a held-out val split when it brings none (its own val list / json is used as it is)."""
    if "val" in raw.splits:
        if val_per_class is not None:
            raise DataError("--val-per-class applies only to a hold-out from train; this dataset has its own val split")
        raw.validation = {"source": "the dataset's own val split"}
        return raw
    train, val, record = holdout_validation(raw.splits["train"], raw.num_classes, val_per_class=val_per_class,
                                            min_train_per_class=min_train_per_class, seed=seed,
                                            class_names=raw.class_names)
    raw.splits = {"train": train, "val": val, **{s: v for s, v in raw.splits.items() if s != "train"}}
    raw.validation = record
    raw.options = {**raw.options, "val_per_class": record["per_class"], "min_train_per_class": min_train_per_class,
                   "seed": seed}
    return raw


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the split list as UTF-8") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]+", parts[1]):
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


def load_cifar100_lt(root: str | Path, imbalance_ratio: float = 100, seed: int = 0,
                     val_per_class: int = VAL_PER_CLASS) -> RawDataset:
    """CIFAR-100-LT from the standard ``cifar-100-python/`` pickles (``train``, ``test``, ``meta``).

    Train keeps ``long_tailed_counts(100, 500, ratio)`` images per class, chosen by a seeded RNG; test stays
    uniform (100 per class). Val: ``val_per_class`` images per class from the CIFAR-100 training images the long
    tail left unused, so it is disjoint from both train and test. A class whose long-tailed count leaves fewer
    spare (the head class keeps all 500) gives the rest from its own training images; the manifest says how many
    (``validation.taken_from_train``). The pickles are unpickled: read them only from a path you trust.
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
    if not isinstance(val_per_class, int) or val_per_class < 1:
        raise DataError(f"--val-per-class must be an integer >= 1, got {val_per_class!r}")
    rng = np.random.default_rng(seed)
    keep, val, from_train = [], [], {}
    for c, n_c in enumerate(wanted):
        idx = np.nonzero(y_tr == c)[0]
        if idx.size < n_c:
            raise DataError(f"{root / 'train'}: class {c} has {idx.size} images, the long tail needs {n_c}")
        chosen = rng.choice(idx, size=n_c, replace=False)
        spare = rng.permutation(np.setdiff1d(idx, chosen))
        short = max(val_per_class - spare.size, 0)
        if short >= n_c:
            raise DataError(f"class {c}: {n_c} long-tailed + {spare.size} spare images cannot give {val_per_class} "
                            "validation images and keep one for training; lower --val-per-class")
        if short:  # e.g. the head class keeps all 500 of its images: its val comes out of them
            from_train[c] = short
        val.append(np.sort(np.concatenate([spare[:val_per_class], chosen[:short]])))
        keep.append(np.sort(chosen[short:]))
    keep, val = np.concatenate(keep), np.concatenate(val)
    return RawDataset(
        name=f"cifar100_lt_r{imbalance_ratio:g}",
        num_classes=100,
        splits={
            "train": RawSplit(labels=y_tr[keep], images=x_tr[keep], index=keep),
            "val": RawSplit(labels=y_tr[val], images=x_tr[val], index=val),
            "test": RawSplit(labels=y_te, images=x_te),
        },
        transform="cifar",
        source={"kind": "cifar100_lt", "layout": "cifar-100-python pickles", "root": str(root)},
        class_names=class_names,
        options={"imbalance_ratio": imbalance_ratio, "seed": seed, "val_per_class": val_per_class},
        input_hash=hash_files(files),
        validation={"source": "CIFAR-100 training images unused by the long tail", "per_class": val_per_class,
                    "taken_from_train": {str(c): k for c, k in from_train.items()}},
    )


def load_split_lists(
    name: str, image_root: str | Path, lists: dict[str, str | Path], num_classes: int | None = None,
    transform: str = "imagenet", image_size: int | None = None,
) -> RawDataset:
    """ImageNet-LT / Places-LT / iNat-style split lists (``<relative path> <label>``) plus an image root.

    ``transform`` / ``image_size``: the augmentation family and crop size training and evaluation use (stored in
    the manifest), e.g. ``cifar`` at 32 for a small-image dataset.
    """
    check_transform(transform, image_size)
    if "train" not in lists:
        raise DataError(f"{name}: a train split list is required (got splits {sorted(lists)})")
    splits, files = {}, []
    for split, list_path in lists.items():
        paths, labels = read_split_list(Path(list_path))
        check_inside_root(paths, image_root, str(list_path))
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
        transform=transform,
        source={"kind": "split_lists", "layout": "<relative path> <label> lists",
                "lists": {s: str(p) for s, p in lists.items()}},
        image_root=str(image_root),
        input_hash=hash_files(files),
        image_size=image_size,
    )


def load_image_folder(root: str | Path, name: str | None = None, transform: str = "imagenet",
                      image_size: int | None = None) -> RawDataset:
    """An ImageFolder tree, ``root/<split>/<class name>/<image>`` (splits: train, optional val and test).

    Classes are the train split's folder names sorted by name, as torchvision's ``ImageFolder`` does; a val or
    test folder naming a class train does not have is an error. Files whose extension the training decoder does
    not read (IMAGE_EXTENSIONS) and hidden files are ignored and counted in the manifest.
    """
    check_transform(transform, image_size)
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder; an image folder is laid out as <root>/<split>/<class name>/<image>")
    class_names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"{root / 'train'}: no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    splits, ignored, listing = {}, {}, hashlib.sha256()
    for split in ("train", "val", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [c for c in found if c not in index]
        if unknown:
            raise DataError(f"{folder}: class folders {unknown[:10]} are not among the train split's classes")
        paths, labels, skipped = [], [], 0
        for cls in found:
            for dirpath, dirnames, filenames in os.walk(folder / cls):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                        skipped += 1
                        continue
                    paths.append(str(Path(dirpath, f).relative_to(root)))
                    labels.append(index[cls])
        if not paths:
            raise DataError(f"{folder}: no images with extensions {list(IMAGE_EXTENSIONS)}")
        check_inside_root(paths, root, str(folder))  # a class folder or image that links out of the tree
        splits[split] = RawSplit(labels=np.asarray(labels), paths=paths)
        ignored[split] = skipped
        listing.update("\n".join(f"{p} {y}" for p, y in zip(paths, labels)).encode())
    return RawDataset(
        name=name or root.resolve().name,
        num_classes=len(class_names),
        splits=splits,
        transform=transform,
        source={"kind": "imagefolder", "layout": "<root>/<split>/<class name>/<image>", "root": str(root.resolve()),
                "ignored_files": ignored},
        class_names=class_names,
        image_root=str(root),
        input_hash=listing.hexdigest(),
        image_size=image_size,
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
        except (KeyError, TypeError, ValueError) as e:  # JSON syntax, a category_id that is no integer, non-UTF-8
            raise DataError(f"{ann_path}: not an iNaturalist annotation file ({type(e).__name__}: {e})") from e
        check_inside_root(paths, image_root, str(ann_path))
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
        source={"kind": "inat2018", "layout": "iNaturalist 2018 json",
                "annotations": {s: str(p) for s, p in annotations.items()}},
        class_names=class_names,
        image_root=str(image_root),
        input_hash=hash_files(files),
    )
