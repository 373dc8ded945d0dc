"""Plain-text tables for the terminal and files: markdown or CSV from a list of row dicts."""
from __future__ import annotations

import csv
import io
import math

FORMATS = ("markdown", "csv")


def _cell(v, digits: int) -> str:
    if isinstance(v, MeanStd):
        return v.text(digits)
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


class MeanStd(float):
    """A cell over seeds: its value is the mean (for sorting and plots), shown as ``mean ± std`` (sample std,
    n - 1), and ``n`` runs."""

    def __new__(cls, values: list[float]):
        clean = [v for v in values if not math.isnan(v)]
        mean = sum(clean) / len(clean) if clean else math.nan
        self = super().__new__(cls, mean)
        self.n = len(clean)
        self.std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1)) if len(clean) > 1 else 0.0
        return self

    def text(self, digits: int) -> str:
        return "—" if math.isnan(self) else f"{float(self):.{digits}f} ± {self.std:.{digits}f}"


def group_rows(rows: list[dict], group: list, keys: list[str], values: list[str]) -> list[dict]:
    """Rows of one group (``group[i]``: the group of ``rows[i]``, None for a row alone) with the same ``keys``
    merged into one row whose ``values`` are ``MeanStd`` cells and ``n`` their run count; first-seen order."""
    merged: dict = {}
    for row, g in zip(rows, group):
        ident = (g, *(row.get(k) for k in keys)) if g is not None else (id(row),)
        merged.setdefault(ident, []).append(row)
    out = []
    for same in merged.values():
        first = dict(same[0])
        if len(same) > 1:
            first.update({v: MeanStd([r[v] for r in same]) for v in values if v in first})
        first["n"] = len(same)
        out.append(first)
    return out


def format_table(rows: list[dict], columns: list[str], fmt: str = "markdown", digits: int = 4) -> str:
    """Rows as a markdown table (aligned, for reading) or CSV (full precision, for tools)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: v.text(6) if isinstance(v, MeanStd) else v for k, v in r.items()} for r in rows])
        return out.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    cells = [[_cell(r.get(c, ""), digits) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]) + "\n"
