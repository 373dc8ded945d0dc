"""One table that ranks them all (issue 23): every method trained on the same data with the same backbone, epochs
and augmentation, each with its post-hoc rules, EM- and MAPLS-estimated priors and, for the multi-expert methods,
SADE's test-time aggregation, under the 11 shifted priors and the 6 knock-outs.

It runs what a user runs, in a fresh folder: ``pipelines/train.py --config <dataset>/<method>`` once per method
(one MLflow experiment), then ``pipelines/compare.py --experiment ... --estimate-prior em mapls --aggregate
self-supervised``. It prints the table, then the comparison the issue asks for as ``<name> <ratio>`` lines: the
best estimated-prior row of LADE over SADE's aggregation at each target (goal >= 1 within noise), and the
estimated-prior top-1 over the true-prior top-1 of LADE (goal >= 0.98 where a target has >= 1 000 images).

  python bench/rank_methods.py [--dataset synthetic] [--methods lade softmax sade balpoe] [--workdir DIR]
  python bench/make_places_lt_mini.py --out DIR        # a dataset in Places-LT's published layout, prepared
  python bench/rank_methods.py --dataset bench/configs/places_lt_mini --workdir DIR
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lade_core.report.tables import format_table

REPO = Path(__file__).resolve().parents[1]
AGGREGATE = "aggregate (self-supervised)"


def run(args: list[str], cwd: Path) -> str:
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic",
                    help="a dataset folder of lade's recipes (lade_core/recipes), or a folder of <method>.yaml "
                         "configs such as bench/configs/places_lt_mini")
    ap.add_argument("--methods", nargs="+", default=["lade", "softmax", "sade", "balpoe"])
    ap.add_argument("--workdir", help="default: a fresh temporary folder")
    ap.add_argument("--no-train", action="store_true", help="compare the runs already trained in --workdir")
    ap.add_argument("--train-args", default="", help="extra train.py flags for every method, e.g. '--epochs 4'")
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rank-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(args.dataset)
    dataset = folder.name
    experiment = f"rank-{dataset}"
    for method in [] if args.no_train else args.methods:
        config = str((folder / f"{method}.yaml").resolve()) if folder.is_dir() else f"{args.dataset}/{method}"
        t0 = time.perf_counter()
        run([str(REPO / "pipelines" / "train.py"), "--config", config, "--experiment", experiment,
             "--run-name", f"{dataset}-{method}", *args.train_args.split()], work)
        print(f"trained {method} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = run([str(REPO / "pipelines" / "compare.py"), "--experiment", experiment, "--estimate-prior", "em", "mapls",
               "--aggregate", "self-supervised", "--format", "csv", "--no-log"], work)
    table = pd.read_csv(io.StringIO(out))
    targets = [c for c in table.columns[3:] if c not in ("many", "medium", "few", "ece", "n") and "/" not in c]
    print(format_table(table.to_dict("records"), ["loss", "posthoc", *targets]), end="")
    rows = {(r["loss"], r["posthoc"].split(" (τ")[0]): r for _, r in table.iterrows()}
    estimated = [rows[k] for k in rows if k[0] == "lade" and "estimate" in k[1]]
    if ("sade", AGGREGATE) in rows and estimated:
        sade = rows[("sade", AGGREGATE)]
        for t in targets:
            best = max(float(r[t]) for r in estimated)
            print(f"lade_estimate/sade_aggregate@{t} {best / float(sade[t]):.3f}")
    true = rows.get(("lade", "inject"))
    for r in estimated:
        for t in targets[:-1]:
            print(f"{r['posthoc']}/true@{t} {float(r[t]) / float(true[t]):.3f}")


if __name__ == "__main__":
    main()
