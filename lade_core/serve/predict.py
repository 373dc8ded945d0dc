"""Batch prediction of a logged lade model over new images (``pipelines/predict.py``): Ray Data where it pays.

Two steps, because an estimated target prior needs every image's output before any prediction is final:
  1. the images map to the network's raw logits [B, C]: read by Ray Data into an actor pool (one model load per
     actor, a GPU each) where actors pay — a cluster with GPUs or with several nodes — else read and run in the
     driver, which already holds the model, with all of its node's cores and no Ray (``step1_placement``);
  2. the driver fixes p_t (a file, uniform, or EM on step 1's calibrated outputs) and turns each batch of logits
     into p_t(y|x) with the model's post-hoc rule (a per-class offset, ``posthoc_offset``), keeping the top-k.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lade_core.data.sources import IMAGE_EXTENSIONS, DataError, check_inside_root, check_labels, read_split_list
from lade_core.math.aggregation import aggregated, learn_expert_weights
from lade_core.math.label_shift import Calibration, estimate_target_prior

UNKNOWN = -1  # the true label of an image whose class is not known


def image_rows(source: str | Path, class_names: list[str], *, image_root: str | Path | None = None
               ) -> list[dict]:
    """The images of a folder tree or a ``<path> <label>`` split list: [{"row", "path", "true_label"}].

    A folder's images take their parent folder's name as the true label when it is a class name (the ImageFolder
    layout), else ``UNKNOWN``. A list's paths must stay inside ``image_root`` and a folder's images inside it, links
    followed."""
    source = Path(source)
    if source.is_dir():
        index = {name: k for k, name in enumerate(class_names)}
        paths = sorted(str(Path(d, f)) for d, _, files in os.walk(source) for f in files
                       if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise DataError(f"{source}: no images with extensions {list(IMAGE_EXTENSIONS)}")
        check_inside_root([os.path.relpath(p, source) for p in paths], source, str(source))
        labels = [index.get(Path(p).parent.name, UNKNOWN) for p in paths]
    elif source.is_file():
        if image_root is None:
            raise DataError(f"{source}: a split list needs --image-root, the folder its paths are relative to")
        rel, labels = read_split_list(source)
        check_inside_root(rel, image_root, str(source))
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


def _prepared(source: Path, class_names: list[str]):
    from lade_core.data import open_prepared

    prepared = open_prepared(source)
    if prepared.num_classes != len(class_names):
        raise DataError(f"{source} has {prepared.num_classes} classes; the model has {len(class_names)}")
    return prepared


def _prepared_rows(batch: dict, split: str) -> dict:
    """A prepared split's stored rows {"image", "label", "index"} as step 1's input rows (the bytes as stored)."""
    return {"row": batch["index"], "path": np.array([f"{split}#{i}" for i in batch["index"]]),
            "true_label": batch["label"], "image": batch["image"]}


def image_dataset(source: str | Path, class_names: list[str], *, image_root=None, split: str = "test"):
    """A Ray Dataset of {"row", "path", "true_label", "image" (encoded bytes)} from a folder, a split list, or a
    prepared dataset's split (read from its Parquet: the bytes as stored, labels known)."""
    import ray.data

    source = Path(source)
    if (source / "dataset.json").exists():
        return _prepared(source, class_names).encoded_dataset(split).map_batches(
            partial(_prepared_rows, split=split), batch_format="numpy")
    rows = image_rows(source, class_names, image_root=image_root)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 200)))
    return ds.map_batches(_read_files, batch_format="numpy")


def image_batches(source: str | Path, class_names: list[str], *, image_root=None, split: str = "test",
                  batch_size: int = 64) -> Iterator[dict]:
    """``image_dataset``'s rows read in this process, without Ray, in numpy batches of ``batch_size``: the input
    where step 1 runs here. Ray Data's read tasks would only carry the bytes into this process through the object
    store, on the cores the model needs (bench/predict_throughput.py)."""
    source = Path(source)
    if (source / "dataset.json").exists():
        for b in _prepared(source, class_names).raw_batches(split, ["image", "label", "index"], batch_size):
            yield _prepared_rows({k: b.column(k).to_numpy(zero_copy_only=False) for k in b.schema.names}, split)
        return
    rows = image_rows(source, class_names, image_root=image_root)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield _read_files({k: np.array([r[k] for r in chunk]) for k in ("row", "path", "true_label")})


def model_actors(requested: int | None, *, gpus: float, nodes: int, use_gpu: bool) -> int:
    """How many model actors step 1 runs on: ``requested`` if given (0: in the driver); else one per GPU when
    ``use_gpu``, one per node on a CPU cluster of several nodes, and 0 on one CPU node. Why 0 there: an actor is a
    new process that imports torch and loads the model again (~10 s on 2 cores) and takes cores from the driver,
    which already holds the model (bench/predict_throughput.py)."""
    if requested is not None:
        return requested
    if use_gpu:
        return max(1, int(gpus))
    return nodes if nodes > 1 else 0


def logits_batch(model, batch: dict, skip_bad: bool, view_seed: int | None = None, tta: str = "none") -> dict:
    """Step 1 of one batch: encoded images -> raw logits [B, C] (NaN rows: not decoded; ``tta``: test-time
    ensembled over its views, ``LadeClassifier.tta_logits``) and per-row errors; with
    ``view_seed``, instead the experts' logits on the clean image and two augmented views, "views" [B, 3, E, C]
    (``LadeClassifier.expert_views``: test-time aggregation's input)."""
    from lade_core.tracking.model import decode_images

    n = len(batch["row"])
    images, errors = decode_images(list(batch["image"]))
    if errors and not skip_bad:  # named by file, not by row number within this batch
        bad = [batch["path"][i] for i in errors]
        raise DataError(f"{len(bad)} images do not decode, e.g. {bad[:5]}; pass --skip-bad to predict the rest")
    ok = np.array([i for i, im in enumerate(images) if im is not None], dtype=np.int64)
    decoded = [images[i] for i in ok]
    if view_seed is None:
        key, out = "logits", model.tta_logits(decoded, tta)  # [B', C]
    else:
        key, out = "views", model.expert_views(decoded, np.asarray(batch["row"], dtype=np.int64)[ok], view_seed)
    filled = np.full((n, *out.shape[1:]), np.nan, dtype=np.float32)
    filled[ok] = out.numpy()
    return {"row": batch["row"], "path": batch["path"], "true_label": batch["true_label"], key: filled,
            "error": np.array([errors.get(i, "") for i in range(n)], dtype=object)}


class _PyfuncLogitsActor:
    """Step 1 on an actor: loads the model once, torch on its ``threads`` CPUs, then ``logits_batch``."""

    def __init__(self, model_uri: str, tracking_uri: str, skip_bad: bool, threads: int, view_seed: int | None,
                 tta: str):
        from lade_core.tracking.model import load_classifier

        torch.set_num_threads(threads)  # the actor's CPUs, not Ray's one-thread default
        self.model, self.skip_bad, self.view_seed = load_classifier(model_uri, tracking_uri), skip_bad, view_seed
        self.tta = tta

    def __call__(self, batch: dict) -> dict:
        return logits_batch(self.model, batch, self.skip_bad, self.view_seed, self.tta)


def top_k_batch(batch: dict, offset: np.ndarray, k: int, class_names: list[str]) -> dict:
    """Step 2: raw logits [B, C] + post-hoc offset [C] -> p_t(y|x) -> label, top-k classes and probabilities."""
    raw = np.array(batch["logits"], dtype=np.float64)  # a copy: Ray's arrays are read-only
    # Decoded rows are those step 1 filled in (NaN: not decoded), judged before the offset: a target prior with a
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


def step1_placement(requested: int | None, use_gpu: bool | None, num_cpus: int | None) -> tuple[int, bool, float]:
    """Where step 1 runs, as (model actors, on GPUs, the CPUs they share): ``model_actors`` on the cluster's
    resources; ``use_gpu`` None: if it has GPUs. Starts Ray only where actors run.

    Without RAY_ADDRESS the cluster a local Ray would start is this machine, whose GPUs are torch's (Ray counts the
    same visible devices); with none, and no actors asked for, the model runs in this process and Ray never starts:
    on one node a local Ray's start (~7 s on 2 cores) and its read tasks buy nothing."""
    import ray

    from lade_core.runtime.local_ray import init_ray, local_num_cpus

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():  # a cluster: ask it
        init_ray()
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
    else:  # the one node a local Ray would start: this machine
        gpus, nodes, cpus = torch.cuda.device_count(), 1, os.cpu_count() or 1
    on_gpu = use_gpu if use_gpu is not None else gpus > 0
    actors = model_actors(requested, gpus=gpus, nodes=nodes, use_gpu=on_gpu)
    if actors and not ray.is_initialized():
        # A local Ray gets CPUs beyond the actors' own, or the read/decode tasks wait behind them and the job stalls.
        cpus = local_num_cpus(num_cpus, requested or 0)
        init_ray(num_cpus=cpus)
    return actors, on_gpu, float(cpus)


def predict_images(source: str | Path, class_names: list[str], model, model_uri: str, tracking_uri: str, *,
                   image_root=None, split: str = "test", num_actors: int, use_gpu: bool, batch_size: int,
                   skip_bad: bool, cpus: float, view_seed: int | None = None, tta: str = "none") -> Iterator[dict]:
    """Step 1 over the images of ``source`` (``image_rows``' folder or list, or a prepared dataset's ``split``): an
    iterator of numpy batches {"row", "path", "true_label", "logits" [B, C], "error"} ("views" [B, 3, E, C] instead
    of "logits" with ``view_seed``: ``logits_batch``).

    ``num_actors`` 0: in this process with ``model`` (the driver's, already loaded), torch on all its threads, the
    images read here too (``image_batches``: no Ray); else read by Ray Data (``image_dataset``) into a pool of that
    many actors that each load ``model_uri`` once (a GPU each with ``use_gpu``) and run torch on their share of the
    ``cpus`` the cluster has, fed blocks of one batch so that every actor gets work."""
    if num_actors == 0:
        for batch in image_batches(source, class_names, image_root=image_root, split=split, batch_size=batch_size):
            yield logits_batch(model, batch, skip_bad, view_seed, tta)
        return
    from ray.data import ActorPoolStrategy

    ds = image_dataset(source, class_names, image_root=image_root, split=split)
    # Leave a CPU per actor's worth for the reads; a prepared split's few Parquet files would otherwise arrive as
    # a few large blocks and keep all but one actor idle (a streaming repartition: no barrier).
    threads = max(1, int(cpus // (num_actors + 1))) if not use_gpu else 1
    yield from ds.repartition(target_num_rows_per_block=batch_size).map_batches(
        _PyfuncLogitsActor, batch_format="numpy", batch_size=batch_size, compute=ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0, num_cpus=threads,
        fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri, "skip_bad": skip_bad,
                               "threads": threads, "view_seed": view_seed, "tta": tta},
    ).iter_batches(batch_size=None, batch_format="numpy")


def collect_logits(batches: list[dict], key: str = "logits") -> torch.Tensor:
    """The decoded rows' step-1 outputs (``key``: "logits" [N, C] or "views" [N, 3, E, C]) float32, in input order
    (by "row": what the driver estimates a prior or learns aggregation weights from, whatever order blocks came in)."""
    rows = np.concatenate([np.asarray(b["row"]) for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    values = np.concatenate([np.asarray(b[key]) for b in batches]) if batches else np.zeros((0, 0), np.float32)
    keep = np.isfinite(values.reshape(len(values), -1)).all(1)
    order = np.argsort(rows[keep], kind="stable")
    return torch.from_numpy(np.ascontiguousarray(values[keep][order]))


def aggregate_batches(batches: list[dict], eval_offset: torch.Tensor, seed: int) -> tuple[int, dict]:
    """SADE's test-time aggregation over a prediction job's images, in place: the expert weights learned on every
    decoded image's two augmented views (step 1's "views" [B, 3, E, C]), then each batch's "logits" [B, C] are its
    clean view's aggregated logits (what step 2 predicts from; no prior is injected). -> (images the weights were
    learned on, ``learn_expert_weights``'s info)."""
    views = collect_logits(batches, "views")  # [N, 3, E, C]
    weights, info = learn_expert_weights(views[:, 1], views[:, 2], seed=seed)
    for b in batches:
        b["logits"] = aggregated(torch.from_numpy(b.pop("views")[:, 0]), weights, eval_offset).numpy()
    return len(views), info


def estimate_batches_prior(batches: list[dict], card, method: str, interval: float | None
                           ) -> tuple[torch.Tensor, int, dict]:
    """The target prior of a prediction job's images, estimated from their step-1 logits under the model card's
    calibration (``label_shift.estimate_target_prior``) -> (prior [C], images, the estimate's info)."""
    z = collect_logits(batches)
    calibration = Calibration.from_dict(card.calibration) if card.calibration else None
    prior, info = estimate_target_prior(z, card.source_prior, loss=card.loss, method=method, calibration=calibration,
                                        interval=interval)
    return prior, len(z), info


def finish(batches, offset: torch.Tensor, k: int, class_names: list[str]):
    """Step 2 over step 1's batches -> a pyarrow Table, one row per image, in input order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # Step 2 runs per batch as step 1's arrive; Arrow converts once at the end: a pa.table per batch between the
    # model's forwards slowed the whole job by ~30 % on 2 cores (bench/predict_throughput.py).
    parts = [top_k_batch(b, offset.numpy(), k, class_names) for b in batches]
    if not parts:
        raise ValueError("no images to predict")
    table = pa.table({key: np.concatenate([part[key] for part in parts]) if isinstance(parts[0][key], np.ndarray)
                      else [v for part in parts for v in part[key]] for key in parts[0]})
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


def run_tta_logits(client, run_id: str, tta: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], labels [N]) of run ``run_id``'s test split ensembled over the views of ``tta``: read back if
    the run stores them (``artifacts.tta_logits_artifact``), else computed once with its logged model on its
    prepared dataset (in this process) and stored in the run, so they are evaluated like its plain logits."""
    import tempfile

    from lade_core.data import open_prepared
    from lade_core.tracking.artifacts import MODEL_NAME, read_logits_parquet, tta_logits_artifact, write_logits_parquet
    from lade_core.tracking.model import load_classifier
    from lade_core.tracking.store import download_artifact, logged_model_uri

    artifact = tta_logits_artifact(tta)
    if artifact in {a.path for a in client.list_artifacts(run_id, str(Path(artifact).parent))}:
        return read_logits_parquet(download_artifact(client.tracking_uri, run_id, artifact))
    model_uri = logged_model_uri(client, run_id, MODEL_NAME)
    dataset = client.get_run(run_id).data.params.get("dataset")
    if model_uri is None or not dataset:
        raise ValueError(f"--tta needs the run's logged model and its prepared dataset; run {run_id} has "
                         f"{'no model' if model_uri is None else 'no dataset param'}")
    if not (Path(dataset) / "dataset.json").exists():
        raise ValueError(f"--tta: run {run_id}'s dataset {dataset} is not here (a prepared dataset directory)")
    model = load_classifier(model_uri, client.tracking_uri)
    split = open_prepared(dataset).test_split
    batches = list(predict_images(dataset, model.card.class_names, model, model_uri, client.tracking_uri,
                                  split=split, num_actors=0, use_gpu=False, batch_size=batch_size, skip_bad=False,
                                  cpus=1, tta=tta))
    logits, labels = collect_logits(batches), collect_logits(batches, "true_label").long()
    with tempfile.TemporaryDirectory() as d:
        write_logits_parquet(Path(d) / Path(artifact).name, logits, labels)
        client.log_artifact(run_id, str(Path(d) / Path(artifact).name), str(Path(artifact).parent))
    return logits, labels
