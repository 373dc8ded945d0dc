"""Train a long-tailed classifier with Ray Train (DDP) and track it in MLflow — the main job of lade.

  python pipelines/train.py                                   # embedded default: synthetic data, local Ray
  python pipelines/train.py --config configs/cifar100_lt/lade.yaml --num-workers 4 --use-gpu
  ray job submit --working-dir . -- python pipelines/train.py --smoke-test

Config file -> CLI overrides (only flags you pass override). Rerunning with the same --run-name resumes.
The run itself (checks, resume or finalize, seed groups) is lade_core.train.driver.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from lade_core.config.flags import add_loss_arguments, json_or_name
from lade_core.data import DECODE_PLACES
from lade_core.methods import LOSSES
from lade_core.models.foundation import PEFT_METHODS
from lade_core.runtime.local_ray import quiet_logging, shutdown_ray
from lade_core.train.driver import train_run, train_seeds
from lade_core.train.runs import SMOKE

DEFAULT_CONFIG = "synthetic/lade"  # one of lade's recipes (lade_core/recipes), found wherever lade is installed


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file, or a recipe of lade's by name "
                    "(dataset/method, e.g. cifar100_lt/causal_norm; default: synthetic/lade)")
    ap.add_argument("--dataset", help="prepared dataset directory")
    ap.add_argument("--loss", choices=sorted(LOSSES))
    ap.add_argument("--model", help="resnet32 (lade's), any torchvision classification model (e.g. resnet50, "
                    "convnext_tiny, vit_b_16), or timm:NAME with lade[timm]")
    ap.add_argument("--pretrained", nargs="?", const="DEFAULT",
                    help="the library's pretrained backbone: torchvision weights name (default DEFAULT) or timm tag")
    ap.add_argument("--weights-path", dest="weights_path", help="local state dict to initialize the model from "
                    "(a lade, torchvision or timm checkpoint; a classifier of another class count is left out)")
    ap.add_argument("--pretrained-file", dest="pretrained_file", help="a local copy of the library's pretrained "
                    "weights (timm: e.g. a Hugging Face repository's open_clip_pytorch_model.bin or "
                    "model.safetensors), for a machine without internet")
    ap.add_argument("--peft", choices=PEFT_METHODS, help="fine-tune a pretrained ViT with adapters in its frozen "
                    "backbone (adaptformer, lora), train the head only (linear), or all of it (none, the default)")
    ap.add_argument("--peft-rank", dest="peft_rank", type=int, help="adaptformer's bottleneck width or LoRA's rank "
                    "(default: LIFT's 2^floor(log2(C / 2L)) for adaptformer, 8 for lora)")
    ap.add_argument("--text-init", dest="text_init", action="store_true", help="a cosine classifier initialised "
                    "from the CLIP text embeddings of 'a photo of a {class}.' (a timm CLIP model; lade[clip])")
    ap.add_argument("--augment", type=json_or_name, help="training augmentation: a preset (cifar, imagenet) or a "
                    "JSON list of torchvision.transforms.v2 entries, e.g. '[{\"RandomCrop\": {\"size\": 32, "
                    "\"padding\": 4}}]'")
    ap.add_argument("--normalize", type=json_or_name,
                    help="dataset, a family name, or JSON {\"mean\": [..], \"std\": [..]}")
    ap.add_argument("--mixup", type=lambda a: {"alpha": float(a)}, metavar="ALPHA", help="mixup, Beta(α, α)")
    ap.add_argument("--cutmix", type=lambda a: {"alpha": float(a)}, metavar="ALPHA", help="CutMix, Beta(α, α)")
    add_loss_arguments(ap)  # --alpha, --tau, ...: each loss's own, from its declaration (lade_core.methods)
    ap.add_argument("--image-size", dest="image_size", type=int,
                    help="crop size for training and evaluation (default: the prepared dataset's)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--num-workers", dest="num_workers", type=int)
    ap.add_argument("--use-gpu", dest="use_gpu", action="store_true")
    ap.add_argument("--decode", choices=DECODE_PLACES, help="where training images are decoded: by Ray Data's tasks, "
                    "by the training worker itself, on its GPU (device: nvJPEG), or auto (the worker on CPUs, its GPU "
                    "where nvJPEG works, else Ray Data; the default)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", help="one run per seed, under a parent run (compare.py reports "
                    "mean ± std over them)")
    ap.add_argument("--experiment")
    ap.add_argument("--run-name", dest="run_name")
    ap.add_argument("--mlflow-uri", dest="mlflow_uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--register", help="register the final model under this name")
    ap.add_argument("--storage-path", dest="storage_path",
                    help="Ray Train checkpoints: a path or a URI such as s3://bucket/runs (default "
                         "./outputs/ray_results)")
    ap.add_argument("--max-failures", dest="max_failures", type=int)
    ap.add_argument("--num-cpus", dest="num_cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--smoke-test", dest="smoke_test", action="store_true", help="tiny data, 1 epoch")
    ap.add_argument("--verbose", action="store_true", help="show Ray's INFO logs")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no per-epoch progress bar (the default when stderr is not a terminal)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = vars(parse_args(argv))
    config_path, num_cpus, smoke = args.pop("config"), args.pop("num_cpus", None), args.pop("smoke_test", False)
    quiet_logging(args.pop("verbose", False))
    overrides = {**(SMOKE if smoke else {}), **args}
    if not sys.stderr.isatty():  # bars redrawn into a log file are noise; the epoch lines say it all
        overrides["progress"] = False
    if "dataset" in args:  # a dataset the user named is opened, never generated from a recipe in the config
        overrides["synthetic"] = None
    seeds = overrides.pop("seeds", None)
    if seeds:
        if "seed" in overrides:
            print("error: pass --seed or --seeds, not both", file=sys.stderr)
            return 2
        rc = train_seeds(config_path, overrides, num_cpus, seeds)
    else:
        with contextlib.ExitStack() as held:  # the run's lock, taken once its name is known, until this driver ends
            rc = train_run(config_path, overrides, num_cpus, held)
    shutdown_ray()
    return rc

