"""Serve a registered model over HTTP with Ray Serve, its target prior given per request or following the traffic.

The command itself is lade_core.cli.serve (also installed as `lade serve`); this file stays so that
`ray job submit --working-dir . -- python pipelines/serve.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
