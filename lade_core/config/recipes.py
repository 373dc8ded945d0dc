"""Recipes: YAML config files (with ``base:`` inheritance, and ``configs/<dataset>/<method>.yaml`` composed of the
dataset's ``_base.yaml`` and the method's file), lade's own recipes shipped with the package, and
``resolve_config``: DEFAULTS <- the file <- the command line's overrides, checked by the schema."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from lade_core.config.schema import CLI, DEFAULTS, KEY_SECTION, TrainConfig
from lade_core.methods import LOSS_KEYS


def _merge(base: dict, over: dict, origins: dict | None = None, origin: str = "") -> dict:
    """``over``'s keys replace ``base``'s whole, mappings too: a file that sets ``schedule: {name: cosine}`` gets
    exactly that schedule, not its base's milestones beside it."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = copy.deepcopy(v)
        if origins is not None:
            origins[k] = origin
    return out


# configs/<dataset>/<method>.yaml without a file of its own is the dataset's _base.yaml under
# configs/methods/<method>.yaml: one recipe per dataset and one per method, composed, instead of a copy of each
# method in every dataset's directory (a dataset's own file, where it has one, states what differs there).
DATASET_BASE = "_base.yaml"
METHODS_DIR = "methods"
# lade's own recipes, package data (configs/ in a checkout links here): ``--config cifar100_lt/lade`` names one.
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def composed_recipe(path: str | Path) -> list[Path] | None:
    """The files ``configs/<dataset>/<method>.yaml`` is composed of when it is not a file itself:
    ``[<dataset>/_base.yaml, methods/<method>.yaml]``, or None where either is missing."""
    path = Path(path)
    parts = [path.parent / DATASET_BASE, path.parent.parent / METHODS_DIR / path.name]
    return parts if not path.is_file() and path.suffix == ".yaml" and all(p.is_file() for p in parts) else None


def recipe_paths(root: str | Path) -> list[Path]:
    """Every recipe under a configs directory, a file or composed: what ``--config`` accepts there."""
    root = Path(root)
    files = {p for p in root.glob("*/[a-z]*.yaml") if p.parent.name != METHODS_DIR}
    methods = sorted((root / METHODS_DIR).glob("[a-z]*.yaml"))
    composed = {base.parent / m.name for base in root.glob(f"*/{DATASET_BASE}") for m in methods}
    return sorted(files | composed)


def recipe_file(config: str | Path) -> Path:
    """``--config``'s file: a path (a file or a composed recipe), else a recipe name of lade's own (``RECIPES``)
    such as ``cifar100_lt/lade``; a name that is neither comes back as given, for the not-found error."""
    path = Path(config)
    if path.is_file() or composed_recipe(path) or path.is_absolute() or path.suffix:
        return path
    named = RECIPES / f"{config}.yaml"
    return named if named.is_file() or composed_recipe(named) else path


def recipe_names() -> list[str]:
    """lade's own recipes by name (``dataset/method``)."""
    return [str(p.relative_to(RECIPES).with_suffix("")) for p in recipe_paths(RECIPES)]


def load_config_file(path: str | Path, origins: dict | None = None, _chain: tuple = ()) -> dict:
    """A YAML config and the ``base:`` files it inherits from: one file name or a list merged left to right, each
    relative to the file (see ``composed_recipe`` for a recipe that is no file of its own). ``origins`` records
    which file set each key. Errors name the file: syntax (with the line), not a mapping, a missing base, a
    ``base:`` loop."""
    named = not _chain and not Path(path).suffix  # --config NAME: one of lade's recipes
    path = (recipe_file(path) if not _chain else Path(path)).resolve()
    if path in _chain:
        loop = " -> ".join(str(p) for p in (*_chain, path))
        raise ValueError(f"{path}: base loop: {loop}")
    parts = composed_recipe(path)
    if parts is not None:
        data = {"base": [str(p) for p in parts]}
    elif not path.is_file():
        via = f" (base of {_chain[-1]})" if _chain else ""
        hint = f"; lade's recipes: {recipe_names()}" if named else _recipes_hint(path)
        raise FileNotFoundError(f"config file not found: {path}{via}{hint}")
    else:
        data = _read_yaml(path)
    base = data.pop("base", None)
    bases = [base] if isinstance(base, str) else base
    if base is not None and (not isinstance(bases, list) or not bases
                             or not all(isinstance(b, str) and b for b in bases)):
        raise ValueError(f"{path}: base must be a file name or a list of file names, got {base!r}")
    merged: dict = {}
    for b in bases or []:
        merged = _merge(merged, load_config_file(path.parent / b, origins, (*_chain, path)))
    unknown = sorted(set(data) - set(KEY_SECTION))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(KEY_SECTION)}")
    return _merge(merged, data, origins, str(path))


def _recipes_hint(path: Path) -> str:
    methods = sorted(p.stem for p in (path.parent.parent / METHODS_DIR).glob("[a-z]*.yaml"))
    if not (path.parent / DATASET_BASE).is_file() or not methods:
        return ""
    return f"; this directory's recipes: its own files or a method of {path.parent.parent / METHODS_DIR}: {methods}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{path}: config keys must be strings, got {bad_keys}")
    return data


def resolve_config(path: str | Path | None, overrides: dict) -> dict:
    """``resolve_train_config``'s flat form (the recipe's values as a dict)."""
    return resolve_train_config(path, overrides).to_dict()


def resolve_train_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """DEFAULTS <- config file (and its bases) <- overrides (only the flags the user actually passed), checked.

    Raises ValueError / FileNotFoundError naming the file or command line and key.
    """
    origins: dict[str, str] = {}
    cfg = _merge(DEFAULTS, load_config_file(path, origins) if path else {})
    file_loss = cfg["loss"]
    cfg = _merge(cfg, overrides, origins, CLI)
    if cfg["loss"] != file_loss:
        # A file's loss hyperparameters belong to the file's loss: `--loss focal` on a LADE recipe drops its alpha
        # and lam rather than failing on them (or, worse, reading LADE's alpha as Causal Norm's).
        cfg.update({k: None for k in LOSS_KEYS if origins.get(k) not in (None, CLI)})
    return TrainConfig.from_dict(cfg, origins)


