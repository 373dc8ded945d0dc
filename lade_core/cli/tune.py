"""Search LADE's α, λ, the class weights α_c ∝ p_s^power and the learning rate with Ray Tune, or the loss itself with
each method's own hyperparameters (--methods); every trial in MLflow.

  python pipelines/tune.py --smoke-test                                   # 4 trials x 2 epochs, tiny data
  python pipelines/tune.py --space cifar100_lt --methods lade causal_norm logit_adjusted --objective shift_mean
  python pipelines/tune.py --space cifar100_lt --dataset data/cifar100_lt --objective shift_mean --register lade-c100

Ray Train V2 under Tune: each trial runs a driver function that fits a TorchTrainer (DDP workers); ASHA stops
poor trials early on epochs. Objective: validation top-1 under the uniform prior (`uniform`) or the mean top-1
over the 11 shifted priors with the loss's post-hoc rule (`shift_mean`). MLflow: a parent run named after the
experiment, one nested child run per trial, the search summary on the parent; the best trial's model is
registered under --register with the alias `champion`. Rerunning with the same --experiment resumes the search.
"""
from __future__ import annotations

import argparse
import contextlib
import os

from lade_core.config.flags import json_or_name
from lade_core.models.foundation import PEFT_METHODS
from lade_core.runtime.local_ray import quiet_logging
from lade_core.tune import spaces as tune_spaces
from lade_core.tune.search import search
from lade_core.tune.trials import OBJECTIVES


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", choices=tune_spaces.SPACES, help="search space family (default: synthetic; smoke "
                    "with --smoke-test)")
    ap.add_argument("--config", help="base training config (default: the space's)")
    ap.add_argument("--methods", nargs="+", metavar="LOSS", help="search over these losses too, each with its own "
                    "hyperparameters (LADE: the space's ranges; others: their declared ranges, "
                    "tune_spaces.method_space)")
    ap.add_argument("--dataset", help="prepared dataset directory (default: the config's)")
    ap.add_argument("--epochs", type=int, help="epochs per trial = ASHA's max_t (default: the space's)")
    ap.add_argument("--augment", type=json_or_name, help="every trial's training augmentation: a preset or a JSON list "
                    "of torchvision.transforms.v2 entries (as train.py --augment)")
    ap.add_argument("--normalize", type=json_or_name, help="dataset, a family name, or JSON {mean, std}")
    ap.add_argument("--cache-features", action="store_true", help="with peft linear (a frozen backbone): compute "
                    "the backbone's features once (Ray Data, stored beside the prepared data) and train each trial's "
                    "head on them: seconds per trial")
    ap.add_argument("--peft", choices=PEFT_METHODS, help="every trial's fine-tuning (as train.py --peft)")
    ap.add_argument("--model", help="every trial's model (as train.py --model)")
    ap.add_argument("--pretrained", nargs="?", const="DEFAULT", help="as train.py --pretrained")
    ap.add_argument("--pretrained-file", help="as train.py --pretrained-file")
    ap.add_argument("--text-init", action="store_true", default=None, help="as train.py --text-init")
    ap.add_argument("--image-size", type=int, help="as train.py --image-size")
    ap.add_argument("--num-workers", type=int, default=1, help="training workers per trial")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--num-samples", type=int, help="trials (random) or repeats of the grid (grid)")
    ap.add_argument("--max-concurrent-trials", type=int, help="default: as many as the cluster's CPUs fit")
    ap.add_argument("--search", choices=("random", "grid"), default="random")
    ap.add_argument("--grid-points", type=int, default=3, help="points per range with --search grid")
    ap.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    ap.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/r at each rung")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="uniform")
    ap.add_argument("--experiment", default="lade-tune", help="MLflow experiment and Tune run name; rerun to resume")
    ap.add_argument("--register", help="register the best trial's model under this name, alias 'champion'")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--storage-path", help="Tune and trial checkpoints: a path or a URI such as s3://bucket/tune "
                    "(default ./outputs/tune)")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--seed", type=int, default=0, help="random search seed")
    ap.add_argument("--smoke-test", action="store_true", help="tiny data, the smoke space, 4 trials x 2 epochs")
    ap.add_argument("--verbose", action="store_true", help="show Ray's INFO logs")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet_logging(args.verbose)
    with contextlib.ExitStack() as held:  # the search's lock, until this driver ends
        return search(args, held)

