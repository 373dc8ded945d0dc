"""pipelines/prepare_data.py on a user's own data, as a user runs it (its own process and local Ray): class-sorted
lists without a validation split, ImageFolder, transform and size, and bad input. No Ray in this test process."""

import numpy as np
import pytest

from conftest import Script, class_png, write_sorted_list_dataset
from lade_core.data import open_prepared
from lade_core.data.transforms import decode_rgb, transform_batch
from lade_core.math.priors import long_tailed_counts

prepare_data = Script("prepare_data")
pytestmark = pytest.mark.slow  # each test runs the pipeline, with its own Ray


def test_sorted_list_without_val_gets_a_balanced_holdout_and_its_transform(tmp_path, capsys):

    counts = long_tailed_counts(10, 60, 10)[:-1] + [12]  # 60 .. 7 images per class, and 12 in the last
    lists = write_sorted_list_dataset(tmp_path, counts)
    out = tmp_path / "prepared"
    rc = prepare_data.main(["lists", "--name", "mine", "--image-root", str(tmp_path / "images"), "--train",
                            str(lists["train"]), "--test", str(lists["test"]), "--transform", "cifar",
                            "--image-size", "16", "--out", str(out)])
    assert rc == 0
    ds = open_prepared(out)
    k = max(1, int(0.2 * min(counts)))  # default: 20 % of the smallest class (7 images: 1), never all but 2 of it
    assert k == 1
    assert ds.class_counts("val") == [k] * 10
    assert ds.class_counts("train") == [n - k for n in counts]
    assert ds.manifest["validation"] == {"source": "held out of train (seeded, class-balanced)", "per_class": k,
                                         "min_train_per_class": 2, "seed": 0, "images": 10 * k,
                                         "share_of_train": round(10 * k / sum(counts), 4)}
    assert f"1 per class (10 images, {10 / sum(counts):.0%} of train)" in capsys.readouterr().out
    train_paths = set(ds.raw_split("train")["path"].to_pylist())
    val_paths = set(ds.raw_split("val")["path"].to_pylist())
    assert not train_paths & val_paths and len(train_paths | val_paths) == sum(counts)
    assert ds.manifest["transform"] == "cifar" and ds.image_size == 16
    # The stored size reaches every later use of the dataset: its evaluation transform (read here without Ray:
    # this test process starts none).
    images = [decode_rgb(b) for b in ds.raw_split("val", ["image"]).slice(0, 4)["image"].to_pylist()]
    assert transform_batch(images, ds.eval_transform()).shape == (4, 3, 16, 16)
    assert transform_batch(images[:2], ds.eval_transform(8)).shape == (2, 3, 8, 8)


def test_image_folder_classes_sorted_by_name(tmp_path):

    rng = np.random.default_rng(1)
    names, counts = ["zebra", "ant", "moth"], [9, 6, 3]  # ImageFolder order: ant, moth, zebra
    for name, n in zip(names, counts):
        for k in range(n):
            class_png(tmp_path / "root" / "train" / name / f"{k}.png", names.index(name), 12, rng)
        class_png(tmp_path / "root" / "test" / name / "t.png", names.index(name), 12, rng)
    (tmp_path / "root" / "train" / "ant" / "notes.txt").write_text("not an image")
    rc = prepare_data.main(["imagefolder", "--root", str(tmp_path / "root"), "--val-per-class", "1",
                            "--transform", "cifar", "--out", str(tmp_path / "out")])
    assert rc == 0
    ds = open_prepared(tmp_path / "out")
    assert ds.manifest["class_names"] == ["ant", "moth", "zebra"]
    assert ds.class_counts("train") == [5, 2, 8] and ds.class_counts("val") == [1, 1, 1]
    assert ds.manifest["source"]["ignored_files"] == {"train": 1, "test": 0}
    t = ds.raw_split("train").to_pydict()
    assert all(p.split("/")[1] == ds.manifest["class_names"][y] for p, y in zip(t["path"], t["label"]))


@pytest.mark.parametrize(
    "case, match",
    [
        ("transform", r"unknown transform 'fancy'; choose one of \['cifar', 'imagenet'\]"),
        ("size", r"image size must be an integer >= 8, got 4"),
        ("val_per_class", r"--val-per-class 7 would leave 3 classes below --min-train-per-class 2 \(7: 8 images, "
                          r"8: 7 images, 9: 6 images\); the smallest class allows at most 4"),
        ("min_train", r"holding out even 1 image per class would leave classes below --min-train-per-class 6: 9: 6"),
        ("outside", r"image path '\.\./outside/x\.png' \(entry 1\) leaves the image root"),
        ("empty_folder", r"zero training images: class indices \[2\] \(\['empty'\]\)"),
        ("unknown_class", r"class folders \['ghost'\] are not among the train split's classes"),
    ],
)
def test_user_dataset_bad_input_is_one_clear_error_before_anything_is_written(tmp_path, capsys, case, match):

    out = tmp_path / "out"
    if case in ("empty_folder", "unknown_class"):
        rng = np.random.default_rng(0)
        for name in ("cat", "dog"):
            for k in range(4):
                class_png(tmp_path / "root" / "train" / name / f"{k}.png", 0, 12, rng)
        if case == "empty_folder":
            for f in (tmp_path / "root" / "train" / "dog").iterdir():
                f.unlink()
            (tmp_path / "root" / "train" / "empty").mkdir()
            class_png(tmp_path / "root" / "train" / "dog" / "0.png", 0, 12, rng)
        else:
            class_png(tmp_path / "root" / "test" / "ghost" / "0.png", 0, 12, rng)
        argv = ["imagefolder", "--root", str(tmp_path / "root"), "--out", str(out)]
    else:
        lists = write_sorted_list_dataset(tmp_path, long_tailed_counts(10, 30, 5), test_per_class=1, size=10)
        if case == "outside":
            lists["train"].write_text("../outside/x.png 0\n" + lists["train"].read_text())
        argv = ["lists", "--name", "mine", "--image-root", str(tmp_path / "images"), "--train", str(lists["train"]),
                "--out", str(out)]
        argv += {"transform": ["--transform", "fancy"], "size": ["--image-size", "4"], "outside": [],
                 "val_per_class": ["--val-per-class", "7"], "min_train": ["--min-train-per-class", "6"]}[case]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and __import__("re").search(match, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
