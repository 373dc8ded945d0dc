"""lade_core: long-tailed recognition under label shift (LADE, CVPR 2021) on Ray and MLflow.

The package, by concept (each subpackage's docstring says what its modules hold):

- ``math``: the paper's math (priors, losses, heads, post-hoc rules, metrics, evaluation, label shift); imports
  only torch and numpy.
- ``config``: a run's typed configuration.        - ``data``: raw sources -> prepared Parquet -> Ray Data.
- ``models``: backbones, foundation fine-tuning.  - ``train``: the driver, the Ray Train loop, checkpoints, runs.
- ``tune``: Ray Tune searches.                     - ``tracking``: the MLflow glue and the logged model format.
- ``serve``: batch inference, prediction, Serve.   - ``report``: tables and figures.
- ``runtime``: the local Ray and file locks.       - ``compat``: every private API of a library lade relies on.
- ``cli``: the ``lade`` command.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# The import paths that artifacts written by an earlier lade name, and the module that holds those names now. A
# search's tuner.pkl pickles the scheduler, the callback and the trainable of ``lade_core.tuning``; the entry file of
# a registered model imports ``lade_core.serving``. tests/test_compat_artifacts.py loads a committed artifact of each.
STORED_PATHS = {"lade_core.tuning": "lade_core.tune.trials", "lade_core.serving": "lade_core.tracking.model"}


class _StoredPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a path of ``STORED_PATHS`` as the module that holds its names now: one module object, two names."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in STORED_PATHS else None

    def create_module(self, spec):
        module = importlib.import_module(STORED_PATHS[spec.name])
        spec.loader_state = module.__spec__  # the import system is about to set the old path's spec on it
        return module

    def exec_module(self, module) -> None:
        # Give the module back its own spec, so a reload or a pickle by reference sees its real name.
        module.__spec__ = module.__spec__.loader_state

if not any(isinstance(f, _StoredPathFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StoredPathFinder())
