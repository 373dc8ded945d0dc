"""Batch prediction of a logged lade model over new images, on Ray Data (``pipelines/predict.py``).

Two passes, because an estimated target prior needs every image's output before any prediction is final:
  1. an actor pool (one model load per actor, a GPU each when the cluster has them) maps encoded images to the
     network's raw logits [B, C];
  2. the driver fixes p_t (a file, uniform, or EM on pass 1's calibrated outputs), and a stateless map turns the
     logits into p_t(y|x) with the model's post-hoc rule (a per-class offset, ``posthoc_offset``) and keeps the
     top-k.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.sources import IMAGE_EXTENSIONS, DataError, check_inside_root, check_labels, read_split_list

UNKNOWN = -1  # the true label of an image whose class is not known


def image_rows(source: str | Path, class_names: list[str], *, image_root: str | Path | None = None
               ) -> list[dict]:
    """The images of a folder tree or a ``<path> <label>`` split list: [{"row", "path", "true_label"}].

    A folder's images take their parent folder's name as the true label when it is a class name (the ImageFolder
    layout), else ``UNKNOWN``. A list's paths must stay inside ``image_root``."""
    source = Path(source)
    if source.is_dir():
        index = {name: k for k, name in enumerate(class_names)}
        paths = sorted(str(Path(d, f)) for d, _, files in os.walk(source) for f in files
                       if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise DataError(f"{source}: no images with extensions {list(IMAGE_EXTENSIONS)}")
        labels = [index.get(Path(p).parent.name, UNKNOWN) for p in paths]
    elif source.is_file():
        if image_root is None:
            raise DataError(f"{source}: a split list needs --image-root, the folder its paths are relative to")
        rel, labels = read_split_list(source)
        check_inside_root(rel, str(source))
        check_labels(labels, len(class_names), str(source))
        paths = [str(Path(image_root) / p) for p in rel]
        labels = labels.tolist()
    else:
        raise DataError(f"{source} does not exist")
    return [{"row": i, "path": p, "true_label": int(y)} for i, (p, y) in enumerate(zip(paths, labels))]


def _read_files(batch: dict) -> dict:
    """Adds each row's encoded bytes; a file that can't be read gets empty bytes (reported as not decoding)."""
    data = []
    for p in batch["path"]:
        try:
            data.append(Path(p).read_bytes())
        except OSError:
            data.append(b"")
    return {**batch, "image": np.array(data, dtype=object)}


def image_dataset(source: str | Path, class_names: list[str], *, image_root=None, split: str = "test"):
    """A Ray Dataset of {"row", "path", "true_label", "image" (encoded bytes)} from a folder, a split list, or a
    prepared dataset's split (read from its Parquet: the bytes as stored, labels known)."""
    import ray.data

    source = Path(source)
    if (source / "dataset.json").exists():
        from .data import open_prepared

        prepared = open_prepared(source)
        if prepared.num_classes != len(class_names):
            raise DataError(f"{source} has {prepared.num_classes} classes; the model has {len(class_names)}")
        return prepared.encoded_dataset(split).map_batches(
            lambda b: {"row": b["index"], "path": np.array([f"{split}#{i}" for i in b["index"]]),
                       "true_label": b["label"], "image": b["image"]}, batch_format="numpy")
    rows = image_rows(source, class_names, image_root=image_root)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 200)))
    return ds.map_batches(_read_files, batch_format="numpy")


class _PyfuncLogitsActor:
    """Pass 1 on an actor: loads the model once, maps encoded images to raw logits [B, C] (NaN rows: not decoded)."""

    def __init__(self, model_uri: str, tracking_uri: str, skip_bad: bool):
        import mlflow

        from .serving import load_classifier

        mlflow.set_tracking_uri(tracking_uri)
        self.model, self.skip_bad = load_classifier(model_uri), skip_bad

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row"])
        x, ok, errors = self.model.preprocess(pd.DataFrame({"image": list(batch["image"])}), skip_bad=True)
        if errors and not self.skip_bad:  # named by file, not by row number within this batch
            bad = [batch["path"][i] for i in errors]
            raise DataError(f"{len(bad)} images do not decode, e.g. {bad[:5]}; pass --skip-bad to predict the rest")
        logits = np.full((n, self.model.card.num_classes), np.nan, dtype=np.float32)
        logits[ok] = self.model.logits(x).numpy()
        return {"row": batch["row"], "path": batch["path"], "true_label": batch["true_label"], "logits": logits,
                "error": np.array([errors.get(i, "") for i in range(n)], dtype=object)}


def top_k_batch(batch: dict, offset: np.ndarray, k: int, class_names: list[str]) -> dict:
    """Pass 2: raw logits [B, C] + post-hoc offset [C] -> p_t(y|x) -> label, top-k classes and probabilities."""
    raw = np.array(batch["logits"], dtype=np.float64)  # a copy: Ray's arrays are read-only
    # Decoded rows are those pass 1 filled in (NaN: not decoded), judged before the offset: a target prior with a
    # zero entry puts -inf in the offset, which only zeroes that class's probability (as in the pyfunc).
    ok = torch.from_numpy(np.isfinite(raw).all(1))
    z = torch.from_numpy(np.where(ok.numpy()[:, None], raw, 0.0)) + torch.tensor(offset)
    prob = torch.softmax(z, 1)
    p, idx = prob.topk(min(k, z.shape[1]), dim=1)
    label = np.where(ok.numpy(), idx[:, 0].numpy(), UNKNOWN)
    return {"row": batch["row"], "path": batch["path"], "label": label,
           "class_name": np.array([class_names[c] if c >= 0 else None for c in label], dtype=object),
           "probability": np.where(ok.numpy(), p[:, 0].numpy(), np.nan),
           "top_k_labels": [r.tolist() if g else None for r, g in zip(idx.numpy(), ok.numpy())],
           "top_k_probabilities": [r.tolist() if g else None for r, g in zip(p.numpy(), ok.numpy())],
           "true_label": batch["true_label"], "error": batch["error"]}


def predict_images(ds, model_uri: str, tracking_uri: str, *, num_workers: int, use_gpu: bool, batch_size: int,
                   skip_bad: bool):
    """Pass 1: the materialized Ray Dataset of {"row", "path", "true_label", "logits" [C], "error"}."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(_PyfuncLogitsActor, batch_format="numpy", batch_size=batch_size,
                          compute=ActorPoolStrategy(size=num_workers), num_gpus=1 if use_gpu else 0,
                          fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                 "skip_bad": skip_bad}).materialize()


def collect_logits(logits_ds) -> torch.Tensor:
    """The decoded rows' raw logits [N, C] float32, for prior estimation on the driver."""
    parts = []
    for b in logits_ds.select_columns(["logits"]).iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(torch.from_numpy(np.array(b["logits"][np.isfinite(b["logits"]).all(1)])))
    return torch.cat(parts)


def finish(logits_ds, offset: torch.Tensor, k: int, class_names: list[str]):
    """Pass 2 -> a pyarrow Table, one row per image, in input order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    out = logits_ds.map_batches(top_k_batch, batch_format="numpy",
                                fn_kwargs={"offset": offset.numpy(), "k": k, "class_names": class_names})
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    return table.take(pc.sort_indices(table, [("row", "ascending")]))


def write_predictions(table, path: str | Path) -> None:
    """Parquet as it is; CSV with the top-k lists as JSON text (a CSV cell holds no list)."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix.lower() == ".parquet":
        pq.write_table(table, str(path))
        return
    frame = table.to_pandas()
    for col in ("top_k_labels", "top_k_probabilities"):
        frame[col] = [None if v is None else json.dumps([x.item() for x in v]) for v in frame[col]]
    frame.to_csv(path, index=False)
