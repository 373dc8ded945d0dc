"""lade_core: the LADE paper's math (lade_core.math: priors, losses, heads, post-hoc rules, metrics, evaluation,
label shift) plus data, models, Ray Train / Tune and MLflow glue, and the drivers.

The math modules import only torch and numpy; their old paths (lade_core.losses, ...) are the same modules.
"""
__version__ = "0.1.0"
