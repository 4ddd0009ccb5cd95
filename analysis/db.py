"""Small DuckDB helpers shared by the analyses: open the store, move Arrow tables in and out.

Why a module: the analyses run against duckdb 1.x and 2.x, whose Python APIs differ in naming
(`fetch_arrow_table` vs `to_arrow_table`); this keeps that difference in one place.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.store import ResultStore


def query_arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list | dict | None = None) -> pa.Table:
    """The whole result of `sql` as an Arrow table.

    Through `execute` (not a relation), so a pending result of an earlier `execute` on the same
    connection is simply replaced; duckdb 2 warns that this copies rows, which at analysis sizes
    (thousands of rows) costs nothing measurable.
    """
    cur = con.execute(sql, params) if params is not None else con.execute(sql)
    fetch = getattr(cur, "to_arrow_table", None) or cur.fetch_arrow_table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fetch()


def settle(con: duckdb.DuckDBPyConnection) -> None:
    """Drop a pending, partly fetched result (duckdb 2 refuses `register` while one exists)."""
    abort = getattr(con, "abort", None)
    if abort is not None:
        abort()


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """Expose an Arrow table to SQL as `name` for the duration of the block."""
    settle(con)
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


@contextmanager
def open_store(db_path: str | os.PathLike, create: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A writable connection to the store (schema and analysis views ensured).

    `create=False` refuses a path with no database, so a typo in `--db` is an error naming the
    path rather than a silently created empty store.
    """
    db = Path(db_path).expanduser()
    if not db.exists():
        if not create:
            raise AnalysisError(f"no results database at {db} (run `transferlab run CONFIG` or "
                                f"`transferlab import taskweb DIR --db {db}` first)")
        db.parent.mkdir(parents=True, exist_ok=True)
    with ResultStore(db.parent, db_path=db).connect() as con:
        yield con
