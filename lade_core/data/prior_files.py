"""A prior as a file a user writes: per-class values (probabilities or counts) in JSON or CSV. Read here, checked
by ``lade_core.math.priors.validate_prior`` (or turned into a test subset by ``math.evaluation.target_from_values``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def read_prior_file(path: str | Path) -> np.ndarray:
    """Per-class values from JSON (a list, {"prior": [...]} or {"counts": [...]}) or CSV (value or class,value)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"target prior file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                keys = [k for k in ("prior", "probabilities", "counts") if k in data]
                if len(keys) != 1:
                    raise ValueError('a JSON object needs exactly one of the keys "prior", "probabilities", "counts"')
                data = data[keys[0]]
            return np.asarray(data, dtype=np.float64)
        rows = [r for r in csv.reader(text.splitlines()) if r and any(x.strip() for x in r)]
        if rows and not _is_number(rows[0][-1]):
            rows = rows[1:]  # a header line
        if rows and len(rows[0]) == 2:
            classes = [int(cls) for cls, _ in rows]
            negative = [c for c in classes if c < 0]
            if negative:
                raise ValueError(f"negative class indices {negative[:20]}")
            if sorted(classes) != list(range(len(rows))):
                raise ValueError(f"class indices must be 0..{len(rows) - 1}, each once; got {sorted(classes)[:20]}...")
            values = np.full(len(rows), np.nan)
            for cls, (_, v) in zip(classes, rows):
                values[cls] = float(v)
            return values
        return np.asarray([float(r[-1]) for r in rows], dtype=np.float64)
    except (ValueError, IndexError, TypeError) as e:
        raise ValueError(f"target prior file {path}: cannot read per-class values ({e})") from e


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
