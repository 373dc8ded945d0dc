"""Ray Tune search spaces: a dataset's lives in its recipe folder, ``recipes/<dataset>/_search.yaml``, beside the
training recipes it searches (``<dataset>/lade``), so a dataset is declared in one place.

A search file holds ``space`` (config key -> distribution spec) and the search's settings: ``num_samples``,
``grace_period`` (ASHA's), and ``epochs`` where a trial trains for fewer or more epochs than the recipe. A spec is
  [loguniform, low, high]   [uniform, low, high]   [choice, [values]]   or a constant.
Keys are training config keys (lade_core.config.schema); ``class_weight_power`` sets the LADER class weights
alpha_c ∝ p_s(c)^power. ``to_param_space`` turns a validated space into Ray Tune domains (random search) or grids
(grid search). ``recipes/synthetic/_search_smoke.yaml`` is the ``smoke`` space (``--smoke-test``).

A search over the loss itself: ``with_methods(space, names)`` replaces the family's LADE keys by
  "loss": ("methods", {name: {its own hyperparameter: spec, ...}, ...})
(LADE keeps the family's ranges, every other method takes its declared ranges, ``method_space``). Each trial draws a
method, then that method's own values; ``lade_core.tune.trials.select_method`` turns the draw into a plain training
config.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from lade_core.config.recipes import RECIPES
from lade_core.registry import Registry

SEARCH_FILE = "_search.yaml"
# A space's name -> its search file: each dataset folder's, and the smoke test's (another package may register its
# own file).
SPACES: Registry[Path] = Registry("search space", {
    **{f.parent.name: f for f in sorted(RECIPES.glob(f"*/{SEARCH_FILE}"))},
    "smoke": RECIPES / "synthetic" / "_search_smoke.yaml"})
FAMILIES = tuple(SPACES)  # the built-in ones
SETTINGS = ("space", "num_samples", "grace_period", "epochs")
REQUIRED = SETTINGS[:3]  # epochs defaults to the recipe's
KINDS = ("loguniform", "uniform", "choice")
# Non-loss keys with a bounded range: a spec outside it is an error, not a silent clip. A loss hyperparameter's
# range is its loss's declaration (lade_core.methods.LOSSES): the family's LADE keys are LADE's.
BOUNDS = {"lr": (0.0, math.inf), "backbone_lr": (0.0, math.inf), "weight_decay": (0.0, math.inf)}


def method_space(name: str) -> dict:
    """Loss ``name``'s own ranges for a search over the loss: each hyperparameter's declared ``space`` (bracketing
    its paper's value); the others keep their defaults."""
    from lade_core.methods import LOSSES

    return {h.name: h.space for h in LOSSES[name].params if h.space is not None}


def _bounds(key: str, loss: str) -> tuple[float, float]:
    """(low, high) a range for ``key`` must lie in: the declared bounds of loss ``loss``'s hyperparameter ``key``
    (open or closed alike: a range's end may touch them), else ``BOUNDS``."""
    from lade_core.methods import LOSSES

    if key in LOSSES[loss].hyperparameters:
        h = LOSSES[loss].param(key)
        low = h.ge if h.ge is not None else h.gt
        high = h.le if h.le is not None else h.lt
        return (-math.inf if low is None else float(low), math.inf if high is None else float(high))
    return BOUNDS.get(key, (-math.inf, math.inf))


METHODS = "methods"


def with_methods(space: dict, names: list[str]) -> dict:
    """``space`` searching over the losses ``names`` too: LADE with the family's LADE ranges, the others with
    ``method_space``; the family's other keys (learning rate, ...) are shared by all."""
    from lade_core.methods import LOSSES

    unknown = [n for n in names if n not in LOSSES]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose among {sorted(LOSSES)}" if unknown else "no methods given")
    lade_keys = set(LOSSES["lade"].hyperparameters)
    methods = {n: {k: v for k, v in space.items() if k in lade_keys} if n == "lade" else method_space(n)
               for n in names}
    return {**{k: v for k, v in space.items() if k not in lade_keys}, "loss": (METHODS, methods)}


def _spec(value):
    """A YAML spec as the tuple ``validate_space`` reads ([kind, ...] -> (kind, ...)); a constant as given."""
    return tuple(value) if isinstance(value, list) else value


def load_family(name: str) -> tuple[dict, dict]:
    """(space, settings) of a search space by name, validated. The settings: the base config (the space's dataset's
    ``lade`` recipe), the epochs per trial (the file's, else the recipe's), num_samples, grace_period."""
    from lade_core.config.recipes import resolve_config

    path = SPACES.lookup(name)
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict):
        raise ValueError(f"search space {name!r} ({path}): a search file is a mapping whose `space` maps config keys "
                         "to specs")
    unknown, missing = sorted(set(data) - set(SETTINGS)), [k for k in REQUIRED if k not in data]
    if unknown or missing:
        raise ValueError(f"search space {name!r} ({path}): unknown keys {unknown}, missing keys {missing}; a search "
                         f"file holds {list(SETTINGS)}, all but epochs required")
    space = {key: _spec(spec) for key, spec in data["space"].items()}
    validate_space(space, name)
    config = f"{Path(path).parent.name}/lade"
    epochs = data.get("epochs") or resolve_config(config, {})["epochs"]
    return space, {"config": config, "epochs": epochs, "num_samples": data["num_samples"],
                   "grace_period": data["grace_period"]}


def validate_space(space: dict, name: str = "space", loss: str = "lade") -> None:
    """Empty spaces, unknown kinds, lower > upper, non-positive log bounds and out-of-range keys are errors; loss
    hyperparameters are those of ``loss`` (a family's space is LADE's)."""
    from lade_core.config.schema import CONFIG_KEYS

    if not space:
        raise ValueError(f"search space {name!r} is empty")
    for key, spec in space.items():
        if key == "loss" and isinstance(spec, tuple) and spec[:1] == (METHODS,):
            _validate_methods(spec, name)
            continue
        if key not in CONFIG_KEYS:
            raise ValueError(f"search space {name!r}: {key!r} is not a training config key")
        if not isinstance(spec, tuple):
            continue  # a constant
        if not spec or spec[0] not in KINDS:
            raise ValueError(f"search space {name!r}: {key} has unknown kind {spec[:1]}; choose one of {KINDS}")
        lo_ok, hi_ok = _bounds(key, loss)
        if spec[0] == "choice":
            values = spec[1] if len(spec) == 2 else []
            if not values:
                raise ValueError(f"search space {name!r}: {key} choice has no values")
            bad = [v for v in values if isinstance(v, (int, float)) and not lo_ok <= v <= hi_ok]
            if bad:
                raise ValueError(f"search space {name!r}: {key} values {bad} outside [{lo_ok}, {hi_ok}]")
            continue
        if len(spec) != 3:
            raise ValueError(f"search space {name!r}: {key} needs (kind, low, high), got {spec}")
        _, lo, hi = spec
        if not lo < hi:
            raise ValueError(f"search space {name!r}: {key} lower bound {lo} is not below upper bound {hi}")
        if spec[0] == "loguniform" and lo <= 0:
            raise ValueError(f"search space {name!r}: {key} loguniform needs low > 0, got {lo}")
        if lo < lo_ok or hi > hi_ok:
            raise ValueError(f"search space {name!r}: {key} range [{lo}, {hi}] outside [{lo_ok}, {hi_ok}]")


def _validate_methods(spec: tuple, name: str) -> None:
    from lade_core.methods import LOSSES

    methods = spec[1] if len(spec) == 2 and isinstance(spec[1], dict) else None
    if not methods:
        raise ValueError(f"search space {name!r}: loss methods need {{method: {{hyperparameter: spec}}}}, got "
                         f"{spec[1:]}")
    for method, sub in methods.items():
        if method not in LOSSES:
            raise ValueError(f"search space {name!r}: unknown method {method!r}; choose among {sorted(LOSSES)}")
        bad = sorted(set(sub) - set(LOSSES[method].hyperparameters))
        if bad:
            raise ValueError(f"search space {name!r}: loss {method} takes no hyperparameters {bad}; it takes "
                             f"{list(LOSSES[method].hyperparameters)}")
        if sub:
            validate_space(sub, f"{name}/{method}", method)


def grid_points(spec: tuple, points: int) -> list:
    """Evenly spaced values of a range (log-spaced for loguniform), or a choice's values."""
    if spec[0] == "choice":
        return list(spec[1])
    _, lo, hi = spec
    if points == 1:
        return [math.sqrt(lo * hi) if spec[0] == "loguniform" else (lo + hi) / 2]
    if spec[0] == "loguniform":
        return [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]


def to_param_space(space: dict, search: str = "random", points: int = 3) -> dict:
    """Ray Tune domains: tune.loguniform/uniform/choice (random) or tune.grid_search over grid_points (grid)."""
    from ray import tune

    if search not in ("random", "grid"):
        raise ValueError(f"unknown search {search!r}; choose random or grid")
    out = {}
    for key, spec in space.items():
        if key == "loss" and isinstance(spec, tuple) and spec[:1] == (METHODS,):
            out.update(_methods_param_space(spec[1], search, points))
        elif not isinstance(spec, tuple):
            out[key] = spec
        elif search == "grid":
            out[key] = tune.grid_search(grid_points(spec, points))
        elif spec[0] == "choice":
            out[key] = tune.choice(list(spec[1]))
        else:
            out[key] = getattr(tune, spec[0])(spec[1], spec[2])
    return out


def _methods_param_space(methods: dict, search: str, points: int) -> dict:
    """Random: ``loss`` drawn among the methods and every method's values drawn as ``<method>/<key>`` (the trial
    keeps its own method's). Grid: ``loss`` runs through one {loss, key: value, ...} per method and grid point, so
    no method is crossed with another's values."""
    import itertools

    from ray import tune

    if search == "grid":
        settings = []
        for method, sub in methods.items():
            keys = list(sub)
            values = [grid_points(sub[k], points) if isinstance(sub[k], tuple) else [sub[k]] for k in keys]
            settings += [{"loss": method, **dict(zip(keys, combo))} for combo in itertools.product(*values)]
        return {"loss": tune.grid_search(settings)}
    out = {"loss": tune.choice(list(methods))}
    for method, sub in methods.items():
        out.update({f"{method}/{k}": v for k, v in to_param_space(sub, search, points).items()} if sub else {})
    return out
