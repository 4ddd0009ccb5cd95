"""The table of stored selector scores (`selector_scores`): what every selector writes and reads.

Apart from `analysis.selection.selectors` (the registry) so that selectors in their own modules (RoE,
soft-prompt similarity, FUTE) write their scores without importing the registry that names them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa

from analysis.store.duck import registered


def stored_selectors(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Every stored selector with its method, params, provenance and coverage."""
    rows = con.execute("""
        SELECT selector, any_value(method), any_value(params)::VARCHAR, any_value(provenance),
               count(*), count(DISTINCT target), count(DISTINCT source)
        FROM selector_scores GROUP BY selector ORDER BY selector""").fetchall()
    return [{"name": r[0], "method": r[1], "params": json.loads(r[2]) if r[2] else {}, "provenance": r[3],
             "n_pairs": r[4], "n_targets": r[5], "n_sources": r[6]} for r in rows]


def store_scores(con: duckdb.DuckDBPyConnection, name: str, method: str, params: dict[str, Any],
                 scores: pa.Table, provenance: str = "computed") -> int:
    """Replace selector `name` by `scores` (columns source, target, score); returns rows stored."""
    with registered(con, "_scores", scores):
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM selector_scores WHERE selector = ?", [name])
            con.execute("""INSERT INTO selector_scores (selector, method, params, source, target, score, details, provenance)
                           SELECT ?, ?, ?, source, target, score, NULL, ? FROM _scores WHERE source <> target""",
                        [name, method, json.dumps(params, sort_keys=True), provenance])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return scores.num_rows


def base_selectors(con: duckdb.DuckDBPyConnection, derived: Sequence[str]) -> list[str]:
    """Stored selectors other than those whose method is in `derived` (scores computed from others or
    from a setup), by name."""
    return [r[0] for r in con.execute(
        "SELECT selector FROM selector_scores GROUP BY selector "
        "HAVING NOT list_contains(?, any_value(method)) ORDER BY selector", [list(derived)]).fetchall()]


def has_selector(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [name]).fetchone()[0] > 0
