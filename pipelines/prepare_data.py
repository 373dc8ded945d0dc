"""Convert a raw dataset into a prepared dataset directory (Parquet shards + dataset.json).

  python pipelines/prepare_data.py synthetic --out data/synthetic
  python pipelines/prepare_data.py cifar100_lt --root ~/datasets --imbalance-ratio 100 --out data/cifar100_lt_r100
  python pipelines/prepare_data.py lists --name places_lt --image-root ~/places365 \
      --train Places_LT_train.txt --val Places_LT_val.txt --test Places_LT_test.txt --out data/places_lt
  python pipelines/prepare_data.py inat2018 --image-root ~/inat2018 --train train2018.json --val val2018.json --out data/inat18
"""
from __future__ import annotations

import argparse
import sys

from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.sources import DataError, load_cifar100_lt, load_inat2018_json, load_split_lists
from lade_core.data.synthetic import make_synthetic


def build_raw(args: argparse.Namespace):
    if args.source == "synthetic":
        return make_synthetic(
            num_classes=args.num_classes, image_size=args.image_size, max_count=args.max_count,
            imbalance_ratio=args.imbalance_ratio, test_per_class=args.test_per_class, seed=args.seed,
        )
    if args.source == "cifar100_lt":
        return load_cifar100_lt(args.root, imbalance_ratio=args.imbalance_ratio, seed=args.seed)
    lists = {s: getattr(args, s) for s in ("train", "val", "test") if getattr(args, s)}
    if args.source == "lists":
        return load_split_lists(args.name, args.image_root, lists, num_classes=args.num_classes)
    return load_inat2018_json(args.image_root, lists)


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
    lst = sub.add_parser("lists", help="ImageNet-LT / Places-LT / iNat split lists + image root")
    lst.add_argument("--name", required=True)
    lst.add_argument("--num-classes", type=int, default=None, help="default: inferred from the train list")
    inat = sub.add_parser("inat2018", help="iNaturalist 2018 json annotations + image root")
    for p in (lst, inat):
        p.add_argument("--image-root", required=True)
        p.add_argument("--train", required=True)
        p.add_argument("--val")
        p.add_argument("--test")
    for p in (syn, cif, lst, inat):
        p.add_argument("--out", required=True, help="prepared dataset directory to create")
        p.add_argument("--overwrite", action="store_true", help="replace an existing, different prepared dataset")
        p.add_argument("--skip-bad", action="store_true", help="skip (and count) missing/corrupt images instead of failing")
        p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        raw = build_raw(args)
        manifest = prepare_dataset(raw, args.out, overwrite=args.overwrite, skip_bad=args.skip_bad, num_cpus=args.num_cpus)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
