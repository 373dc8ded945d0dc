"""The one registration style for what lade looks up by name: losses (``methods.LOSSES``), post-hoc rules
(``math.posthoc.RULES``), classifier heads (``math.heads.HEADS``), lade's own models (``models.backbones.MODELS``),
augmentation presets (``data.augment.PRESETS``), search spaces (``tune.spaces.SPACES``), prior estimators
(``math.label_shift.METHODS``) and search objectives (``tune.trials.OBJECTIVES``).

A ``Registry`` is a dict from name to entry that knows what it holds (``kind``). Entries come in through
``register`` (a call, or a decorator), which refuses to replace a name silently. ``lookup`` answers an unknown name
with one error that names it, its close matches and the choices. Standard library only: the math tier uses it.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")
_NOTHING: Any = object()


class Registry(dict, Generic[T]):
    """name -> entry, for one ``kind`` of thing (its word in errors: "loss", "post-hoc rule", ...)."""

    def __init__(self, kind: str, entries: Mapping[str, T] | Iterable[tuple[str, T]] = ()):
        super().__init__()
        self.kind = kind
        for name, entry in dict(entries).items():
            self.register(name, entry)

    def register(self, name: str, entry: T = _NOTHING, *, replace: bool = False) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator that registers what it
        decorates. A name already taken is an error unless ``replace``."""
        if entry is _NOTHING:
            def decorate(obj: T) -> T:
                self.register(name, obj, replace=replace)
                return obj
            return decorate
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self[name] = entry
        return entry

    def unknown(self, name: object, why: str = "", among: Iterable[str] | None = None) -> str:
        """The error message for ``name``, which is not among the registered names (or ``among``)."""
        choices = sorted(self if among is None else among)
        close = difflib.get_close_matches(str(name), choices, n=3) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if len(close) == 1 else f"; did you mean one of {close}?" if close \
            else ""
        return f"unknown {self.kind} {name!r}{why}{hint}; choose one of {choices}"

    def lookup(self, name: str, why: str = "", among: Iterable[str] | None = None) -> T:
        """The entry of ``name`` (restricted to ``among`` where given), else one ``ValueError`` (``unknown``)."""
        allowed = self if among is None else set(among)
        if isinstance(name, str) and name in allowed and name in self:
            return self[name]
        raise ValueError(self.unknown(name, why, among))
