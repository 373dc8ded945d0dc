"""Convert a raw dataset into a prepared dataset directory (Parquet shards + dataset.json).

  python pipelines/prepare_data.py synthetic --out data/synthetic
  python pipelines/prepare_data.py cifar100_lt --root ~/datasets --imbalance-ratio 100 --out data/cifar100_lt_r100
  python pipelines/prepare_data.py lists --name places_lt --image-root ~/places365 \
      --train Places_LT_train.txt --val Places_LT_val.txt --test Places_LT_test.txt --out data/places_lt
  python pipelines/prepare_data.py inat2018 --image-root ~/inat2018 --train train2018.json --val val2018.json \\
      --out data/inat18
  python pipelines/prepare_data.py imagefolder --root ~/my_images --transform cifar --image-size 32 --out data/mine

Every prepared dataset has a validation split disjoint from test: the dataset's own (--val), CIFAR-100-LT's from
unused training images, else a seeded class-balanced hold-out from train (--val-per-class, --min-train-per-class).
"""
from __future__ import annotations

import argparse
import sys

from lade_core.data.augment import FAMILIES
from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.sources import (
    MIN_TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    DataError,
    load_cifar100_lt,
    load_image_folder,
    load_inat2018_json,
    load_split_lists,
    with_validation,
)
from lade_core.data.synthetic import make_synthetic
from lade_core.runtime.local_ray import quiet_logging
from lade_core.runtime.locks import LockHeld


def build_raw(args: argparse.Namespace):
    if args.source == "synthetic":
        return make_synthetic(
            num_classes=args.num_classes, image_size=args.image_size, max_count=args.max_count,
            imbalance_ratio=args.imbalance_ratio, test_per_class=args.test_per_class, seed=args.seed,
        )
    if args.source == "cifar100_lt":
        return load_cifar100_lt(args.root, imbalance_ratio=args.imbalance_ratio, seed=args.seed,
                                val_per_class=args.val_per_class)
    lists = {s: getattr(args, s) for s in ("train", "val", "test") if getattr(args, s, None)}
    if args.source == "lists":
        raw = load_split_lists(args.name, args.image_root, lists, num_classes=args.num_classes,
                               transform=args.transform, image_size=args.image_size)
    elif args.source == "imagefolder":
        raw = load_image_folder(args.root, args.name, transform=args.transform, image_size=args.image_size)
    else:
        raw = load_inat2018_json(args.image_root, lists)
    return with_validation(raw, val_per_class=args.val_per_class, min_train_per_class=args.min_train_per_class,
                           seed=args.seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    syn = sub.add_parser("synthetic", help="generated long-tailed images (the embedded default)")
    syn.add_argument("--num-classes", type=int, default=10)
    syn.add_argument("--image-size", type=int, default=32)
    syn.add_argument("--max-count", type=int, default=300)
    syn.add_argument("--imbalance-ratio", type=float, default=10)
    syn.add_argument("--test-per-class", type=int, default=100)
    syn.add_argument("--seed", type=int, default=0)
    cif = sub.add_parser("cifar100_lt", help="CIFAR-100-LT from cifar-100-python pickles")
    cif.add_argument("--root", required=True, help="directory holding cifar-100-python/ (or the folder itself)")
    cif.add_argument("--imbalance-ratio", type=float, default=100, choices=[10, 50, 100])
    cif.add_argument("--seed", type=int, default=0)
    cif.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS, help="validation images per class")
    lst = sub.add_parser("lists", help="ImageNet-LT / Places-LT / iNat split lists + image root")
    lst.add_argument("--name", required=True)
    lst.add_argument("--num-classes", type=int, default=None, help="default: inferred from the train list")
    fold = sub.add_parser("imagefolder", help="<root>/<split>/<class name>/<image> (torchvision ImageFolder layout)")
    fold.add_argument("--root", required=True)
    fold.add_argument("--name", help="dataset name (default: the root folder's name)")
    inat = sub.add_parser("inat2018", help="iNaturalist 2018 json annotations + image root")
    for p in (lst, inat):
        p.add_argument("--image-root", required=True)
        p.add_argument("--train", required=True)
        p.add_argument("--val")
        p.add_argument("--test")
    for p in (lst, fold):
        p.add_argument("--transform", default="imagenet",
                       help=f"augmentation family used by training and evaluation: one of {list(FAMILIES)}")
        p.add_argument("--image-size", type=int, default=None,
                       help="crop size for training and evaluation (default: 224 for imagenet, native for cifar)")
    for p in (lst, fold, inat):
        p.add_argument("--val-per-class", type=int, default=None,
                       help="without a val split: images per class held out of train (default: 20%% of the "
                            "smallest class, at least 1, at most 20)")
        p.add_argument("--min-train-per-class", type=int, default=MIN_TRAIN_PER_CLASS,
                       help="the hold-out never leaves a class with fewer training images than this")
        p.add_argument("--seed", type=int, default=0, help="hold-out and row-order seed")
        p.add_argument("--allow-duplicates", action="store_true",
                       help="keep images whose bytes are identical in two splits (refused by default: a test image "
                            "that is also a training image measures memory); they are counted in dataset.json")
    for p in (syn, cif, lst, fold, inat):
        p.add_argument("--out", required=True, help="prepared dataset directory to create")
        p.add_argument("--overwrite", action="store_true", help="replace an existing, different prepared dataset")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip (and count) missing/corrupt images instead of failing")
        p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray")
        p.add_argument("--verbose", action="store_true", help="show Ray's INFO logs")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging(args.verbose)
    try:
        raw = build_raw(args)
        manifest = prepare_dataset(raw, args.out, overwrite=args.overwrite, skip_bad=args.skip_bad,
                                   allow_duplicates=getattr(args, "allow_duplicates", False), num_cpus=args.num_cpus)
    except (DataError, ValueError, LockHeld) as e:  # bad data, a bad option value, another preparation of --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(manifest))
    return 0

