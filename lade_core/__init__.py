"""lade_core: the LADE paper's math (lade_core.math: priors, losses, heads, post-hoc rules, metrics, evaluation,
label shift) plus data, models, Ray Train / Tune and MLflow glue, and the drivers.

The math modules import only torch and numpy; their old paths (lade_core.losses, ...) are the same modules.
"""
__version__ = "0.1.0"

# The math tier's modules under their old names (lade_core.losses, ...), as attributes too: ``lade_core.losses`` may
# already be in sys.modules (the loss registry puts it there for plugins) before its alias file ever ran.
_MATH = ("priors", "losses", "heads", "posthoc", "metrics", "evaluation", "label_shift", "checks", "distributed",
         "mixing", "aggregation")


def __getattr__(name: str):
    if name in _MATH:
        import importlib

        return importlib.import_module(f"{__name__}.math.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
