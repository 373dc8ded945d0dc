"""Evaluate a trained run under any target prior p_t from its stored test logits: no re-inference, no GPU.

  python pipelines/evaluate.py --run-id RUN_ID
  python pipelines/evaluate.py --model models:/NAME@champion --target-prior my_prior.json
  python pipelines/evaluate.py --logits test_logits.parquet --source-info source_prior.json --loss lade --output out/

Targets: the 11 priors of the shifted protocol (forward 50 .. uniform .. backward 50, paper Table 6) plus any
--target-prior file (JSON list / {"prior": [...]} / {"counts": [...]}, or CSV: one value per line or
`class,value` rows). Per target and post-hoc rule (softmax: raw, pc; balanced_softmax/lade: inject, raw): top-1,
Many/Medium/Few, NLL, ECE. With a run, results go back into it: metrics shift/<target>/<rule>/<metric>, the table
(eval/shift_table.json) and figures (eval/figures/*.png); rerunning writes nothing new. --aggregate self-supervised
(multi-expert runs): SADE's test-time aggregation per target, rows of rule `aggregate` and the learned weights
(eval/aggregate_weights.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from lade_core.data.transforms import TTA_MODES
from lade_core.math.evaluation import METRICS, aggregated_rows, evaluate_targets
from lade_core.math.label_shift import BCTS_MIN_PER_CLASS, METHODS
from lade_core.methods import LOSSES, posthoc_rules
from lade_core.report.figures import run_figures
from lade_core.report.protocol import ESTIMATE_COLUMNS, estimated_prior_rows, evaluation_targets
from lade_core.report.tables import format_table
from lade_core.runtime.local_ray import quiet_logging
from lade_core.serve.predict import run_tta_logits
from lade_core.tracking.artifacts import (
    AGGREGATE_WEIGHTS_ARTIFACT,
    FIGURES_DIR,
    SHIFT_TABLE_ARTIFACT,
    VIEWS_ARTIFACT,
    estimate_metrics,
    estimate_name,
    load_run_logits,
    missing_views_message,
    read_local_run,
    run_for_model,
    shift_metrics,
    tta_table_artifact,
)
from lade_core.tracking.store import log_metrics_once, log_table_once, mlflow_client, resolve_tracking_uri

COLUMNS = ["target", "mode", "n", *METRICS]
ESTIMATE_COLUMNS_SHOWN = ["target", "n", *ESTIMATE_COLUMNS]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="an MLflow run trained by pipelines/train.py")
    src.add_argument("--model", help="a registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    src.add_argument("--logits", help="a local test-logits Parquet file (eval/test_logits.parquet of a run)")
    ap.add_argument("--source-info", help="with --logits: the run's data/source_prior.json")
    ap.add_argument("--loss", choices=sorted(LOSSES), help="with --logits: the loss the model was trained with")
    ap.add_argument("--output", help="with --logits: folder for the table and figures (default: beside the file)")
    ap.add_argument("--target-prior", action="append", default=[], metavar="FILE",
                    help="per-class probabilities or counts")
    ap.add_argument("--per-class", type=int, help="head-class test count of the shifted protocol (default: the "
                    "smallest class count of the test split)")
    ap.add_argument("--estimate-prior", choices=METHODS, help="also score each target with p_t estimated from its "
                    "own unlabeled logits (BBSE needs the run's validation logits)")
    ap.add_argument("--calibration", choices=["auto", "bcts", "none"], default="auto",
                    help="posteriors for the estimate: BCTS fitted on the run's validation logits (auto: only with "
                    f">= {BCTS_MIN_PER_CLASS} validation images per class), or none")
    ap.add_argument("--aggregate", choices=["self-supervised"], help="multi-expert runs (sade, balpoe): also score "
                    "SADE's test-time aggregation per target, its expert weights learned on the target's own "
                    "unlabeled images (two augmented views stored by the run); rows of rule 'aggregate'")
    ap.add_argument("--tta", choices=TTA_MODES, default="none", help="with a run: evaluate its test logits "
                    "ensembled over test-time views (flip: the image and its mirror; five_crop: LIFT's four corners "
                    "and centre), their softmax averaged; computed once with the run's model and stored in it; rows "
                    "of mode <rule>-<tta>")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show MLflow's INFO logs and download bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging(args.verbose)
    client = None
    try:
        if args.logits:
            if args.tta != "none":
                raise ValueError("--tta needs a run (--run-id or --model): it runs the run's model on its images")
            if not (args.source_info and args.loss):
                raise ValueError("--logits needs --source-info (the run's data/source_prior.json) and --loss")
            if args.aggregate:
                raise ValueError("--aggregate needs a run (--run-id or --model): it reads the run's stored expert "
                                 f"views ({VIEWS_ARTIFACT}), which a logits file does not hold")
            run = read_local_run(args.logits, args.source_info, args.loss)
        else:
            client = mlflow_client(resolve_tracking_uri(args.mlflow_uri))
            run_id = args.run_id or run_for_model(client, args.model)
            run = load_run_logits(client, run_id, expert_views=bool(args.aggregate))
            if args.aggregate and run.expert_views is None:
                raise ValueError(f"--aggregate: {missing_views_message(run)}")
            if args.tta != "none":
                if args.aggregate:
                    raise ValueError("--tta and --aggregate: test-time aggregation has its own views; pass one")
                logits, labels = run_tta_logits(client, run_id, args.tta)
                if not torch.equal(labels, run.labels):
                    raise ValueError(f"--tta: the test split of {run.run_name}'s dataset is not the one it stored")
                run = dataclasses.replace(run, logits=logits)
        targets = evaluation_targets(run.labels, run.train_counts, args.target_prior, args.per_class)
        if (args.estimate_prior == "bbse" or args.calibration == "bcts") and run.val_logits is None:
            raise ValueError("BBSE and BCTS need the run's validation logits (eval/val_logits.parquet), which runs "
                             "trained before lade stored them lack; use --estimate-prior em --calibration none")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = evaluate_targets(run.logits, run.labels, run.source_prior, run.train_counts,
                            posthoc_rules(run.loss), targets)
    if args.tta != "none":  # rows, metrics and table of their own: shift/<target>/<rule>-<tta>/<metric>
        rows = [{**r, "mode": f"{r['mode']}-{args.tta}"} for r in rows]
    weights = []
    if args.aggregate:
        ev = run.expert_views
        aggregated = aggregated_rows(ev.logits, ev.eval_offset, run.labels, run.source_prior, run.train_counts,
                                     targets)
        rows += aggregated
        weights = [{"target": r["target"], "n": r["n"], "top1": r["top1"], "stopped_early": r["stopped_early"],
                    **{f"w{e}": w for e, w in enumerate(r["weights"])}} for r in aggregated]
    print(f"{run.run_name} ({run.loss}){' — MLflow run ' + run.run_id if run.run_id else ''}")
    print(format_table(rows, COLUMNS))
    table = pd.DataFrame(rows, columns=COLUMNS)
    if weights:
        print("\ntest-time aggregation (SADE): expert weights learned on each target's unlabeled views")
        print(format_table(weights, list(weights[0])))
    estimates = []
    if args.estimate_prior:
        estimates = estimated_prior_rows(run.logits, run.labels, run.source_prior, run.loss, targets,
                                         args.estimate_prior, run.val_logits, run.val_labels,
                                         None if args.calibration == "none" else args.calibration)
        print(f"\ntarget prior estimated from each target's unlabeled logits ({args.estimate_prior}, "
              f"{'BCTS-calibrated on validation' if estimates[0]['calibrated'] else 'uncalibrated posteriors'}):")
        print(format_table(estimates, ESTIMATE_COLUMNS_SHOWN))
        estimate_tag = estimate_name(args.estimate_prior, estimates[0]["calibrated"])
    if client is None:
        logits_file = Path(args.logits)
        out = Path(args.output) if args.output else logits_file.with_suffix("").parent / f"{logits_file.stem}_eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "shift_table.csv").write_text(format_table(rows, COLUMNS, "csv"))
        if estimates:
            (out / f"estimate_{estimate_tag}.csv").write_text(format_table(estimates, ESTIMATE_COLUMNS_SHOWN, "csv"))
        written = [] if args.no_figures else run_figures(run, targets, rows, out)
        print(f"wrote {out / 'shift_table.csv'}" + "".join(f", {p.name}" for p in written))
        return 0
    metrics = shift_metrics(rows, METRICS)
    if estimates:
        metrics.update(estimate_metrics(estimates, estimate_tag))
        log_table_once(client, run.run_id, pd.DataFrame(estimates, columns=ESTIMATE_COLUMNS_SHOWN),
                       f"eval/estimate_{estimate_tag}.json")
    if weights:
        log_table_once(client, run.run_id, pd.DataFrame(weights), AGGREGATE_WEIGHTS_ARTIFACT)
    n_new = log_metrics_once(client, run.run_id, metrics)
    table_artifact = SHIFT_TABLE_ARTIFACT if args.tta == "none" else tta_table_artifact(args.tta)
    table_written = log_table_once(client, run.run_id, table, table_artifact)
    if not args.no_figures and args.tta == "none":
        with tempfile.TemporaryDirectory() as d:
            for p in run_figures(run, targets, rows, Path(d)):
                client.log_artifact(run.run_id, str(p), FIGURES_DIR)
    n_finite = sum(math.isfinite(v) for v in metrics.values())
    print(f"MLflow run {run.run_id}: {n_new} metrics written, {n_finite - n_new} unchanged, "
          f"{len(metrics) - n_finite} not logged (NaN: an empty shot group); "
          f"table {table_artifact} {'written' if table_written else 'unchanged'}"
          f"{'' if args.no_figures or args.tta != 'none' else f', figures in {FIGURES_DIR}/'}")
    return 0

