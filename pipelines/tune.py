"""Search LADE's α, λ, the class weights α_c ∝ p_s^power and the learning rate with Ray Tune, or the loss itself with
each method's own hyperparameters (--methods); every trial in MLflow.

The command itself is lade_core.cli.tune (also installed as `lade tune`); this file stays so that
`ray job submit --working-dir . -- python pipelines/tune.py ...` runs it from a checkout.
"""
import sys

from lade_core.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
