"""Convert a raw dataset into a prepared dataset directory (Parquet shards + dataset.json).

The command itself is lade_core.cli.prepare_data (also installed as `lade prepare-data`); this file stays so that
`ray job submit --working-dir . -- python pipelines/prepare_data.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
