"""Ray Tune search spaces, one module per dataset family, as plain data: importing them has no side effects.

Each family module defines ``SPACE`` (config key -> distribution spec) and ``DEFAULTS`` (search settings: the
base config file, epochs, samples, ASHA grace period). A spec is one of
  ("loguniform", low, high)   ("uniform", low, high)   ("choice", [values])   or a constant.
Keys are training config keys (lade_core.config); ``tau`` sets the LADER class weights alpha_c ∝ p_s(c)^tau.
``to_param_space`` turns a validated SPACE into Ray Tune domains (random search) or grids (grid search).
"""
from __future__ import annotations

import importlib
import math

FAMILIES = ("smoke", "synthetic", "cifar100_lt", "imagenet_lt", "places_lt", "inat18")
KINDS = ("loguniform", "uniform", "choice")
# Keys with a bounded range: a spec outside it is an error, not a silent clip.
BOUNDS = {"tau": (0.0, 1.0), "alpha": (0.0, math.inf), "lam": (0.0, math.inf), "lr": (0.0, math.inf),
          "backbone_lr": (0.0, math.inf), "weight_decay": (0.0, math.inf)}


def load_family(name: str) -> tuple[dict, dict]:
    """(SPACE, DEFAULTS) of a family, validated."""
    if name not in FAMILIES:
        raise ValueError(f"unknown search space {name!r}; choose one of {FAMILIES}")
    module = importlib.import_module(f"{__name__}.{name}")
    space = dict(module.SPACE)
    validate_space(space, name)
    return space, dict(module.DEFAULTS)


def validate_space(space: dict, name: str = "space") -> None:
    """Empty spaces, unknown kinds, lower > upper, non-positive log bounds and out-of-range keys are errors."""
    from lade_core.config import CONFIG_KEYS

    if not space:
        raise ValueError(f"search space {name!r} is empty")
    for key, spec in space.items():
        if key not in CONFIG_KEYS:
            raise ValueError(f"search space {name!r}: {key!r} is not a training config key")
        if not isinstance(spec, tuple):
            continue  # a constant
        if not spec or spec[0] not in KINDS:
            raise ValueError(f"search space {name!r}: {key} has unknown kind {spec[:1]}; choose one of {KINDS}")
        lo_ok, hi_ok = BOUNDS.get(key, (-math.inf, math.inf))
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
        if not isinstance(spec, tuple):
            out[key] = spec
        elif search == "grid":
            out[key] = tune.grid_search(grid_points(spec, points))
        elif spec[0] == "choice":
            out[key] = tune.choice(list(spec[1]))
        else:
            out[key] = getattr(tune, spec[0])(spec[1], spec[2])
    return out
