"""lade_core: the LADE paper's math (priors, losses, post-hoc compensation, metrics) plus data and training glue.

The math modules (priors, losses, posthoc, metrics, distributed) import only torch and numpy.
"""
__version__ = "0.1.0"
