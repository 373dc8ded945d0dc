"""``lade_core.math.posthoc``, its home, under its old import path: the two names are one module, so code written
against this path (user code, notebooks, stored artifacts) keeps working."""
import sys

from .math import posthoc

sys.modules[__name__] = posthoc
