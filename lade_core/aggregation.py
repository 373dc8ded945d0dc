"""``lade_core.math.aggregation``, its home, under the short path every math module has: the two names are one
module."""
import sys

from .math import aggregation

sys.modules[__name__] = aggregation
