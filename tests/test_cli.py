"""The installed ``lade`` command (``[project.scripts]``): it lists every pipeline, names a mistyped command's close
match, and ``lade <command>`` is the same program as ``python pipelines/<command>.py``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

LADE = Path(sys.executable).parent / "lade"  # what `pip install -e .` put beside this interpreter


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, cwd=REPO)


def test_lade_help_lists_every_pipeline_script():
    p = _run(str(LADE), "--help")
    assert p.returncode == 0, p.stderr
    listed = {line.split()[0] for line in p.stdout.split("commands:")[1].splitlines() if line.strip()}
    scripts = {f.stem.replace("_", "-") for f in (REPO / "pipelines").glob("*.py")}
    assert listed == scripts == {"train", "tune", "evaluate", "compare", "predict", "serve", "prepare-data"}


def test_a_mistyped_command_is_one_error_with_its_close_match():
    p = _run(str(LADE), "evalute", "--run-id", "x")
    assert p.returncode == 2 and "unknown command 'evalute' (did you mean 'evaluate'?)" in p.stderr, p.stderr
    assert _run(str(LADE)).returncode == 2  # no command: the usage, and a failing status for scripts


def test_lade_command_is_the_pipeline_script():
    """The same flags and the same bad-input error, named after the command the user typed."""
    installed = _run(str(LADE), "evaluate", "--help")
    script = _run(sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--help")
    assert installed.returncode == script.returncode == 0, installed.stderr + script.stderr
    assert installed.stdout.startswith("usage: lade evaluate ") and script.stdout.startswith("usage: evaluate.py ")
    # after the usage lines (wrapped to the program name's width): the description and every flag, the same
    assert installed.stdout.split("\n\n", 1)[1] == script.stdout.split("\n\n", 1)[1]
    bad = _run(str(LADE), "evaluate", "--logits", "missing.parquet")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: --logits needs --source-info (the run's data/source_prior.json) and --loss"), bad.stderr
