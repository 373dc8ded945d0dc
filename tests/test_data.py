"""Raw layouts -> prepared Parquet -> Ray Data, on small data written here in each published format."""
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_file, split_counts
from lade_core.data import DataError, open_prepared
from lade_core.data.prepare import prepare_dataset
from lade_core.data.sources import load_cifar100_lt, load_inat2018_json, load_split_lists
from lade_core.data.synthetic import make_synthetic
from lade_core.priors import long_tailed_counts


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def _rows_by_index(prepared, split):
    t = prepared.raw_split(split).to_pydict()
    return {i: (b, y) for i, b, y in zip(t["index"], t["image"], t["label"])}


# ---------- CIFAR-100-LT ----------

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Fake cifar-100-python pickles with the real keys and shapes (fewer images than the real ones)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    per_class_train = [n + 3 for n in long_tailed_counts(100, 500, 100)]
    y_tr = rng.permutation(np.repeat(np.arange(100), per_class_train))
    y_te = np.repeat(np.arange(100), 2)
    for name, y in (("train", y_tr), ("test", y_te)):
        d = {"data": rng.integers(0, 256, (y.size, 3072), dtype=np.uint8), "fine_labels": y.tolist(),
             "coarse_labels": (y // 5).tolist(), "filenames": [f"{i}.png" for i in range(y.size)], "batch_label": name}
        (root / name).write_bytes(pickle.dumps(d))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (root / "meta").write_bytes(pickle.dumps(meta))
    return root


def test_cifar100_lt_prepare_roundtrip(cifar_root, tmp_path, ray_local):
    raw = load_cifar100_lt(cifar_root.parent, imbalance_ratio=100, seed=3)
    prepare_dataset(raw, tmp_path / "cifar", progress=False)
    ds = open_prepared(tmp_path / "cifar")
    assert ds.class_counts("train") == long_tailed_counts(100, 500, 100)
    assert ds.manifest["seed"] == 3 and ds.manifest["class_names"][:2] == ["c0", "c1"]
    src = pickle.loads((cifar_root / "train").read_bytes())
    src_images = np.asarray(src["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    rows = _rows_by_index(ds, "train")
    assert len(rows) == 10847
    for i in list(rows)[:50]:
        b, y = rows[i]
        assert y == src["fine_labels"][i]
        assert np.array_equal(_decode(b), src_images[i])
    # Through Ray Data (decode + eval transform): same labels and counts.
    labels = np.concatenate([b["label"] for b in ds.ray_dataset("test").iter_batches(batch_size=100)])
    assert np.bincount(labels, minlength=100).tolist() == [2] * 100
    # A different seed picks a different long-tailed subset.
    other = load_cifar100_lt(cifar_root, imbalance_ratio=100, seed=4)
    assert not np.array_equal(other.splits["train"].index, raw.splits["train"].index)


def test_cifar_missing_pickle(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DataError, match="missing CIFAR pickle: .*train"):
        load_cifar100_lt(tmp_path)


# ---------- split lists (Places-LT / ImageNet-LT layout) ----------

def test_real_split_lists_parse_to_published_counts():
    lists = {s: shared_file("Places_LT", f"Places_LT_{s}.txt") for s in ("train", "val", "test")}
    raw = load_split_lists("places_lt", "/nonexistent", lists)
    counts = np.bincount(raw.splits["train"].labels)
    assert raw.num_classes == 365 and counts.sum() == 62500 and counts.max() == 4980 and counts.min() == 5
    assert counts.tolist() == split_counts(lists["train"])
    assert np.bincount(raw.splits["test"].labels).tolist() == [100] * 365
    inet = load_split_lists("imagenet_lt", "/x", {"train": shared_file("ImageNet_LT", "ImageNet_LT_val.txt"),
                                                 "test": shared_file("ImageNet_LT", "ImageNet_LT_test.txt")})
    assert inet.num_classes == 1000 and np.bincount(inet.splits["test"].labels).tolist() == [50] * 1000


def _write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")


@pytest.fixture
def places_subset(tmp_path):
    """Real Places-LT lines for classes 0-4 with placeholder JPEGs at their exact relative paths."""
    root, lists = tmp_path / "places365", {}
    for split, per_class in (("train", 4), ("val", 2)):
        lines = shared_file("Places_LT", f"Places_LT_{split}.txt").read_text().splitlines()
        kept, taken = [], {}
        for line in lines:
            y = int(line.split()[1])
            if y < 5 and taken.get(y, 0) < per_class:
                taken[y] = taken.get(y, 0) + 1
                kept.append(line)
                _write_jpeg(root / line.split()[0], seed=len(kept) + 1000 * (split == "val"))
        lists[split] = tmp_path / f"Places_LT_{split}.txt"
        lists[split].write_text("\n".join(kept) + "\n")
    return root, lists


def test_split_list_prepare_roundtrip(places_subset, tmp_path, ray_local):
    root, lists = places_subset
    manifest = prepare_dataset(load_split_lists("places_lt", root, lists), tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["class_counts"] == [4] * 5
    ds = open_prepared(tmp_path / "out")
    lines = lists["train"].read_text().splitlines()
    t = ds.raw_split("train").to_pydict()
    for path, b, y in zip(t["path"], t["image"], t["label"]):
        assert f"{path} {y}" in lines
        assert b == (root / path).read_bytes()  # original JPEG bytes, bit-exact
    batch = ds.ray_dataset("train").take_batch(8)
    assert batch["image"].shape == (8, 3, 224, 224) and batch["image"].dtype == np.float32


def test_prepare_is_idempotent_and_never_overwrites_silently(places_subset, tmp_path, ray_local):
    root, lists = places_subset
    out = tmp_path / "out"
    first = prepare_dataset(load_split_lists("places_lt", root, lists), out, progress=False)
    shards = sorted(p.name for p in (out / "train").iterdir())
    again = prepare_dataset(load_split_lists("places_lt", root, lists), out, progress=False)
    assert again == first and sorted(p.name for p in (out / "train").iterdir()) == shards
    other = make_synthetic(num_classes=3, max_count=6, imbalance_ratio=2, val_per_class=1, test_per_class=2)
    with pytest.raises(DataError, match="already exists and holds a different prepared dataset"):
        prepare_dataset(other, out, progress=False)
    assert open_prepared(out).name == "places_lt"
    prepare_dataset(other, out, overwrite=True, progress=False)
    assert open_prepared(out).num_classes == 3
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("user file")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_dataset(other, notes, progress=False)
    assert (notes / "mine.txt").read_text() == "user file"


@pytest.mark.parametrize(
    "mutate, match",
    [
        ("missing", r"missing image file"),
        ("corrupt", r"undecodable image"),
        ("label", r"label 7 at sample .* outside \[0, 5\)"),
        ("malformed", r":3: malformed line"),
        ("empty_class", r"zero training images: class indices \[2\]"),
        ("mismatch", r"mismatched class count between splits: train has 5 classes, val has 6"),
    ],
)
def test_bad_input_errors_before_anything_is_written(places_subset, tmp_path, mutate, match):
    root, lists = places_subset
    train = lists["train"].read_text().splitlines()
    if mutate == "missing":
        (root / train[1].split()[0]).unlink()
    elif mutate == "corrupt":
        (root / train[1].split()[0]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif mutate == "label":
        lists["val"].write_text(lists["val"].read_text() + f"{train[0].split()[0]} 7\n")
    elif mutate == "malformed":
        train[2] = "no_label_here.jpg"
        lists["train"].write_text("\n".join(train))
    elif mutate == "empty_class":
        lists["train"].write_text("\n".join(l for l in train if not l.endswith(" 2")))
    elif mutate == "mismatch":
        lists["val"].write_text(lists["val"].read_text() + f"{train[0].split()[0]} 5\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        num_classes = 5 if mutate == "label" else None
        prepare_dataset(load_split_lists("places_lt", root, lists, num_classes=num_classes), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_skip_bad_counts_in_manifest(places_subset, tmp_path, ray_local):
    root, lists = places_subset
    bad = lists["train"].read_text().splitlines()[1].split()[0]
    (root / bad).write_bytes(b"garbage")
    manifest = prepare_dataset(load_split_lists("places_lt", root, lists), tmp_path / "out", skip_bad=True, progress=False)
    assert manifest["splits"]["train"]["skipped"]["count"] == 1
    assert manifest["splits"]["train"]["skipped"]["examples"][0]["path"] == bad
    assert manifest["splits"]["train"]["num_samples"] == 19


# ---------- iNaturalist 2018 json ----------

def test_inat2018_json_roundtrip(tmp_path, ray_local):
    root = tmp_path / "inat"
    cats = [{"id": i, "name": f"species_{i}"} for i in range(3)]
    for split, per in (("train", [5, 3, 1]), ("val", [1, 1, 1])):
        images, anns = [], []
        for c, n in enumerate(per):
            for k in range(n):
                iid = len(images) + (1000 if split == "val" else 0)
                fname = f"{split}_val_images/Plantae/{c}/{iid}.jpg"
                _write_jpeg(root / fname, iid)
                images.append({"id": iid, "file_name": fname, "width": 20, "height": 24})
                anns.append({"id": iid, "image_id": iid, "category_id": c})
        (tmp_path / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    raw = load_inat2018_json(root, {"train": tmp_path / "train2018.json", "val": tmp_path / "val2018.json"})
    manifest = prepare_dataset(raw, tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["class_counts"] == [5, 3, 1]
    assert manifest["class_names"] == ["species_0", "species_1", "species_2"]
    assert manifest["imbalance_ratio"] == 5.0
    ds = open_prepared(tmp_path / "out")
    assert np.allclose(ds.source_prior.numpy(), [5 / 9, 3 / 9, 1 / 9])


# ---------- synthetic ----------

def test_synthetic_is_deterministic_and_long_tailed(tmp_path, ray_local):
    a, b = make_synthetic(seed=5), make_synthetic(seed=5)
    assert np.array_equal(a.splits["train"].images, b.splits["train"].images)
    assert not np.array_equal(a.splits["train"].images, make_synthetic(seed=6).splits["train"].images)
    assert np.bincount(a.splits["train"].labels).tolist() == long_tailed_counts(10, 300, 10)
    prepare_dataset(a, tmp_path / "syn", progress=False)
    ds = open_prepared(tmp_path / "syn")
    batch = ds.ray_dataset("train").take_batch(16)
    assert batch["image"].shape == (16, 3, 32, 32)


def test_open_prepared_rejects_missing_or_inconsistent_manifest(tmp_path, ray_local):
    with pytest.raises(DataError, match="dataset.json is missing"):
        open_prepared(tmp_path)
    prepare_dataset(make_synthetic(num_classes=3, max_count=6, imbalance_ratio=2, val_per_class=1, test_per_class=2), tmp_path / "s", progress=False)
    m = json.loads((tmp_path / "s" / "dataset.json").read_text())
    m["num_classes"] = 4
    (tmp_path / "s" / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="class counts for 3 classes, manifest says 4"):
        open_prepared(tmp_path / "s")
