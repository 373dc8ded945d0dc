"""Compare runs side by side in the form of the paper's Table 6: top-1 under the 11 shifted target priors, then
under the 6 knock-outs (25 % / 50 % of the head, tail or random classes without a test image) and the mean over
all 17, plus uniform Many/Medium/Few and ECE. Each run gets one row per post-hoc rule that fits its loss: its own first
(softmax, focal: PC compensation; balanced_softmax, lade, logit_adjusted, ldam_drw, causal_norm: prior injection),
then ``raw``; a run whose logits take PC (softmax, focal) also gets an ``adjusted`` row, Menon et al.'s post-hoc logit
adjustment z - τ log p_s + log p_t, and, with a plain linear classifier, a ``tau_norm`` row, Decouple's
τ-normalized classifier evaluated from the stored logits and weights; both with τ chosen on the validation split.
Computed from each run's stored test logits. --estimate-prior em mapls: per method a row with p_t estimated from
each target's own unlabeled logits; --aggregate self-supervised: for each multi-expert run (sade, balpoe) a row of
SADE's test-time aggregation, its weights learned on each target's stored augmented views.

  python pipelines/compare.py --run-ids ID1 ID2
  python pipelines/compare.py --experiment lade --format csv
  python pipelines/compare.py --model NAME            # every version of a registered model

Runs that differ only in seed (``train.py --seeds``, or any runs whose configs differ in nothing else) are one row
with mean ± std (sample std) and their count n in every cell; --per-run shows each run.

The table is printed and logged to a run of the experiment `lade-compare` (compare.md, compare.csv,
compare.json via mlflow.log_table, and compare.png: top-1 across the 11 priors, one line per run and rule).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from lade_core.math.evaluation import KNOCKOUT_NAMES, PROTOCOL_NAMES
from lade_core.math.label_shift import METHODS
from lade_core.report.figures import shift_curve
from lade_core.report.protocol import rule_rows
from lade_core.report.tables import FORMATS, MeanStd, format_table, group_rows
from lade_core.runtime.local_ray import quiet_logging
from lade_core.tracking.artifacts import load_run_logits, missing_views_message, runs_with_logits
from lade_core.tracking.store import log_result_run, mlflow_client, resolve_tracking_uri

PRIORS = list(PROTOCOL_NAMES)
TARGETS = [*PRIORS, *KNOCKOUT_NAMES, "mean"]
COLUMNS = ["run", "loss", "posthoc", *TARGETS, "many", "medium", "few", "ece"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-ids", nargs="+", help="MLflow run ids")
    src.add_argument("--experiment", help="every run of this experiment that stored test logits")
    src.add_argument("--model", help="every version of this registered model")
    ap.add_argument("--estimate-prior", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                    help=f"one or more of {', '.join(METHODS)}: a row per method with the top-1 under p_t estimated "
                    "from each target's own logits, and its fraction of the top-1 with the true p_t (mean and min "
                    "over the 17 targets) on the run's own row")
    ap.add_argument("--aggregate", choices=["self-supervised"], help="for each multi-expert run (sade, balpoe): a "
                    "row of SADE's test-time aggregation, weights learned on each target's own unlabeled images")
    ap.add_argument("--format", choices=FORMATS, default="markdown")
    ap.add_argument("--per-run", action="store_true", help="one row per run, not one mean ± std row per group of runs "
                    "that differ only in seed")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--log-experiment", default="lade-compare", help="experiment the comparison is logged to")
    ap.add_argument("--no-log", action="store_true", help="print only")
    ap.add_argument("--verbose", action="store_true", help="show MLflow's INFO logs and download bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging(args.verbose)
    uri = resolve_tracking_uri(args.mlflow_uri)
    client = mlflow_client(uri)
    try:
        run_ids = runs_with_logits(client, args.run_ids, args.experiment, args.model)
        runs = [load_run_logits(client, rid, classifier=True, expert_views=bool(args.aggregate)) for rid in run_ids]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.aggregate and all(r.expert_views is None for r in runs):
        print(f"error: --aggregate: {missing_views_message(runs[0])}", file=sys.stderr)
        return 2
    if "bbse" in args.estimate_prior and any(r.val_logits is None for r in runs):
        print("error: --estimate-prior bbse needs validation logits, which some of these runs lack", file=sys.stderr)
        return 2
    per_run = [(r, row) for r in runs for row in rule_rows(r, args.estimate_prior,
                                                                   r.expert_views is not None)]
    extra = [f"{m}/true {s}" for m in args.estimate_prior for s in ("mean", "min")]
    rows = [row for _, row in per_run]
    columns = COLUMNS + extra
    if not args.per_run:
        # Runs that differ only in seed: one row, mean ± std (n runs) in every cell. A tuned rule's label carries its
        # own τ per run, so rows group by the rule's name.
        for _, row in per_run:
            row["rule"] = row["posthoc"].split(" (τ=")[0]  # "inject (em estimate)" stays its own rule
        grouped = group_rows(rows, [r.seed_group for r, _ in per_run], ["loss", "rule"],
                             [*TARGETS, "many", "medium", "few", "ece", *extra])
        for row in grouped:
            if row["n"] > 1:
                row["run"], row["posthoc"] = f"{row['run'].rsplit('-seed', 1)[0]} (seeds)", row["rule"]
        rows, columns = grouped, [*COLUMNS, "n", *extra]
    print(format_table(rows, columns, args.format), end="")
    if args.no_log:
        return 0
    with tempfile.TemporaryDirectory() as d:
        files = []
        for fmt, name in (("markdown", "compare.md"), ("csv", "compare.csv")):
            (Path(d) / name).write_text(format_table(rows, columns, fmt))
            files.append(Path(d) / name)
        curves = [{"mode": f"{r['run']} {r['posthoc']}", "target": p, "top1": float(r[p]),
                   "std": getattr(r[p], "std", 0.0)} for r in rows for p in PRIORS]
        files.append(shift_curve(curves, PRIORS, Path(d) / "compare.png", "top-1 under label shift"))
        table = pd.DataFrame([{k: v.text(6) if isinstance(v, MeanStd) else v for k, v in r.items()} for r in rows],
                             columns=columns)
        logged = log_result_run(uri, args.log_experiment, f"compare-{len(rows)}-runs", files=tuple(files),
                                tags={"lade.compared_runs": ",".join(r.run_id for r in runs)},
                                tables={"compare.json": table})
    print(f"logged to MLflow run {logged} (experiment {args.log_experiment})", file=sys.stderr)
    return 0

