"""Nothing leaks into a prepared dataset: image paths stay in their root (symbolic links followed), no split holds
another split's files or copies of its images, and a hold-out leaves training data. Each refusal comes before any
image is decoded or anything is written; the refusals need no Ray."""
import json
import shutil

import numpy as np
import pytest

from conftest import Script, class_png, write_sorted_list_dataset
from lade_core.data import DataError, open_prepared
from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.sources import (
    RawSplit,
    holdout_validation,
    load_image_folder,
    load_inat2018_json,
    load_split_lists,
    with_validation,
)

prepare_data = Script("prepare_data")


@pytest.fixture
def outside(tmp_path):
    """A folder beside the image root with an image nobody meant to train on."""
    secret = tmp_path / "elsewhere" / "secret.png"
    class_png(secret, 1, 12, np.random.default_rng(9))
    return secret.parent


def test_a_list_path_through_a_symlink_out_of_the_root_is_refused_by_name(tmp_path, outside):
    lists = write_sorted_list_dataset(tmp_path, [4, 3], test_per_class=1, size=12)
    root = tmp_path / "images"
    (root / "a").mkdir()
    (root / "a" / "up").symlink_to(outside, target_is_directory=True)
    lists["train"].write_text(lists["train"].read_text() + "a/up/secret.png 1\n")
    with pytest.raises(DataError, match=r"train\.txt: image path 'a/up/secret\.png' \(entry 8\) leads through a "
                                        r"symbolic link to .*elsewhere/secret\.png, outside the image root"):
        load_split_lists("mine", root, lists)
    # The file itself a link out: the same.
    (root / "a" / "up").unlink()
    (root / "a" / "leak.png").symlink_to(outside / "secret.png")
    lists["train"].write_text(lists["train"].read_text().replace("a/up/secret.png", "a/leak.png"))
    with pytest.raises(DataError, match=r"'a/leak\.png' \(entry 8\) leads through a symbolic link"):
        load_split_lists("mine", root, lists)


def test_links_that_stay_inside_the_root_and_a_root_that_is_a_link_are_fine(tmp_path):
    lists = write_sorted_list_dataset(tmp_path, [4, 3], test_per_class=1, size=12)
    real = tmp_path / "images"
    (real / "alias").symlink_to(real / "train", target_is_directory=True)  # inside the root: allowed
    lists["train"].write_text(lists["train"].read_text().replace("train/class_01", "alias/class_01"))
    (tmp_path / "linked_root").symlink_to(real, target_is_directory=True)  # e.g. ~/datasets -> /mnt/data
    raw = load_split_lists("mine", tmp_path / "linked_root", lists)
    assert sorted(set(p.split("/")[0] for p in raw.splits["train"].paths)) == ["alias", "train"]


def test_an_image_folder_class_that_links_out_is_refused(tmp_path, outside):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        for k in range(3):
            class_png(tmp_path / "root" / "train" / name / f"{k}.png", 0, 12, rng)
    (tmp_path / "root" / "train" / "zebra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match=r"root/train: image path 'train/zebra/secret\.png' \(entry 7\) leads through "
                                        r"a symbolic link to .*elsewhere/secret\.png"):
        load_image_folder(tmp_path / "root")
    # As a user runs it: one error, exit 2, nothing written.
    out = tmp_path / "out"
    assert prepare_data.main(["imagefolder", "--root", str(tmp_path / "root"), "--out", str(out)]) == 2
    assert not out.exists()


def test_an_inat_file_name_that_links_out_is_refused(tmp_path, outside):
    root = tmp_path / "inat"
    (root / "train_val2018" / "Plantae").mkdir(parents=True)
    (root / "train_val2018" / "Plantae" / "7").symlink_to(outside, target_is_directory=True)
    ann = {"images": [{"id": 1, "file_name": "train_val2018/Plantae/7/secret.png"}],
           "annotations": [{"image_id": 1, "category_id": 0}], "categories": [{"id": 0, "name": "x"}]}
    (tmp_path / "train2018.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"train2018\.json: image path 'train_val2018/Plantae/7/secret\.png' "
                                        r"\(entry 1\) leads through a symbolic link"):
        load_inat2018_json(root, {"train": tmp_path / "train2018.json"})


def test_test_list_equal_to_the_train_list_is_refused_before_any_image_is_read(tmp_path):
    lists = write_sorted_list_dataset(tmp_path, [5, 4], test_per_class=1, size=12)
    raw = with_validation(load_split_lists("mine", tmp_path / "images", {"train": lists["train"],
                                                                          "test": lists["train"]}),
                          val_per_class=1, min_train_per_class=2, seed=0)
    # train.txt as --test: the test split holds all 9 images, the hold-out's 2 of them in val, 7 in train.
    with pytest.raises(DataError, match=r"train and test share 7 image files \(e\.g\. \['train/class_0\d/000\d\.png'"
                                        r".*val and test share 2 image files"):
        prepare_dataset(raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # The CLI: the same refusal, exit 2.
    argv = ["lists", "--name", "mine", "--image-root", str(tmp_path / "images"), "--train", str(lists["train"]),
            "--test", str(lists["train"]), "--out", str(tmp_path / "out")]
    assert prepare_data.main(argv) == 2


def test_the_same_file_reached_through_a_link_in_two_splits_is_one_file(tmp_path):
    lists = write_sorted_list_dataset(tmp_path, [5, 4], test_per_class=1, size=12)
    root = tmp_path / "images"
    (root / "test" / "class_00" / "0000.png").unlink()
    (root / "test" / "class_00" / "0000.png").symlink_to(root / "train" / "class_00" / "0003.png")
    raw = with_validation(load_split_lists("mine", root, lists), val_per_class=1, min_train_per_class=2, seed=0)
    with pytest.raises(DataError, match=r"(train|val) and test share 1 image files \(e\.g\. \['test/class_00/"
                                        r"0000\.png'\]\)"):
        prepare_dataset(raw, tmp_path / "out", progress=False)


def _folder_with_copied_test_images(tmp_path, copies: int):
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    for name in ("ant", "bee"):
        for k in range(6):
            class_png(root / "train" / name / f"{k}.png", ord(name[0]), 12, rng)
        for k in range(2):
            class_png(root / "test" / name / f"t{k}.png", ord(name[0]), 12, rng)
    for k in range(copies):  # a test folder holding copies of training images
        shutil.copy(root / "train" / "bee" / f"{k}.png", root / "test" / "bee" / f"copy{k}.png")
    return root


def test_copies_of_training_images_in_the_test_folder_are_refused_naming_them(tmp_path):
    root = _folder_with_copied_test_images(tmp_path, copies=3)
    raw = with_validation(load_image_folder(root), val_per_class=1, min_train_per_class=2, seed=0)
    n_val_copies = sum(p in {f"train/bee/{k}.png" for k in range(3)} for p in raw.splits["val"].paths)
    with pytest.raises(DataError, match=(rf"train and test share {3 - n_val_copies} images with identical bytes.*"
                                         r"test test/bee/copy\d\.png.*pass --allow-duplicates")):
        prepare_dataset(raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_allow_duplicates_keeps_them_and_says_how_many(tmp_path, ray_local, capsys):
    root = _folder_with_copied_test_images(tmp_path, copies=2)
    raw = with_validation(load_image_folder(root), val_per_class=1, min_train_per_class=2, seed=0)
    manifest = prepare_dataset(raw, tmp_path / "out", allow_duplicates=True, progress=False)
    assert manifest["duplicates"]["count"] == 2
    assert sum(manifest["duplicates"]["pairs"].values()) == 2
    assert {e["test"] for e in manifest["duplicates"]["examples"]} == {"test/bee/copy0.png", "test/bee/copy1.png"}
    assert "kept 2 images whose bytes stand in two splits" in capsys.readouterr().err
    assert open_prepared(tmp_path / "out").manifest["duplicates"] == manifest["duplicates"]
    # Without the flag, a fresh preparation of the same folder is refused.
    with pytest.raises(DataError, match="identical bytes"):
        prepare_dataset(raw, tmp_path / "again", progress=False)


def test_the_default_holdout_leaves_a_small_dataset_its_training_images():
    """12 images in each of 2 classes: 2 per class (20 %) go to validation, 10 stay for training (it was 10 and 2)."""
    train = RawSplit(labels=np.repeat([0, 1], 12), paths=[f"{k}.png" for k in range(24)])
    kept, val, record = holdout_validation(train, 2)
    assert np.bincount(kept.labels).tolist() == [10, 10] and np.bincount(val.labels).tolist() == [2, 2]
    assert record["per_class"] == 2 and record["images"] == 4 and record["share_of_train"] == round(4 / 24, 4)
    assert not set(kept.paths) & set(val.paths)
    # Never more than 20 a class, at least 1 (5 images: 1, 4 left), and --val-per-class still takes more.
    big = RawSplit(labels=np.repeat([0, 1], [400, 300]))
    assert holdout_validation(big, 2)[2]["per_class"] == 20
    assert holdout_validation(RawSplit(labels=np.repeat([0, 1], [5, 9])), 2)[2]["per_class"] == 1
    assert holdout_validation(train, 2, val_per_class=8)[2]["per_class"] == 8


def test_the_summary_says_what_the_holdout_took():
    manifest = {"name": "mine", "num_classes": 2, "imbalance_ratio": 1.0, "transform": "cifar", "image_size": 12,
                "source": {}, "splits": {s: {"num_samples": n, "class_counts": [n // 2] * 2, "skipped": {"count": 0}}
                                         for s, n in (("train", 20), ("val", 4))},
                "validation": {"source": "held out of train (seeded, class-balanced)", "per_class": 2, "images": 4,
                               "share_of_train": 4 / 24}}
    assert "val: held out of train (seeded, class-balanced), 2 per class (4 images, 17% of train)" in \
        summary_line(manifest)
