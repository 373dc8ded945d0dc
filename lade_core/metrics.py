"""``lade_core.math.metrics``, its home, under its old import path: the two names are one module, so code written
against this path (user code, notebooks, stored artifacts) keeps working."""
import sys

from .math import metrics

sys.modules[__name__] = metrics
