"""A small dataset in Places-LT's published layout, for the method ranking (issue 23) on data shaped like a real one.

What it keeps of Places-LT: the split lists ``Places_LT_{train,val,test}.txt`` (``data_256/<letter>/<scene>/<8
digits>.jpg <label>``, lines grouped by class, labels in the list's alphabetical class order), the real scene names,
the shape of the real long tail (40 of the 365 classes, taken evenly along the ranking of the real training counts,
each keeping its real count / 4, at least 2: 1 245 .. 2 images), a balanced val split of 20 per class as published,
and JPEG images. The test split is balanced, 40 per class (the published one has 100). The images are generated,
32 x 32: each scene is a mix of two colours in stripes of its own orientation and frequency, with clutter and noise,
and neighbouring scenes share a colour, so the classes are learnable but not trivially separable.

  python bench/make_places_lt_mini.py --out DIR        # writes DIR/raw (images + lists), prepares DIR/data/...
  python bench/rank_methods.py --dataset bench/configs/places_lt_mini --workdir DIR

It then runs ``pipelines/prepare_data.py lists`` as a user would on the real Places-LT, into
``DIR/data/places_lt_mini`` (the path bench/configs/places_lt_mini/_base.yaml trains on).
"""
from __future__ import annotations

import argparse
import lzma
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REAL_TRAIN = REPO / "tests" / "fixtures" / "shared" / "Places_LT" / "Places_LT_train.txt.xz"
NUM_CLASSES, SCALE, MIN_TRAIN, VAL, TEST, SIZE = 40, 4, 2, 20, 40, 32
# Each class's two stripe colours (class c shares colour c + 1 with class c + 1) and the pixel grid, drawn once.
PALETTE = np.random.default_rng(1234).uniform(30, 225, (NUM_CLASSES + 1, 3))
GRID_Y, GRID_X = np.mgrid[0:SIZE, 0:SIZE] / SIZE


def real_classes() -> list[tuple[str, int]]:
    """(scene path ``a/airfield``, real training count) of the 40 classes, in the list's label order."""
    counts, names = Counter(), {}
    for line in lzma.open(REAL_TRAIN, "rt"):
        path, label = line.split()
        counts[int(label)] += 1
        names[int(label)] = path.split("/", 1)[1].rsplit("/", 1)[0]  # data_256/a/airfield/x.jpg -> a/airfield
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    picked = sorted(ranked[round(i * (len(ranked) - 1) / (NUM_CLASSES - 1))] for i in range(NUM_CLASSES))
    return [(names[c], counts[c]) for c in picked]


def scene_image(label: int, rng: np.random.Generator) -> Image.Image:
    """Class ``label``'s stripes (orientation and frequency its own, colours shared with its neighbours), at a
    random phase, with a random clutter patch and pixel noise."""
    a, b = PALETTE[label], PALETTE[label + 1]
    angle = np.pi * ((label * 7) % NUM_CLASSES) / NUM_CLASSES
    freq = 2 + (label % 5)
    wave = np.sin(2 * np.pi * freq * (GRID_X * np.cos(angle) + GRID_Y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    mix = (wave[..., None] + 1) / 2
    img = mix * a + (1 - mix) * b + rng.normal(0, 28, (SIZE, SIZE, 3))
    y, x = rng.integers(0, SIZE - 10, 2)
    img[y:y + 10, x:x + 10] = rng.uniform(0, 255, 3)  # clutter
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    classes = real_classes()
    lists = {}
    for split in ("train", "val", "test"):
        lines = []
        for label, (scene, count) in enumerate(classes):
            n = {"train": max(MIN_TRAIN, round(count / SCALE)), "val": VAL, "test": TEST}[split]
            for k in range(n):
                rel = f"data_256/{scene}/{split}_{k:08d}.jpg"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                scene_image(label, rng).save(out / rel, format="JPEG", quality=90)
                lines.append(f"{rel} {label}")
        lists[split] = out / f"Places_LT_{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return lists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the work folder: raw/ and data/places_lt_mini/ go here")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    lists = write(out / "raw")
    n = len(lists["train"].read_text().splitlines())
    print(f"wrote {n} train images of {NUM_CLASSES} classes to {out / 'raw'}", file=sys.stderr)
    subprocess.run([sys.executable, str(REPO / "pipelines" / "prepare_data.py"), "lists", "--name", "places_lt_mini",
                    "--image-root", str(out / "raw"), *(a for s in ("train", "val", "test")
                                                        for a in (f"--{s}", str(lists[s]))),
                    "--transform", "cifar", "--image-size", str(SIZE), "--out", str(out / "data" / "places_lt_mini"),
                    "--num-cpus", "2"], check=True)


if __name__ == "__main__":
    main()
