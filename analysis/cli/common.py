"""What every analysis command module shares: how a subcommand is added (`--db`, description), the `--json`
flag, the comma-separated argument types, JSON and table output, and the store checks the selector and
selection commands make before they evaluate."""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import AnalysisError
from analysis.reports.textout import (
    pct,  # noqa: F401
    print_table,
)

if TYPE_CHECKING:
    import duckdb

#: the sentence every read-only command's description ends with
DB_NOTE = "Reads the store without changing it: the file stays byte-identical."


def data_root() -> Path:
    """The shared data folder: $TRANSFERLAB_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("TRANSFERLAB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def add_command(sub: argparse._SubParsersAction, default_db: Callable[[], str], name: str, helptext: str,
                func: Callable[[argparse.Namespace], int], description: str = "") -> argparse.ArgumentParser:
    """A subcommand whose description opens with its help line, with `--db` and its handler set."""
    text = textwrap.fill(f"{helptext[0].upper()}{helptext[1:]}. {description}".strip(), 100)
    p = sub.add_parser(name, help=helptext, description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=default_db(), help="DuckDB results store (default: %(default)s)")
    p.set_defaults(func=func)
    return p


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: a text table)")


def thresholds_text() -> str:
    """The default transitivity thresholds as the help texts show them."""
    from analysis.transfer import DEFAULT_THRESHOLDS  # lazy: duckdb only when a store is opened

    return ",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS)


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def dump(obj: Any) -> None:
    """Print as JSON; NaN and infinities become null (JSON has neither)."""
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    print(json.dumps(clean(obj), indent=2, default=str))


def table(cols: list[str], rows: list[tuple]) -> None:
    print_table(cols, rows)




# Selectors this system names whose scores only an import or `compute-selector` brings into a store.
_STORED_ONLY: dict[str, str] = {
    "roe": "`transferlab import taskweb DIR` stores TaskWeb's released RoE scores",
    "llm": "`transferlab import taskweb DIR` stores TaskWeb's released LLM-similarity scores",
    "roe-minilm": "`transferlab compute-selector roe` computes and stores it",
}


def require_scores(con: duckdb.DuckDBPyConnection, name: str, db: str) -> None:
    """A known selector whose scores this store lacks is named as such, not as an unknown selector."""
    f = name[len("taskshop-"):] if name.startswith("taskshop-") else name
    if f not in _STORED_ONLY:
        return
    if con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [f]).fetchone()[0]:
        return
    if f == name:
        raise AnalysisError(f"selector '{name}' has no scores in this store ({db}): {_STORED_ONLY[f]}")
    raise AnalysisError(f"selector '{name}' needs the scores of '{f}' as F, and this store ({db}) has none: "
                        f"{_STORED_ONLY[f]}")


def check_k(con: duckdb.DuckDBPyConnection, setup: str, targets: list[str], k: int) -> None:
    """Regret@k needs k candidates per target: rejected up front, as `select` rejects it."""
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")
    row = con.execute("""SELECT target, count(*) AS n FROM analysis_transfers
                         WHERE setup = ? AND source <> target AND list_contains(?, target)
                         GROUP BY target ORDER BY n, target LIMIT 1""", [setup, targets]).fetchone()
    if row and k > row[1]:
        raise AnalysisError(f"k={k} but target '{row[0]}' has only {row[1]} candidate sources")
