"""Old import path of ``lade_core.tune_spaces`` (the search spaces now live inside the package): the same module."""
import sys

from lade_core import tune_spaces as _spaces

sys.modules[__name__] = _spaces
