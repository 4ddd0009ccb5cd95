"""Plain-text tables for the command line (shared by every subcommand that prints rows)."""

from __future__ import annotations

import math


def print_table(cols: list[str], rows: list[tuple]) -> None:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def pct(v: float | None) -> str:
    """A fraction as the papers print it (percent, two decimals); '-' where there is no number."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
