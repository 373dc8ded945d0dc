"""Predict with a logged lade model over new images, under a target prior p_t: Ray Data batch inference on a
cluster (model actors), the model in this process on one CPU node (no Ray).

  python pipelines/predict.py --model models:/lade@champion --input photos/ --output preds.parquet
  python pipelines/predict.py --model models:/lade/3 --input test.txt --image-root images/ --output preds.csv \\
      --target-prior estimate
  python pipelines/predict.py --model models:/lade@champion --input data/places_lt --split test --output p.parquet

--input: an image folder (a parent folder named like a class gives the true label), a `<path> <label>` split list
(with --image-root), or a prepared dataset (with --split). One row per image: path, label, class_name,
probability, top_k_labels, top_k_probabilities, true_label (-1: unknown), error (with --skip-bad).
--target-prior: uniform (default), a file (JSON / CSV as for evaluate.py), or `estimate`: from the images' own
BCTS-calibrated outputs (lade_core.math.label_shift) by the one of EM, MAPLS and the Dirichlet MAP that best predicts
held-out images (--estimate-method auto, the default; it says which) or by the one you name; the estimate, its per-class
bootstrap intervals (--interval, default 0.9; 0: none) and the expected top-1 gain over the uniform prior with its
interval are written beside the predictions and logged to a run of the MLflow experiment `lade-predict`.
--tta flip / five_crop: each image's softmax averaged over its views (its mirror image; LIFT's five crops) first.
--aggregate self-supervised (a multi-expert model: sade, balpoe): SADE's test-time aggregation — the experts' weights
learned from two augmented views of the input images themselves (--seed seeds the views), the predictions their
weighted sum (no prior injected: SADE's rule); the weights are written beside the predictions
(`<output>.aggregate.json`) and logged to `lade-predict` like an estimate.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lade_core.data import DataError
from lade_core.data.prior_files import read_prior_file
from lade_core.data.transforms import TTA_MODES
from lade_core.math.label_shift import METHODS
from lade_core.math.posthoc import posthoc_offset
from lade_core.math.priors import uniform_prior, validate_prior
from lade_core.models.backbones import has_experts
from lade_core.runtime.local_ray import quiet_logging
from lade_core.runtime.malloc import keep_freed_blocks
from lade_core.serve.predict import (
    aggregate_batches,
    estimate_batches_prior,
    finish,
    predict_images,
    step1_placement,
    write_predictions,
)
from lade_core.tracking.store import log_result_run, resolve_tracking_uri


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION (or runs:/ID/model)")
    ap.add_argument("--input", required=True, help="image folder, split list, or prepared dataset directory")
    ap.add_argument("--image-root", help="with a split list: the folder its paths are relative to")
    ap.add_argument("--split", default="test", help="with a prepared dataset: the split to predict (default test)")
    ap.add_argument("--output", required=True, help="predictions file: .parquet or .csv")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("--target-prior", default="uniform", help="uniform, estimate, or a prior file")
    # BBSE needs a labeled validation split, which a prediction job does not have.
    ap.add_argument("--estimate-method", choices=[m for m in METHODS if m != "bbse"], default="auto",
                    help="with --target-prior estimate: em (maximum likelihood), mapls (shrunk toward uniform), "
                    "dirichlet (MAP with C uniform pseudo-images: shrunk with few images, EM with many), or auto "
                    "(default: the one of the three with the highest 5-fold held-out likelihood)")
    ap.add_argument("--interval", type=float, default=0.9,
                    help="with --target-prior estimate: bootstrap interval level (0: no intervals)")
    ap.add_argument("--aggregate", choices=["self-supervised"],
                    help="a multi-expert model (sade, balpoe): learn the experts' weights on these images' two "
                    "augmented views (SADE's test-time aggregation) and predict with them")
    ap.add_argument("--seed", type=int, default=0, help="with --aggregate: the seed of the augmented views (a run's "
                    "seed draws the views its run stored)")
    ap.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time ensembling: each image's softmax "
                    "averaged over its views (flip: it and its mirror; five_crop: LIFT's four corners and centre) "
                    "before the target prior is applied or estimated")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--num-workers", type=int, help="model actors, each loading the model once (0: this process; "
                    "default: one per GPU, one per node on a multi-node CPU cluster, else 0)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-bad", action="store_true", help="predict the images that decode; report the others")
    ap.add_argument("--use-gpu", action="store_true", default=None,
                    help="one GPU per actor (default: if the cluster has GPUs)")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs for a local Ray (started only for model actors)")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before Ray starts or a model loads."""
    out = Path(args.output)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"--output {out}: use a .parquet or .csv file name")
    if not out.parent.is_dir():
        raise ValueError(f"--output {out}: folder {out.parent} does not exist")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--output {out} exists; pass --overwrite to replace it")
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0 (0: in this process), got {args.num_workers}")
    if not 0 <= args.interval < 1:
        raise ValueError(f"--interval must be a level in (0, 1) such as 0.9, or 0 for none; got {args.interval}")
    if args.aggregate and args.tta != "none":
        raise ValueError("--aggregate learns the experts' weights on views of its own; it does not take --tta")
    if args.aggregate and args.target_prior != "uniform":
        raise ValueError(f"--aggregate learns the experts' weights from the images and injects no prior; it does not "
                         f"take --target-prior {args.target_prior!r}")
    if args.target_prior not in ("uniform", "estimate") and not Path(args.target_prior).is_file():
        raise ValueError(f"--target-prior {args.target_prior!r}: not uniform, estimate, or an existing file")


def log_result(tracking_uri: str, args, path: Path, params: dict, metrics: dict) -> str:
    """A run of the MLflow experiment ``lade-predict`` holding what the job learned from its images (a prior
    estimate, aggregation weights) and the file written beside the predictions."""
    return log_result_run(tracking_uri, "lade-predict", params={"model": args.model, "input": str(args.input),
                                                                "tta": args.tta, **params},
                          metrics=metrics, files=(path,))


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging(args.verbose)
    keep_freed_blocks()  # the driver decodes and runs batches itself on a CPU node (runtime.malloc)
    tracking_uri = resolve_tracking_uri(args.mlflow_uri)
    try:
        check_args(args)
        from lade_core.tracking.model import load_classifier

        # Also on the driver: the card, and a bad URI fails before Ray starts.
        model = load_classifier(args.model, tracking_uri)
        card = model.card
        if args.aggregate and not has_experts(model.net):
            raise ValueError(f"--aggregate self-supervised needs a multi-expert model (sade, balpoe); {args.model} is "
                             f"a {card.loss} model")
        prior = None if args.target_prior in ("uniform", "estimate") else \
            validate_prior(read_prior_file(args.target_prior), card.num_classes, "target_prior")
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    actors, use_gpu, cpus = step1_placement(args.num_workers, args.use_gpu, args.num_cpus)
    if actors:
        print(f"model: {actors} Ray actor{'s' if actors > 1 else ''}{' with a GPU each' if use_gpu else ''}")
    else:
        why = "" if ray.is_initialized() else " (Ray not started: no actors on this one node)"
        print(f"model: in this process, {torch.get_num_threads()} torch threads, images read here{why}")
    t0 = time.perf_counter()
    try:
        logits = predict_images(args.input, card.class_names, model, args.model, tracking_uri,
                                image_root=args.image_root, split=args.split, num_actors=actors, use_gpu=use_gpu,
                                batch_size=args.batch_size, skip_bad=args.skip_bad, cpus=cpus,
                                view_seed=args.seed if args.aggregate else None, tta=args.tta)
        out = Path(args.output)
        if args.aggregate:
            logits = list(logits)  # every image's views before any prediction
            images, info = aggregate_batches(logits, model.net.fc.eval_offset, args.seed)
            agg_path = out.with_name(out.stem + ".aggregate.json")
            agg_path.write_text(json.dumps({"images": images, "seed": args.seed, **info}, indent=1))
            run_id = log_result(tracking_uri, args, agg_path,
                                {"method": "aggregate (self-supervised)", "seed": args.seed},
                                {"images": images, "aggregate_epochs": info["epochs"],
                                 **{f"aggregate/w{e}": w for e, w in enumerate(info["weights"])}})
            print(f"expert weights learned on the images' two augmented views ({info['epochs']} passes"
                  f"{', stopped early' if info['stopped_early'] else ''}): "
                  f"{', '.join(f'{w:.3f}' for w in info['weights'])} -> {agg_path}; MLflow run {run_id} "
                  f"(experiment lade-predict)")
        if args.target_prior == "estimate":
            logits = list(logits)  # every image's output before any prediction (kept: step 2 reads them again)
            prior, images, info = estimate_batches_prior(logits, card, args.estimate_method, args.interval or None)
            est_path = out.with_name(out.stem + ".target_prior.json")
            est_path.write_text(json.dumps({"prior": [float(x) for x in prior], "class_names": card.class_names,
                                            "images": images, **info}, indent=1))
            run_id = log_result(tracking_uri, args, est_path,
                                {"method": info["method"], "estimate_method": args.estimate_method,
                                 "calibrated": info["calibration"] is not None},
                                {"images": images, "em_iterations": info.get("iterations", 0),
                                 **{f"gain/{k}": v for k, v in info.get("interval", {}).get("gain", {}).items()}})
            gain = info.get("interval", {}).get("gain")
            said = (f"; expected top-1 gain over uniform {gain['estimate']:+.4f} ({info['interval']['level']:.0%} "
                    f"interval {gain['lower']:+.4f} .. {gain['upper']:+.4f})") if gain else ""
            scores = info.get("chosen_by", {}).get("scores")
            how = ("chosen by held-out likelihood per image ("
                   + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()) + "), ") if scores else ""
            print(f"estimated target prior ({info['method']}, {how}{info.get('iterations')} iterations){said} -> "
                  f"{est_path}; MLflow run {run_id} (experiment lade-predict)")
        prior = uniform_prior(card.num_classes) if prior is None else prior
        offset = torch.zeros(card.num_classes, dtype=torch.float64) if args.aggregate else \
            posthoc_offset(card.posthoc, card.source_prior, prior, card.num_classes)  # aggregation: none (SADE's)
        table = finish(logits, offset, args.top_k, card.class_names)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ray.exceptions.RayTaskError as e:  # a DataError raised inside an actor
        cause = e.cause if isinstance(getattr(e, "cause", None), (DataError, ValueError)) else e
        print(f"error: {cause}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    write_predictions(table, out)
    table = table.select(["label", "true_label", "error"]).to_pandas()
    bad = int((table["error"] != "").sum())
    known = table[(table["true_label"] >= 0) & (table["label"] >= 0)]
    top1 = float((known["label"] == known["true_label"]).mean()) if len(known) else math.nan
    acc = f", top-1 {top1:.4f} on {len(known)} labeled" if len(known) else ""
    print(f"{len(table)} images in {elapsed:.1f} s ({len(table) / elapsed:.1f} images/s){acc}"
          f"{f', {bad} not decoded' if bad else ''} -> {out}")
    return 0

