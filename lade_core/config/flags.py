"""The config's command-line flags that are declared elsewhere: one ``--<name>`` per loss hyperparameter (from the
losses' declarations) and the JSON-or-name reading of a structured key's value."""
from __future__ import annotations

import argparse
import json

import yaml

from lade_core.methods import LOSS_KEYS, LOSSES


def json_or_name(text: str):
    """A command-line value of a structured key: JSON (a list or a mapping) or a bare name such as ``dataset`` or
    ``cifar``; malformed JSON is an error naming it."""
    if text.lstrip()[:1] not in ("[", "{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None  # a ValueError argparse shows


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--<name>`` flag (dashes for underscores) per loss hyperparameter name, built-in or plugin, typed and
    described by the losses' declarations (unset: the loss's default). The config checks the value against the
    chosen loss's range."""
    parsers = {float: float, int: int, str: str, list[float]: json.loads}  # a declaration's type -> the flag's
    for key in LOSS_KEYS:
        declared = [(name, spec.param(key)) for name, spec in LOSSES.items() if key in spec.hyperparameters]
        types = {h.type for _, h in declared}
        first = declared[0][1]
        # One type for the flag: the declarations' if they agree; else YAML's reading of the text, checked later.
        kwargs = {"type": parsers.get(first.type, yaml.safe_load) if len(types) == 1 else yaml.safe_load}
        if len(declared) == 1 and first.choices is not None:
            kwargs["choices"] = list(first.choices)
        text = "; ".join(f"{name}: {h.help} ({h.range_text}; default {h.default})" for name, h in declared)
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, help=text.replace("%", "%%"), **kwargs)


