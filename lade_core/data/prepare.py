"""Raw dataset -> prepared dataset directory: Parquet shards per split (written with Ray Data) + dataset.json.

All checks (missing or undecodable images, labels, empty classes) run before any shard is written. The output is
built in a temporary sibling directory and renamed into place at the end, so a prepared directory is either
complete or absent. An existing directory is reused only if it was prepared from the same inputs and options.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from .. import __version__
from .sources import DataError, RawDataset, RawSplit

MANIFEST = "dataset.json"


def _progress(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def _encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _check_image_file(path: Path) -> tuple[bytes | None, str | None]:
    """Read and decode one image; return (bytes, None) or (None, why)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing image file"
    except OSError as e:
        return None, f"unreadable image file ({e})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; still walks the whole stream
            im.convert("RGB").load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        return None, f"undecodable image ({type(e).__name__}: {e})"
    return data, None


def _fingerprint(raw: RawDataset, skip_bad: bool) -> str:
    key = {"name": raw.name, "kind": raw.source.get("kind"), "options": raw.options, "inputs": raw.input_hash,
           "skip_bad": skip_bad}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _validate_files(raw: RawDataset, skip_bad: bool, progress: bool) -> tuple[dict[str, RawSplit], dict, str]:
    """Decode every image once; returns kept splits, per-split bad-sample report, and a hash of image bytes."""
    root = Path(raw.image_root or ".")
    h = hashlib.sha256(raw.input_hash.encode())
    kept, skipped = {}, {}
    for split, rs in raw.splits.items():
        bad = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for i, (data, why) in enumerate(pool.map(lambda p: _check_image_file(root / p), rs.paths)):
                if why:
                    bad.append((i, why))
                else:
                    h.update(hashlib.sha256(data).digest())
                if progress and (i % 500 == 0 or i == len(rs.paths) - 1):
                    _progress(i + 1, len(rs.paths), f"checking {split}")
        if bad and not skip_bad:
            shown = "; ".join(f"{root / rs.paths[i]} (line {rs.index[i] + 1}): {why}" for i, why in bad[:5])
            raise DataError(f"{split}: {len(bad)} bad images, e.g. {shown}. Fix them or pass --skip-bad")
        keep = np.setdiff1d(np.arange(rs.labels.size), [i for i, _ in bad])
        kept[split] = RawSplit(labels=rs.labels[keep], paths=[rs.paths[i] for i in keep], index=rs.index[keep])
        skipped[split] = {"count": len(bad), "examples": [{"path": rs.paths[i], "why": why} for i, why in bad[:20]]}
    return kept, skipped, h.hexdigest()


def _class_counts(split: RawSplit, num_classes: int) -> list[int]:
    return np.bincount(split.labels, minlength=num_classes).tolist()


def _write_split(rs: RawSplit, out: Path, image_root: Path | None, rows_per_shard: int, progress: bool, name: str) -> None:
    import ray.data  # imported here: the math modules and readers must not need Ray

    if rs.images is not None:
        encoded = []
        for i, img in enumerate(rs.images):
            encoded.append(_encode_png(img))
            if progress and (i % 2000 == 0 or i == len(rs.images) - 1):
                _progress(i + 1, len(rs.images), f"encoding {name}")
        table = pa.table({"image": pa.array(encoded, pa.binary()), "label": rs.labels, "index": rs.index,
                          "path": pa.array([""] * rs.labels.size)})
        ds = ray.data.from_arrow(table)
    else:
        root = str(image_root)
        items = pa.table({"label": rs.labels, "index": rs.index, "path": rs.paths})

        def read_bytes(batch: dict) -> dict:
            batch["image"] = np.array([Path(root, p).read_bytes() for p in batch["path"]], dtype=object)
            return batch

        ds = ray.data.from_arrow(items).map_batches(read_bytes, batch_format="numpy", batch_size=256)
    ds.write_parquet(str(out), min_rows_per_file=rows_per_shard)


def prepare_dataset(
    raw: RawDataset,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
    rows_per_shard: int = 4096,
    progress: bool = True,
    num_cpus: int | None = None,
) -> dict:
    """Write ``raw`` as a prepared dataset directory and return its manifest (idempotent for the same inputs)."""
    out_dir = Path(out_dir).resolve()
    fingerprint = _fingerprint(raw, skip_bad)
    if out_dir.exists():
        manifest_path = out_dir / MANIFEST
        existing = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if existing and existing.get("fingerprint") == fingerprint and not overwrite:
            print(f"{out_dir}: already prepared from the same inputs; nothing to do", file=sys.stderr)
            return existing
        if not overwrite:
            what = f"a different prepared dataset ({existing.get('name')})" if existing else "files that are not a prepared dataset"
            raise DataError(f"{out_dir} already exists and holds {what}; choose another directory or pass --overwrite")

    splits, skipped = raw.splits, {s: {"count": 0, "examples": []} for s in raw.splits}
    input_hash = raw.input_hash
    if raw.image_root is not None:
        splits, skipped, input_hash = _validate_files(raw, skip_bad, progress)
    counts = {s: _class_counts(rs, raw.num_classes) for s, rs in splits.items()}
    empty = [c for c, n in enumerate(counts["train"]) if n == 0]
    if empty:
        raise DataError(f"classes with zero training images: class indices {empty[:20]}" + (" ..." if len(empty) > 20 else ""))
    if raw.class_names is not None and len(raw.class_names) != raw.num_classes:
        raise DataError(f"{len(raw.class_names)} class names for {raw.num_classes} classes")

    from ..runtime import init_ray

    init_ray(num_cpus=num_cpus)  # only now: checks and no-op reruns need no Ray
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split, rs in splits.items():
            _write_split(rs, tmp / split, Path(raw.image_root) if raw.image_root else None, rows_per_shard, progress, split)
        train = counts["train"]
        manifest = {
            "name": raw.name,
            "num_classes": raw.num_classes,
            "class_names": raw.class_names,
            "transform": raw.transform,
            # Native size of in-memory (CIFAR-family) images; the transforms crop to it. None: decided at load.
            "image_size": int(splits["train"].images.shape[1]) if splits["train"].images is not None else None,
            "splits": {s: {"num_samples": int(sum(c)), "class_counts": c, "skipped": skipped[s]} for s, c in counts.items()},
            "imbalance_ratio": max(train) / min(train),
            "source": raw.source,
            "options": raw.options,
            "seed": raw.options.get("seed"),
            "lade_version": __version__,
            "input_hash": input_hash,
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
    return (
        f"{manifest['name']}: {manifest['num_classes']} classes; {sizes}; train max {max(train)} / min {min(train)} "
        f"per class (imbalance {manifest['imbalance_ratio']:.1f})" + (f"; skipped {skipped} bad images" if skipped else "")
    )
