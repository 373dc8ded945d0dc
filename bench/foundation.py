"""Fine-tuning a pretrained ViT lightly (lade_core.models.foundation): step time and memory of each --peft against full
fine-tuning of the same model, and a Tune search on cached features (--cache-features) against the same search
through the pipeline.

1. One training step (forward, LADE-CE... here plain cross-entropy, backward, SGD) of ``--model`` (default
   timm:vit_small_patch16_224, random weights: the cost does not depend on them) on a batch at 224 pixels, for
   peft none / adaptformer / lora / linear, each in a fresh process (its peak memory is its own): the best step
   time of a few after warm-up, and the peak memory (CUDA: max allocated; CPU: the process's peak RSS), each as a
   ratio to full fine-tuning, with the trainable fraction.
2. tune.py --smoke-test with timm:test_vit and --peft linear, 4 trials x 2 epochs, with and without
   --cache-features, each in its own process and folder: wall time and trials per minute (the ratio is the
   target: a search on cached features costs seconds per trial).
Run: python bench/foundation.py [--model timm:NAME] [--batch-size 8] [--skip-tune] [--smoke-test]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEFTS = ("none", "adaptformer", "lora", "linear")


def _step_child(model_name: str, peft: str, batch: int, steps: int, queue) -> None:
    import torch

    from lade_core.config.schema import OptimizerConfig
    from lade_core.models.backbones import build_model, transformer_depth
    from lade_core.models.foundation import Finetuning, default_rank, trainable_fraction
    from lade_core.train.loop import build_optimizer

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if not torch.cuda.is_available() else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = 1000
    ft = Finetuning(peft, default_rank(peft, classes, transformer_depth(model_name)))
    model = build_model(model_name, classes, finetuning=ft).to(device)
    opt = build_optimizer(model, OptimizerConfig(lr=0.01))
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # after warm-up
            best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    trainable, total = trainable_fraction(model)
    queue.put({"peft": peft, "rank": ft.rank, "step_s": best, "peak_bytes": peak, "trainable": trainable / total,
               "device": device.type})


def step_costs(model_name: str, batch: int, steps: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for peft in PEFTS:
        queue = ctx.Queue()
        p = ctx.Process(target=_step_child, args=(model_name, peft, batch, steps, queue))
        p.start()
        rows.append(queue.get())
        p.join()
    full = rows[0]
    for r in rows:
        r["step_vs_full"] = r["step_s"] / full["step_s"]
        r["memory_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
    return rows


def _mean_trial_seconds(stdout: str) -> float:
    """The mean of the trials' "total time (s)" in Tune's last status table: a trial's own time, without the
    search's start (Ray, the dataset, the feature cache) and end (the champion's finalization)."""
    lines = stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if "total time (s)" in line)
    names = [c.strip() for c in lines[header].strip("│ ").split("   ") if c.strip()]
    col = names.index("total time (s)")
    times = []
    for line in lines[header + 2:]:
        if not line.startswith("│ trial_driver_"):
            break
        cells = [c for c in line.strip("│ ").split() if c]
        times.append(float(cells[col]))
    return sum(times) / len(times)


def search_costs() -> list[dict]:
    rows = []
    for cached in (False, True):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, str(REPO / "pipelines" / "tune.py"), "--smoke-test", "--num-cpus", "4",
                   "--model", "timm:test_vit", "--peft", "linear", "--image-size", "16", "--mlflow-uri",
                   f"sqlite:///{d}/mlflow.db", "--storage-path", f"{d}/tune", "--scheduler", "fifo",
                   *(["--cache-features"] if cached else [])]
            env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
            env.pop("RAY_ADDRESS", None)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - t0
            if p.returncode:
                raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
            trials = sum(1 for line in p.stdout.splitlines() if line.startswith("| lade-tune-"))
            rows.append({"search": "cached features" if cached else "pipeline", "trials": trials,
                         "wall_s": round(wall, 1), "trials_per_min": round(60 * trials / wall, 2),
                         "mean_trial_s": round(_mean_trial_seconds(p.stdout), 2)})
    rows[1]["speedup"] = round(rows[1]["trials_per_min"] / rows[0]["trials_per_min"], 2)
    rows[1]["trial_speedup"] = round(rows[0]["mean_trial_s"] / rows[1]["mean_trial_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-tune", action="store_true")
    ap.add_argument("--smoke-test", action="store_true", help="timm:test_vit, batch 2, one step, no search")
    args = ap.parse_args()
    if args.smoke_test:
        args.model, args.batch_size, args.steps, args.skip_tune = "timm:test_vit", 2, 1, True
    for r in step_costs(args.model, args.batch_size, args.steps):
        print(f"{args.model} peft {r['peft']:<11} rank {str(r['rank']):<4} trainable {100 * r['trainable']:6.2f} %  "
              f"step {r['step_s']:.3f} s ({r['step_vs_full']:.2f}x full)  peak memory {r['peak_bytes'] / 2**20:,.0f} "
              f"MiB ({r['memory_vs_full']:.2f}x full) [{r['device']}]")
    if not args.skip_tune:
        for r in search_costs():
            print(json.dumps(r))


if __name__ == "__main__":
    main()
