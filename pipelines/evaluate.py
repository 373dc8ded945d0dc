"""Evaluate a trained run under any target prior p_t from its stored test logits: no re-inference, no GPU.

The command itself is lade_core.cli.evaluate (also installed as `lade evaluate`); this file stays so that
`ray job submit --working-dir . -- python pipelines/evaluate.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
