"""Raw layouts -> prepared Parquet -> Ray Data, on small data written here in each published format."""
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png16, shared_file, split_counts, write_sorted_list_dataset
from lade_core.data import DataError, open_prepared
from lade_core.data.prepare import prepare_dataset
from lade_core.data.sources import load_cifar100_lt, load_inat2018_json, load_split_lists, with_validation
from lade_core.data.synthetic import make_synthetic
from lade_core.math.priors import long_tailed_counts


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
    # Real CIFAR-100 has 500 training images per class; fewer here except for the head class, which the long tail
    # keeps whole (so its val images must come out of its training images).
    per_class_train = [500 if c == 0 else n + 25 for c, n in enumerate(long_tailed_counts(100, 500, 100))]
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
    # The head class gives its 20 val images out of its 500; every other class from images the tail left unused.
    assert ds.class_counts("train") == [480] + long_tailed_counts(100, 500, 100)[1:]
    assert ds.class_counts("val") == [20] * 100
    assert ds.manifest["validation"]["taken_from_train"] == {"0": 20}
    assert ds.manifest["seed"] == 3 and ds.manifest["class_names"][:2] == ["c0", "c1"]
    src = pickle.loads((cifar_root / "train").read_bytes())
    src_images = np.asarray(src["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    rows, val_rows = _rows_by_index(ds, "train"), _rows_by_index(ds, "val")
    assert len(rows) == 10847 - 20 and len(val_rows) == 2000
    assert not set(rows) & set(val_rows)  # val is disjoint from train (and from test: another pickle)
    for i in list(rows)[:50] + list(val_rows)[:50]:
        b, y = rows.get(i) or val_rows[i]
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

def test_committed_split_lists_are_the_published_ones():
    """tests/fixtures/shared holds ../shared/data's lists byte for byte (compared wherever a checkout has both)."""
    import lzma

    from conftest import FIXTURE_DATA, SHARED_DATA

    packed = sorted(FIXTURE_DATA.rglob("*.txt.xz"))
    assert len(packed) == 5
    for xz in packed:
        lines = lzma.decompress(xz.read_bytes()).decode()
        assert lines.count("\n") > 1000 and all(len(line.split()) == 2 for line in lines.splitlines()[:100])
        shared = SHARED_DATA / xz.relative_to(FIXTURE_DATA).with_suffix("")
        if shared.exists():
            assert lines == shared.read_text(), shared


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
    _check_channel_stats(ds)
    lines = lists["train"].read_text().splitlines()
    t = ds.raw_split("train").to_pydict()
    for path, b, y in zip(t["path"], t["image"], t["label"]):
        assert f"{path} {y}" in lines
        assert b == (root / path).read_bytes()  # original JPEG bytes, bit-exact
    batch = ds.ray_dataset("train").take_batch(8)
    assert batch["image"].shape == (8, 3, 224, 224) and batch["image"].dtype == np.uint8  # normalized on the worker


def test_a_bomb_an_animation_and_16_bit_images_through_preparation_and_training_decode(tmp_path, ray_local):
    """Preparation checks every image with the one decoder training uses: a decompression bomb is refused by name
    (skipped with --skip-bad); an animated GIF and a 16-bit PNG pass, and training's decode reads them as 8-bit RGB
    at the crop size, as it does the plain images."""
    root, lines = tmp_path / "images", []
    rng = np.random.default_rng(0)
    for c in range(2):
        for k in range(4):
            rel = f"c{c}/{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / rel)
            lines.append(f"{rel} {c}")
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (40, 220)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    (root / "c0/anim.gif").write_bytes(buf.getvalue())
    (root / "c1/deep.png").write_bytes(png16(rng.integers(0, 65536, (20, 20, 3)).astype(np.uint16)))
    Image.new("L", (9000, 9000)).save(root / "c1/bomb.png")
    lines += ["c0/anim.gif 0", "c1/deep.png 1", "c1/bomb.png 1"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    raw = load_split_lists("odd", root, {"train": tmp_path / "train.txt"}, transform="cifar", image_size=16)
    raw = with_validation(raw, val_per_class=1, min_train_per_class=2, seed=0)
    with pytest.raises(DataError, match="bomb.png .*9000 x 9000 pixels is over the 40-megapixel limit"):
        prepare_dataset(raw, tmp_path / "out", progress=False)
    manifest = prepare_dataset(raw, tmp_path / "out", skip_bad=True, progress=False)
    assert [e["path"] for s in manifest["splits"].values() for e in s["skipped"]["examples"]] == ["c1/bomb.png"]
    ds = open_prepared(tmp_path / "out")
    batch = ds.ray_dataset("train").take_batch(100)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (3, 16, 16)
    assert len(batch["label"]) == sum(s["num_samples"] for k, s in manifest["splits"].items() if k == "train")


def test_prepared_data_is_not_reused_once_its_images_change(places_subset, tmp_path, ray_local, capsys):
    """The fingerprint covers the image root, and a size + mtime digest of every image says when to read them
    again: touched files with the same bytes are no change; new bytes, or another image folder, are refused."""
    import os
    import shutil

    root, lists = places_subset
    out = tmp_path / "out"
    first = prepare_dataset(load_split_lists("places_lt", root, lists), out, progress=False)
    image = root / lists["train"].read_text().split()[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, another time
    assert prepare_dataset(load_split_lists("places_lt", root, lists), out, progress=False) == first
    assert "same images (their file times changed); nothing to do" in capsys.readouterr().err
    _write_jpeg(image, seed=999)  # new pixels at the same path
    with pytest.raises(DataError, match=f"the images under {root} changed since {out} was prepared"):
        prepare_dataset(load_split_lists("places_lt", root, lists), out, progress=False)
    elsewhere = tmp_path / "copy"
    shutil.copytree(root, elsewhere)
    with pytest.raises(DataError, match="already exists and holds a different prepared dataset"):
        prepare_dataset(load_split_lists("places_lt", elsewhere, lists), out, progress=False)
    assert open_prepared(out).manifest["input_hash"] == first["input_hash"]  # nothing was replaced
    renewed = prepare_dataset(load_split_lists("places_lt", root, lists), out, overwrite=True, progress=False)
    assert renewed["input_hash"] != first["input_hash"]


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
    # --overwrite replaces only a prepared dataset: a folder of the user's own files is never deleted.
    with pytest.raises(DataError,
                       match=r"not a prepared dataset; lade never replaces those \(not even with --overwrite\)"):
        prepare_dataset(other, notes, overwrite=True, progress=False)
    assert (notes / "mine.txt").read_text() == "user file"
    # What a killed preparation left beside its output is cleaned on the next run; look-alike user folders stay.
    (tmp_path / ".fresh.tmp-0a1b2c3d").mkdir()
    (tmp_path / ".fresh.tmp-0a1b2c3d" / "part-0.parquet").write_bytes(b"partial")
    (tmp_path / ".fresh.tmp-mine").mkdir()
    prepare_dataset(other, tmp_path / "fresh", progress=False)
    assert not (tmp_path / ".fresh.tmp-0a1b2c3d").exists() and (tmp_path / ".fresh.tmp-mine").exists()


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
        lists["train"].write_text("\n".join(line for line in train if not line.endswith(" 2")))
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
    manifest = prepare_dataset(load_split_lists("places_lt", root, lists), tmp_path / "out", skip_bad=True,
                               progress=False)
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
            for _ in range(n):
                iid = len(images) + (1000 if split == "val" else 0)
                fname = f"{split}_val_images/Plantae/{c}/{iid}.jpg"
                _write_jpeg(root / fname, iid)
                images.append({"id": iid, "file_name": fname, "width": 20, "height": 24})
                anns.append({"id": iid, "image_id": iid, "category_id": c})
        (tmp_path / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                "categories": cats}))
    raw = load_inat2018_json(root, {"train": tmp_path / "train2018.json", "val": tmp_path / "val2018.json"})
    manifest = prepare_dataset(raw, tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["class_counts"] == [5, 3, 1]
    assert manifest["class_names"] == ["species_0", "species_1", "species_2"]
    assert manifest["imbalance_ratio"] == 5.0
    ds = open_prepared(tmp_path / "out")
    assert np.allclose(ds.source_prior.numpy(), [5 / 9, 3 / 9, 1 / 9])


def _check_channel_stats(ds) -> None:
    """The manifest's channel statistics (``normalize: dataset``) are the mean and std of every training pixel."""
    import torch

    from lade_core.data.transforms import decode_rgb

    x = torch.cat([decode_rgb(b).reshape(3, -1) for b in ds.raw_split("train")["image"].to_pylist()], 1).double() / 255
    assert np.allclose(ds.channel_stats["mean"], x.mean(1).numpy(), atol=1e-5)
    assert np.allclose(ds.channel_stats["std"], x.std(1, unbiased=False).numpy(), atol=1e-5)


# ---------- synthetic ----------

def test_synthetic_is_deterministic_and_long_tailed(tmp_path, ray_local):
    a, b = make_synthetic(seed=5), make_synthetic(seed=5)
    assert np.array_equal(a.splits["train"].images, b.splits["train"].images)
    assert not np.array_equal(a.splits["train"].images, make_synthetic(seed=6).splits["train"].images)
    assert np.bincount(a.splits["train"].labels).tolist() == long_tailed_counts(10, 300, 10)
    # Generated grouped by class, as real datasets arrive; prepared in a seeded random row order.
    assert np.all(np.diff(a.splits["train"].labels) >= 0)
    prepare_dataset(a, tmp_path / "syn", progress=False)
    ds = open_prepared(tmp_path / "syn")
    _check_channel_stats(ds)
    assert ds.manifest["native_size"] == [32, 32]
    t = ds.raw_split("train").to_pydict()
    assert sorted(t["index"]) == list(range(len(t["index"]))) and t["index"] != sorted(t["index"])
    assert np.array_equal(np.asarray(t["label"]), a.splits["train"].labels[t["index"]])
    assert ds.manifest["row_order"] == {"shuffled": True, "seed": 5}
    assert len(list((tmp_path / "syn" / "train").glob("*.parquet"))) >= 8  # file order can vary per epoch
    batch = ds.ray_dataset("train").take_batch(16)
    assert batch["image"].shape == (16, 3, 32, 32)


def test_open_prepared_rejects_missing_or_inconsistent_manifest(tmp_path, ray_local):
    with pytest.raises(DataError, match="dataset.json is missing"):
        open_prepared(tmp_path)
    prepare_dataset(make_synthetic(num_classes=3, max_count=6, imbalance_ratio=2, val_per_class=1, test_per_class=2),
                    tmp_path / "s", progress=False)
    m = json.loads((tmp_path / "s" / "dataset.json").read_text())
    m["num_classes"] = 4
    (tmp_path / "s" / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="class counts for 3 classes, manifest says 4"):
        open_prepared(tmp_path / "s")


# ---------- shuffled training epochs on class-sorted data ----------

def _epoch_streams(prepared, epoch: int, seed: int = 0, per_worker_batch: int = 32, in_worker: bool = False
                   ) -> dict[int, list[dict]]:
    """What each of 2 DDP workers gets in one epoch (``training.epoch_batches``, as the worker loop calls it),
    decoded by Ray Data's tasks or, ``in_worker``, by the worker itself."""
    from lade_core.data.augment import resolve_augment
    from lade_core.train.loop import epoch_batches

    augment = resolve_augment(None, "cifar", 8, [(8, 8)])
    return {rank: [{k: b[k].numpy() for k in ("label", "index", "image")} for b in
                   epoch_batches(prepared, augment, None, seed, epoch=epoch, rank=rank, world=2,
                                 batch_size=per_worker_batch, in_worker=in_worker)]
            for rank in (0, 1)}


def _sorted_list_prepared(tmp_path):
    counts = [120, 100, 80, 70, 60, 50, 40, 30, 25, 20]  # 595 images, 10 classes, listed grouped by class
    lists = write_sorted_list_dataset(tmp_path, counts, test_per_class=1, size=8)
    raw = load_split_lists("sorted", tmp_path / "images", lists, transform="cifar")
    from lade_core.data.sources import with_validation

    prepare_dataset(with_validation(raw, val_per_class=2, min_train_per_class=2, seed=0), tmp_path / "out",
                    progress=False)
    return open_prepared(tmp_path / "out")


@pytest.mark.parametrize("in_worker", [False, True], ids=["ray_data", "worker"])
def test_training_epochs_mix_classes_differ_and_split_disjointly(tmp_path, ray_local, in_worker):
    prepared = _sorted_list_prepared(tmp_path)
    n_train = sum(prepared.class_counts("train"))
    orders = []
    for epoch in (0, 1):
        streams = _epoch_streams(prepared, epoch, in_worker=in_worker)
        # Each worker gets a disjoint, equal share (so equal batch counts); together they cover the split once but
        # for the n mod world rows left out of the epoch.
        seen = np.concatenate([b["index"] for r in (0, 1) for b in streams[r]])
        assert len(set(seen.tolist())) == len(seen) and len(seen) == n_train - n_train % 2
        assert [len(b["index"]) for b in streams[0]] == [len(b["index"]) for b in streams[1]]
        # A 64-image global batch (2 x 32) of a 10-class, class-sorted set holds many classes.
        for b0, b1 in zip(streams[0], streams[1]):
            if len(b0["label"]) == len(b1["label"]) == 32:
                assert len(set(b0["label"]) | set(b1["label"])) >= 5, (b0["label"], b1["label"])
        orders.append(streams)
    for r in (0, 1):  # two epochs see different orders, and each worker a different share (file order per epoch)
        first = [np.concatenate([b["index"] for b in orders[e][r]]) for e in (0, 1)]
        assert not np.array_equal(first[0][:64], first[1][:64]) and set(first[0].tolist()) != set(first[1].tolist())
    # The batches follow from (seed, epoch, rank, world) alone: built again (a rerun, or a worker group restored from a
    # checkpoint at that epoch), every batch is the same rows, in the same order, with the same augmented pixels.
    for epoch in (1, 0):
        again = _epoch_streams(open_prepared(tmp_path / "out"), epoch, in_worker=in_worker)
        for r in (0, 1):
            assert len(again[r]) == len(orders[epoch][r])
            for a, b in zip(again[r], orders[epoch][r]):
                assert all(np.array_equal(a[k], b[k]) for k in ("index", "label", "image"))
    other_seed = _epoch_streams(prepared, 0, seed=1, in_worker=in_worker)
    assert not np.array_equal(other_seed[0][0]["index"], orders[0][0][0]["index"])


def test_a_worker_decoding_its_own_rows_gets_what_ray_data_gives_it(tmp_path, ray_local, monkeypatch):
    """``decode: worker`` (the default on CPUs) reads the same rows of each rank's epoch as Ray Data's tasks would
    hand it, with the same augmented pixels per sample (the same seeds), and the same validation share, without
    building a Ray Dataset; only the local shuffle draws its own order."""
    from lade_core.data import PreparedDataset

    prepared = _sorted_list_prepared(tmp_path)
    with monkeypatch.context() as m:  # the worker's path must never reach Ray Data's read
        m.setattr(PreparedDataset, "encoded_dataset", lambda *a, **k: pytest.fail("a Ray Dataset was built"))
        mine = _epoch_streams(prepared, 1, in_worker=True)
        shares = {r: list(prepared.batches("val", batch_size=5, in_worker=True, shard=(r, 2))) for r in (0, 1)}
    theirs = _epoch_streams(prepared, 1, in_worker=False)
    for r in (0, 1):
        rows = [np.concatenate([b[k] for b in s[r]]) for s in (mine, theirs) for k in ("index", "label", "image")]
        a, b = np.argsort(rows[0]), np.argsort(rows[3])
        for k in range(3):
            assert np.array_equal(rows[k][a], rows[3 + k][b])  # per sample: index, label and augmented pixels
        assert [len(x["index"]) for x in mine[r]] == [len(x["index"]) for x in theirs[r]]  # the same batch sizes
        assert not np.array_equal(rows[0], rows[3])  # two shuffles: the order is each path's own
        val = [np.concatenate([b[k].numpy() for b in got]) for got in (
            shares[r], prepared.batches("val", batch_size=5, shard=(r, 2))) for k in ("index", "image")]
        a, b = np.argsort(val[0]), np.argsort(val[2])
        assert np.array_equal(val[0][a], val[2][b]) and np.array_equal(val[1][a], val[3][b])
        assert set((val[0] % 2).tolist()) == {r}


def test_resume_epoch_reads_the_latest_registered_checkpoint(tmp_path):
    from lade_core.train.checkpoint import resume_epoch

    assert resume_epoch(str(tmp_path / "new_run")) == 0 and resume_epoch(None) == 0
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "c", "metrics": {"epoch": 3}}}))
    assert resume_epoch(str(tmp_path)) == 4


def test_ray_data_task_workers_stay_warm_between_training_epochs(ray_local, tmp_path):
    """The local Ray keeps Ray Data's task workers alive from one epoch to the next. Beside the training actors
    and the split coordinator, Ray's default limit (the CPU count) kills each read task's worker a second after
    its epoch, and every epoch starts fresh processes that import torch again (bench/README.md: 13 s of a small
    epoch's 15 s)."""
    import json
    import os
    import time

    import ray.data
    import ray.train
    import ray.train.torch

    def pid(batch):
        return {"pid": [os.getpid()] * len(batch["id"])}

    def loop(config):
        shard, seen = ray.train.get_dataset_shard("train"), []
        for _ in range(2):
            pids = {int(p) for b in shard.iter_batches(batch_size=4) for p in b["pid"]}
            val = ray.data.range(16, override_num_blocks=8).map_batches(pid, batch_size=None)  # each rank's val pass
            seen.append(pids | {int(p) for b in val.iter_batches(batch_size=4) for p in b["pid"]})
            time.sleep(2)  # an epoch's compute: longer than Ray's idle-worker grace period (1 s)
        if ray.train.get_context().get_world_rank() == 0:
            (tmp_path / "pids.json").write_text(json.dumps([sorted(seen[0]), sorted(seen[1])]))

    ds = ray.data.range(64, override_num_blocks=16).map_batches(pid, batch_size=None)
    ray.train.torch.TorchTrainer(loop, datasets={"train": ds}, scaling_config=ray.train.ScalingConfig(num_workers=2),
                                 run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="warm")).fit()
    first, second = (set(p) for p in json.loads((tmp_path / "pids.json").read_text()))
    # The second epoch's reads run in processes of the first (Ray may still start one more); under Ray's default
    # limit every one of them was a new process.
    assert first & second, (first, second)


def test_a_ray_data_read_decodes_inside_its_read_tasks_where_files_cover_the_cpus(ray_local, tmp_path):
    """With at least as many shard files as CPUs, each read task reads one file and decodes it (read and decode
    fused: no encoded bytes through the object store, +25-30 % img/s, bench/README.md); with fewer, Ray Data's
    split spreads a file's rows over several decode tasks. Ray's default (~1 MB blocks, >= 2 per CPU) would split
    the 4-file training read as well, and a split read does not fuse with the decode."""
    raw = make_synthetic(num_classes=4, image_size=16, max_count=64, imbalance_ratio=1, test_per_class=8, seed=0)
    prepare_dataset(raw, tmp_path / "data", progress=False)
    ds = open_prepared(tmp_path / "data")
    assert len(list((tmp_path / "data" / "train").glob("*.parquet"))) == 4  # 256 rows, 64 per file: 4 CPUs' worth
    assert len(list((tmp_path / "data" / "test").glob("*.parquet"))) == 1
    plans = {}
    for split in ("train", "test"):
        read = ds.ray_dataset(split)
        assert sum(len(b["label"]) for b in read.iter_batches(batch_size=64)) == {"train": 256, "test": 32}[split]
        plans[split] = read.stats()
    assert "ReadParquet->MapBatches(decode_augment_chunks)" in plans["train"], plans["train"][:400]
    assert "SplitBlocks" not in plans["train"], plans["train"][:400]
    assert "SplitBlocks" in plans["test"], plans["test"][:400]  # one file, 4 CPUs: Ray splits it
