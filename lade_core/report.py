"""Plain-text tables for the terminal and files: markdown or CSV from a list of row dicts."""
from __future__ import annotations

import csv
import io
import math

FORMATS = ("markdown", "csv")


def _cell(v, digits: int) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list[dict], columns: list[str], fmt: str = "markdown", digits: int = 4) -> str:
    """Rows as a markdown table (aligned, for reading) or CSV (full precision, for tools)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    cells = [[_cell(r.get(c, ""), digits) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]) + "\n"
