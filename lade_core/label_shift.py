"""``lade_core.math.label_shift``, its home, under its old import path: the two names are one module, so code written
against this path (user code, notebooks, stored artifacts) keeps working."""
import sys

from .math import label_shift

sys.modules[__name__] = label_shift
