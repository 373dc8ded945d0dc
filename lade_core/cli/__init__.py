"""The ``lade`` command: ``lade train|tune|evaluate|compare|predict|serve|prepare-data [FLAGS]``.

Each subcommand is a module here with ``parse_args`` and ``main(argv) -> exit status``; ``pipelines/<name>.py`` runs
the same ``main`` from a checkout (what ``ray job submit -- python pipelines/train.py`` needs). A subcommand's module
is imported only when it runs: ``lade --help`` and ``lade evaluate`` never pay for Ray Train's or Serve's imports.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module in lade_core.cli, one line for `lade --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("prepare_data", "convert a raw dataset into Parquet shards and dataset.json"),
    "train": ("train", "train with Ray Train (DDP), tracked in MLflow; rerun the same --run-name to resume"),
    "tune": ("tune", "search hyperparameters or methods with Ray Tune (ASHA), every trial in MLflow"),
    "evaluate": ("evaluate", "score a run under any target prior from its stored logits"),
    "compare": ("compare", "compare runs side by side (the paper's Table 6)"),
    "predict": ("predict", "predict new images with a registered model under a given or estimated prior"),
    "serve": ("serve", "serve a registered model over HTTP with Ray Serve"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: lade COMMAND [FLAGS]   (lade COMMAND --help: that command's flags)\n\ncommands:\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from lade_core import __version__

        print(f"lade {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"lade: unknown command {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}\n\n{usage()}",
              end="", file=sys.stderr)
        return 2
    command = importlib.import_module(f"lade_core.cli.{COMMANDS[name][0]}")
    sys.argv[0] = f"lade {name}"  # argparse's prog: usage lines and errors name the command the user typed
    return command.main(rest)
