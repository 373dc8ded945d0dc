"""Raw dataset -> prepared dataset directory: Parquet shards per split (image files read and written with Ray Data,
in-memory arrays written by this process) + dataset.json.

All checks (missing or undecodable images, labels, empty classes) run before any shard is written. The output is
built in a temporary sibling directory and renamed into place at the end, so a prepared directory is either
complete or absent. An existing directory is reused only if it was prepared from the same inputs and options.

Rows are written in a seeded random order, not the order the source lists them in. Real long-tailed datasets
arrive grouped by class (the Places-LT / ImageNet-LT lists, an ImageFolder tree, CIFAR-100-LT as built here); in
that order every Parquet block, and so every training batch the streaming reader makes from a few blocks, would
hold one or two classes. After the permutation every block is a uniform sample of the split, so training only
has to vary block order and mix locally per epoch (``PreparedDataset.rank_batches``), never shuffle globally.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from lade_core import __version__
from lade_core.data.augment import ChannelStats
from lade_core.data.sources import DataError, RawDataset, RawSplit, check_no_empty_class, resolved_paths
from lade_core.data.transforms import decode_rgb
from lade_core.runtime.locks import exclusive

MANIFEST = "dataset.json"
# Bumped when the on-disk layout changes meaning (2: rows in seeded random order, a val split always present), so
# a directory prepared by an older lade is not mistaken for an up-to-date one.
LAYOUT_VERSION = 2


def _encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _check_image_file(path: Path, stats: ChannelStats | None = None
                      ) -> tuple[bytes | None, str | None, tuple[int, int] | None, torch.Tensor | None]:
    """Read and decode one image; return (bytes, None, (H, W), the image if ``stats``) or (None, why, None, None)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing image file", None, None
    except OSError as e:
        return None, f"unreadable image file ({e})", None, None
    try:
        image = decode_rgb(data)
    except Exception as e:  # noqa: BLE001 - the decoder raises several types for corrupt or unsupported data
        return None, f"undecodable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", None, None
    return data, None, tuple(image.shape[1:]), ChannelStats.sums(image) if stats is not None else None


def _fingerprint(raw: RawDataset, skip_bad: bool) -> str:
    key = {"name": raw.name, "kind": raw.source.get("kind"), "options": raw.options, "inputs": raw.input_hash,
           "transform": raw.transform, "image_size": raw.image_size, "skip_bad": skip_bad, "layout": LAYOUT_VERSION,
           # The same lists over another image folder are other data.
           "image_root": str(Path(raw.image_root).resolve()) if raw.image_root is not None else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def image_stats(raw: RawDataset) -> str | None:
    """A cheap digest of every image file's size and modification time (no reads): whether the images may have
    changed since a preparation. None for in-memory datasets."""
    if raw.image_root is None:
        return None
    root, h = Path(raw.image_root), hashlib.sha256()
    for split in sorted(raw.splits):
        for p in raw.splits[split].paths:
            try:
                st = (root / p).stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _validate_files(raw: RawDataset, skip_bad: bool, progress: bool
                    ) -> tuple[dict[str, RawSplit], dict, str, set, ChannelStats, dict[str, dict[bytes, str]]]:
    """Decode every image once; returns kept splits, per-split bad-sample report, a hash of image bytes, the
    set of (H, W) sizes seen, the training split's channel statistics and each split's image digests (SHA-256 of
    the bytes -> the first path with them, for ``check_no_duplicates``)."""
    root = Path(raw.image_root or ".")
    h = hashlib.sha256(raw.input_hash.encode())
    kept, skipped, sizes, stats, digests = {}, {}, set(), ChannelStats(), {}
    for split, rs in raw.splits.items():
        bad, of_digests = [], digests.setdefault(split, {})
        of_split = stats if split == "train" else None
        with ThreadPoolExecutor(max_workers=8) as pool:
            checked = pool.map(partial(_check_image_file, stats=of_split), (root / p for p in rs.paths))
            for i, (data, why, shape, sums) in enumerate(tqdm(checked, total=len(rs.paths), desc=f"checking {split}",
                                                              unit="img", disable=not progress, file=sys.stderr)):
                if why:
                    bad.append((i, why))
                else:
                    digest = hashlib.sha256(data).digest()
                    h.update(digest)
                    of_digests.setdefault(digest, rs.paths[i])
                    sizes.add(shape)
                    if sums is not None:
                        stats.add_sums(*sums)
        if bad and not skip_bad:
            shown = "; ".join(f"{root / rs.paths[i]} (line {rs.index[i] + 1}): {why}" for i, why in bad[:5])
            raise DataError(f"{split}: {len(bad)} bad images, e.g. {shown}. Fix them or pass --skip-bad")
        keep = np.setdiff1d(np.arange(rs.labels.size), [i for i, _ in bad])
        kept[split] = rs.take(keep)
        skipped[split] = {"count": len(bad), "examples": [{"path": rs.paths[i], "why": why} for i, why in bad[:20]]}
    return kept, skipped, h.hexdigest(), sizes, stats, digests


def check_disjoint_files(raw: RawDataset) -> None:
    """No image file in two splits (a test list that is the train list, a hold-out from a list naming a file twice):
    every later accuracy would be measured on training images. Paths are compared as the reader opens them (links
    followed). Checked before any image is read; the error names the splits, how many files and which."""
    if raw.image_root is None:
        return
    owner: dict[str, tuple[str, str]] = {}
    shared: dict[tuple[str, str], list[str]] = {}
    for split, rs in raw.splits.items():
        for p, real in zip(rs.paths, resolved_paths(rs.paths, raw.image_root)):
            first = owner.setdefault(real, (split, p))
            if first[0] != split:
                shared.setdefault((first[0], split), []).append(p)
    if shared:
        said = "; ".join(f"{a} and {b} share {len(ps)} image files (e.g. {ps[:3]})" for (a, b), ps in shared.items())
        raise DataError(f"{said}: a split must not hold another split's images; fix the lists or folders")


def check_no_duplicates(digests: dict[str, dict[bytes, str]], allow: bool) -> dict:
    """Images with identical bytes in two splits (copies of train images in a test folder): refused unless ``allow``
    (``--allow-duplicates``); returns the manifest's record {"count", "pairs", "examples"} of what was kept."""
    splits = list(digests)
    pairs, examples = {}, []
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            common = digests[a].keys() & digests[b].keys()
            if common:
                pairs[f"{a}/{b}"] = len(common)
                examples += [{a: digests[a][d], b: digests[b][d]} for d in sorted(common)[:5]]
    if pairs and not allow:
        said = "; ".join(f"{pair.replace('/', ' and ')} share {n} images with identical bytes" for pair, n in
                         pairs.items())
        shown = ", ".join(" = ".join(f"{s} {p}" for s, p in e.items()) for e in examples[:3])
        raise DataError(f"{said} (e.g. {shown}): scores on them measure memory, not recognition; remove the copies, "
                        "or pass --allow-duplicates to keep them (counted in dataset.json)")
    if pairs:
        print(f"warning: kept {sum(pairs.values())} images whose bytes stand in two splits ({pairs}); "
              "--allow-duplicates", file=sys.stderr)
    return {"count": sum(pairs.values()), "pairs": pairs, "examples": examples}


def _class_counts(split: RawSplit, num_classes: int) -> list[int]:
    return np.bincount(split.labels, minlength=num_classes).tolist()


def _write_split(rs: RawSplit, out: Path, image_root: Path | None, rows_per_shard: int, progress: bool,
                 name: str) -> None:
    if rs.images is not None:
        # In-memory arrays (CIFAR's pickles, the synthetic set) are in this process already: encoded and written
        # from here, one shard file per block. Ray Data would only carry them through the object store to write
        # tasks in processes of their own (seconds of a small job on 2 cores, bench/README.md).
        import pyarrow.parquet as pq

        encoded = [_encode_png(img) for img in tqdm(rs.images, desc=f"encoding {name}", unit="img",
                                                      disable=not progress, file=sys.stderr)]
        table = pa.table({"image": pa.array(encoded, pa.binary()), "label": rs.labels, "index": rs.index,
                          "path": pa.array([""] * rs.labels.size)})
        out.mkdir(parents=True)
        for i, block in enumerate(_blocks(table, rows_per_shard)):
            pq.write_table(block, out / f"{i:06d}.parquet")
        return
    import ray.data  # imported here: the math modules and readers must not need Ray

    # Image files: Ray Data reads them where the cluster has CPUs, a block per shard file.
    root = str(image_root)
    items = pa.table({"label": rs.labels, "index": rs.index, "path": rs.paths})

    def read_bytes(batch: dict) -> dict:
        batch["image"] = np.array([Path(root, p).read_bytes() for p in batch["path"]], dtype=object)
        return batch

    ds = ray.data.from_arrow(_blocks(items, rows_per_shard)).map_batches(read_bytes, batch_format="numpy",
                                                                         batch_size=None)
    ds.write_parquet(str(out), min_rows_per_file=rows_per_shard)


def shuffle_rows(rs: RawSplit, seed: int) -> RawSplit:
    """``rs`` in a seeded random row order (see the module docstring for why); ``index`` keeps the source order."""
    return rs.take(np.random.default_rng(seed).permutation(rs.labels.size))


def _read_manifest(out_dir: Path) -> dict | None:
    """The manifest of a prepared dataset in ``out_dir``, or None if the folder is not one."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "fingerprint" in manifest and "splits" in manifest else None


def _remove_leftovers(out_dir: Path) -> None:
    """Folders a killed preparation of ``out_dir`` left beside it (``.<name>.tmp-<hex>``, ``.<name>.old-<hex>``):
    lade made them, under names only it uses, and nothing else points at them."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, tag = leftover.name[len(out_dir.name) + 2:].partition("-")
        if kind in ("tmp", "old") and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """One block per shard file: ``write_parquet`` never splits a block, so one table would be one file."""
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def prepare_dataset(
    raw: RawDataset,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
    allow_duplicates: bool = False,
    rows_per_shard: int = 4096,
    progress: bool = True,
    num_cpus: int | None = None,
) -> dict:
    """Write ``raw`` as a prepared dataset directory and return its manifest (idempotent for the same inputs). One
    preparation of ``out_dir`` at a time (``locks``): a second one is refused, naming the first. Splits that share an
    image file are refused; splits that share an image's bytes too, unless ``allow_duplicates``."""
    out_dir = Path(out_dir).resolve()
    with exclusive(out_dir.parent / f".{out_dir.name}.lock", f"prepared dataset {out_dir}"):
        return _prepare(raw, out_dir, overwrite, skip_bad, allow_duplicates, rows_per_shard, progress, num_cpus)


def _prepare(raw: RawDataset, out_dir: Path, overwrite: bool, skip_bad: bool, allow_duplicates: bool,
             rows_per_shard: int, progress: bool, num_cpus: int | None) -> dict:
    fingerprint = _fingerprint(raw, skip_bad)
    _remove_leftovers(out_dir)
    if out_dir.exists():
        existing = _read_manifest(out_dir)
        if existing is None:
            # --overwrite replaces only what lade wrote: a folder without a prepared dataset's manifest is the user's.
            raise DataError(f"{out_dir} already exists and holds files that are not a prepared dataset; lade never "
                            "replaces those (not even with --overwrite): choose another directory")
        if existing.get("fingerprint") == fingerprint and not overwrite:
            if existing.get("image_stats") == image_stats(raw):
                print(f"{out_dir}: already prepared from the same inputs; nothing to do", file=sys.stderr)
                return existing
            # Sizes or times differ: read the images again; the same bytes (files copied or touched) are no change.
            if _validate_files(raw, skip_bad, progress)[2] == existing.get("input_hash"):
                print(f"{out_dir}: already prepared from the same images (their file times changed); nothing to do",
                      file=sys.stderr)
                return existing
            raise DataError(f"the images under {raw.image_root} changed since {out_dir} was prepared from them; pass "
                            "--overwrite to prepare it again, or choose another directory")
        if not overwrite:
            raise DataError(f"{out_dir} already exists and holds a different prepared dataset "
                            f"({existing.get('name')}); "
                            "choose another directory or pass --overwrite")

    check_disjoint_files(raw)
    splits, skipped = raw.splits, {s: {"count": 0, "examples": []} for s in raw.splits}
    duplicates = {"count": 0, "pairs": {}, "examples": []}
    input_hash, image_size, native_size = raw.input_hash, raw.image_size, None
    if splits["train"].images is not None:
        image_size = image_size or int(splits["train"].images.shape[1])  # native size of CIFAR-family arrays
        native_size = [int(x) for x in splits["train"].images.shape[1:3]]
        stats = ChannelStats()
        for start in range(0, len(splits["train"].images), 1024):
            chunk = torch.from_numpy(np.ascontiguousarray(splits["train"].images[start:start + 1024]))  # [B, H, W, 3]
            stats.add(chunk.permute(3, 0, 1, 2))
    if raw.image_root is not None:
        splits, skipped, input_hash, sizes, stats, digests = _validate_files(raw, skip_bad, progress)
        duplicates = check_no_duplicates(digests, allow_duplicates)
        native_size = [int(x) for x in next(iter(sizes))] if len(sizes) == 1 else None
        if image_size is None and raw.transform == "cifar":
            # The cifar family crops at the native size: one square size, or the user names one.
            if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
                shown = sorted(sizes)[:5]
                raise DataError(f"--transform cifar without --image-size needs images of one square size; found "
                                f"{len(sizes)} sizes (H, W), e.g. {shown}; pass --image-size")
            image_size = int(next(iter(sizes))[0])
    counts = {s: _class_counts(rs, raw.num_classes) for s, rs in splits.items()}
    check_no_empty_class(counts["train"], raw.class_names)
    if "val" not in splits:
        raise DataError(f"{raw.name}: no validation split; a reader must give one (see sources.with_validation)")
    order_seed = int(raw.options.get("seed") or 0)
    if raw.class_names is not None and len(raw.class_names) != raw.num_classes:
        raise DataError(f"{len(raw.class_names)} class names for {raw.num_classes} classes")

    if any(rs.images is None for rs in splits.values()):  # image files are read by Ray Data (_write_split)
        from lade_core.runtime.local_ray import init_ray

        init_ray(num_cpus=num_cpus)  # only now: checks and no-op reruns need no Ray
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split, rs in splits.items():
            # Training reads its shard files in a new order each epoch: at least ~16 files where the split allows.
            per_file = rows_per_shard if split != "train" else min(rows_per_shard, max(64, rs.labels.size // 16))
            _write_split(shuffle_rows(rs, order_seed), tmp / split, Path(raw.image_root) if raw.image_root else None,
                         per_file, progress, split)
        train = counts["train"]
        manifest = {
            "name": raw.name,
            "num_classes": raw.num_classes,
            "class_names": raw.class_names,
            "transform": raw.transform,
            # The crop size training and evaluation use: the one asked for, else the native size of in-memory
            # (CIFAR-family) images; None: the transform family's default (224 for imagenet).
            "image_size": image_size,
            # (H, W) of every image where they all have one size (None: sizes vary): what augment is checked on.
            "native_size": native_size,
            # Per-channel mean and std of the training split on the [0, 1] scale (`normalize: dataset`).
            "channel_stats": stats.result(),
            "validation": raw.validation,
            # Images whose bytes stand in two splits, kept with allow_duplicates (else refused): how many, where.
            "duplicates": duplicates,
            "row_order": {"shuffled": True, "seed": order_seed},
            "layout_version": LAYOUT_VERSION,
            "splits": {s: {"num_samples": int(sum(c)), "class_counts": c, "skipped": skipped[s]}
                       for s, c in counts.items()},
            "imbalance_ratio": max(train) / min(train),
            "source": raw.source,
            "options": raw.options,
            "seed": raw.options.get("seed"),
            "lade_version": __version__,
            "input_hash": input_hash,
            "image_stats": image_stats(raw),
            "fingerprint": fingerprint,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():  # only reached with overwrite=True
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(trash)
            tmp.rename(out_dir)
            shutil.rmtree(trash)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def summary_line(manifest: dict) -> str:
    train = manifest["splits"]["train"]["class_counts"]
    sizes = ", ".join(f"{s} {v['num_samples']}" for s, v in manifest["splits"].items())
    skipped = sum(v["skipped"]["count"] for v in manifest["splits"].values())
    ignored = sum((manifest["source"].get("ignored_files") or {}).values())
    val = manifest.get("validation") or {}
    return (
        f"{manifest['name']}: {manifest['num_classes']} classes; {sizes}; train max {max(train)} / min {min(train)} "
        f"per class (imbalance {manifest['imbalance_ratio']:.1f}); val: {val.get('source', '?')}"
        + (f", {val['per_class']} per class" if "per_class" in val else "")
        + (f" ({val['images']} images, {val['share_of_train']:.0%} of train)" if "share_of_train" in val else "")
        + (f"; transform {manifest['transform']} at {manifest['image_size'] or 'default size'}")
        + (f"; skipped {skipped} bad images" if skipped else "")
        + (f"; ignored {ignored} non-image files" if ignored else "")
    )
