"""Compare runs side by side in the form of the paper's Table 6 (`lade compare --help` says how).

The command itself is lade_core.cli.compare (also installed as `lade compare`); this file stays so that
`ray job submit --working-dir . -- python pipelines/compare.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
