"""``lade_core.math.priors``, its home, under its old import path: the two names are one module, so code written
against this path (user code, notebooks, stored artifacts) keeps working."""
import sys

from .math import priors

sys.modules[__name__] = priors
