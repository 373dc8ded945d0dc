"""Train a long-tailed classifier with Ray Train (DDP) and track it in MLflow — the main job of lade.

The command itself is lade_core.cli.train (also installed as `lade train`); this file stays so that
`ray job submit --working-dir . -- python pipelines/train.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
