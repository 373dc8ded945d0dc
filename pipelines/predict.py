"""Predict with a logged lade model over new images, under a target prior p_t: Ray Data batch inference on a
cluster (model actors), the model in this process on one CPU node (no Ray).

The command itself is lade_core.cli.predict (also installed as `lade predict`); this file stays so that
`ray job submit --working-dir . -- python pipelines/predict.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
