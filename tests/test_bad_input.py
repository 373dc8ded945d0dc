"""Inputs that used to fail late (after Ray started, after inference, inside a worker) or with a traceback: each is
one clear error naming it, exit code 2, before any compute. The scripts run as a user runs them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lade_core.tracking.artifacts import write_logits_parquet, write_source_info

pytestmark = pytest.mark.slow  # a dozen script start-ups (torch, Ray and MLflow imports): over a minute


def _start(script: str, *args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "pipelines" / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    proc = _start(script, *args, cwd=cwd)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _refused(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "Started a local Ray instance" not in p.stdout + p.stderr  # refused before Ray


# (script, flags, the message it must print): each is refused before Ray starts.
BAD_FLAGS = [
    ("train.py", ["--seed", "4294967296"], "seed must be <= 4294967295"),
    ("tune.py", ["--experiment", "team/x"], "--experiment 'team/x': use letters, digits"),
    ("tune.py", ["--space", "cifar100_lt", "--epochs", "10"],
     "ASHA's grace period 20 (the cifar100_lt space's default) exceeds the 10 epochs per trial"),
    ("tune.py", ["--grace-period", "0"], "--grace-period must be >= 1, got 0"),
    ("predict.py", ["--model", "models:/m/1", "--input", ".", "--output", "nodir/x.parquet"],
     "--output nodir/x.parquet: folder nodir does not exist"),
    ("predict.py", ["--model", "models:/m/1", "--input", ".", "--output", "x.parquet", "--target-prior", "estimate",
                    "--interval", "1.5"], "--interval must be a level in (0, 1) such as 0.9, or 0 for none; got 1.5"),
    ("predict.py", ["--model", "models:/m/1", "--input", ".", "--output", "x.parquet", "--aggregate", "self-supervised",
                    "--target-prior", "estimate"], "--aggregate learns the experts' weights from the images and "
     "injects no prior; it does not take --target-prior 'estimate'"),
    ("prepare_data.py", ["synthetic", "--imbalance-ratio", "0.5", "--out", "d"], "imbalance_ratio must be >= 1"),
]


def test_bad_flags_are_one_clear_error_before_ray(tmp_path):
    # All at once: each process is mostly interpreter and import start-up.
    procs = []
    for i, (script, args, message) in enumerate(BAD_FLAGS):
        cwd = tmp_path / str(i)
        cwd.mkdir()
        procs.append((_start(script, *args, cwd=cwd), message))
    for proc, message in procs:
        out, err = proc.communicate(timeout=300)
        _refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), message)


def test_bad_split_lists_and_annotations_are_one_clear_error(tmp_path):
    (tmp_path / "dash.txt").write_text("a.png 0\nb.png --5\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.png 0\n".encode("latin-1"))
    (tmp_path / "inat.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                    "annotations": [{"image_id": 1, "category_id": "x"}]}))
    for source, extra, message in (
            ("lists", ["--name", "n", "--train", "dash.txt"], "dash.txt:2: malformed line 'b.png --5'"),
            ("lists", ["--name", "n", "--train", "latin1.txt"], "latin1.txt: not UTF-8 text (byte 3)"),
            ("inat2018", ["--train", "inat.json"], "inat.json: not an iNaturalist annotation file (ValueError")):
        _refused(_run("prepare_data.py", source, "--image-root", ".", *extra, "--out", "d", cwd=tmp_path), message)


def test_a_target_prior_file_name_mlflow_cannot_key_is_refused_before_evaluating(tmp_path):
    logits = torch.randn(12, 3)
    write_logits_parquet(tmp_path / "test_logits.parquet", logits, torch.arange(12) % 3)
    write_source_info(tmp_path / "source_prior.json", [0.6, 0.3, 0.1], [6, 3, 1])
    (tmp_path / "p(t).json").write_text(json.dumps([0.2, 0.3, 0.5]))
    p = _run("evaluate.py", "--logits", "test_logits.parquet", "--source-info", "source_prior.json", "--loss", "lade",
             "--target-prior", "p(t).json", "--output", "out", cwd=tmp_path)
    _refused(p, "--target-prior p(t).json: its file name 'p(t)' names the target in the metric keys")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
