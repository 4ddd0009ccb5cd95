"""Run a user's SQL over the results store without letting it write, read the host or reconfigure DuckDB.

Why not string matching: DuckDB's own parser decides what a statement is (`extract_statements`),
so comments, quoting and odd spacing cannot smuggle a second statement or a COPY past the check.
Why lock the connection as well: a SELECT can still call table functions that touch the host
(`read_csv('/etc/passwd')`, `glob`, `read_text`, http URLs); with external access disabled and the
configuration locked before the user's SQL runs, DuckDB itself refuses them, and no later statement
can switch them back on.

One entry point, `run_guarded`, serves every place that runs user SQL (`transferlab sql`, the
Serve app). `open_guarded` opens a store read-only for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError

# Applied in this order; lock_configuration last, so the others cannot be undone by the user's SQL.
LOCKDOWN_SETTINGS: tuple[tuple[str, str], ...] = (
    ("enable_external_access", "false"),  # no file or network access beyond the open database
    ("allow_unsigned_extensions", "false"),
    ("allow_community_extensions", "false"),
    ("autoinstall_known_extensions", "false"),  # `read_csv('https://...')` must not fetch httpfs
    ("autoload_known_extensions", "false"),
    ("lock_configuration", "true"),
)


class SqlRefused(AnalysisError):
    """User SQL that is not exactly one read-only query, or that DuckDB refused to run."""


def _one_line(err: BaseException) -> str:
    """DuckDB errors span several lines (the caret under the query); the CLI shows one."""
    text = " ".join(str(err).split("\n")[0].split())
    return text or type(err).__name__


def check_query(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the single SELECT statement in `sql`, or `SqlRefused` saying why not.

    SELECT here is DuckDB's statement type: it includes WITH, VALUES, FROM-first queries, DESCRIBE,
    SHOW and SUMMARIZE; everything else (COPY, ATTACH, INSTALL/LOAD, SET/USE, PRAGMA, CALL, EXPORT,
    DDL, DML, transactions, EXPLAIN, bare PIVOT) is refused.
    """
    if not sql or not sql.strip():
        raise SqlRefused("empty query: give one SELECT statement, e.g. \"SELECT * FROM transfer_scores LIMIT 5\"")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlRefused(f"SQL error: {_one_line(e)}") from None
    if not statements:
        raise SqlRefused("the query holds no statement (only comments?): give one SELECT statement")
    if len(statements) > 1:
        raise SqlRefused(f"one statement at a time: the query holds {len(statements)} statements")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind))
        hint = " (a PIVOT needs its values listed: PIVOT t ON col IN ('a', 'b') USING ...)" if name == "MULTI" else ""
        raise SqlRefused(f"only read-only queries (SELECT, WITH, FROM, DESCRIBE, SHOW) may run here; "
                         f"this is a {name} statement{hint}")
    return sql


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """Disable external access and extension loading, then lock DuckDB's configuration.

    Settings of these kinds are global to the database instance: every other connection of the
    same instance is locked too, for as long as the instance lives. Calling it again is a no-op on
    a connection this function locked; a connection locked with external access on is refused.
    """
    locked, external = con.execute("SELECT current_setting('lock_configuration'), "
                                   "current_setting('enable_external_access')").fetchone()
    if locked:
        if external:
            raise SqlRefused("this connection's configuration is locked with external access enabled; "
                             "user SQL runs only on a connection that `lock_down` locked")
        return
    for name, value in LOCKDOWN_SETTINGS:
        con.execute(f"SET {name} = {value}")


def run_guarded(con: duckdb.DuckDBPyConnection, sql: str,
                params: list[Any] | dict[str, Any] | None = None) -> tuple[list[str], list[tuple]]:
    """Check `sql`, lock the connection, run it; (column names, rows). Any refusal is one `SqlRefused` line."""
    query = check_query(con, sql)
    lock_down(con)
    try:
        cur = con.execute(query, params) if params is not None else con.execute(query)
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall()
    except duckdb.Error as e:  # many subclasses (Catalog, Binder, Permission, ...): all are the user's SQL
        raise SqlRefused(f"SQL error: {_one_line(e)}") from None
    return cols, rows


@contextmanager
def open_guarded(db_path: str | os.PathLike) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the store file for `run_guarded` (a missing file is an error, not created)."""
    db = Path(db_path).expanduser()
    if not db.is_file():
        raise AnalysisError(f"no results database at {db} (run `transferlab run CONFIG` or "
                            f"`transferlab import taskweb DIR --db {db}` first)")
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as e:
        raise AnalysisError(f"cannot open results database {db}: {_one_line(e)}") from None
    try:
        yield con
    finally:
        con.close()


def store_relations() -> dict[str, list[str]]:
    """Names of the store's tables and views, from the schema this version creates (for `sql --help`)."""
    import re

    from analysis.store import SCHEMA_SQL
    from analysis.views import ANALYSIS_SQL

    found: dict[str, list[str]] = {"table": [], "view": []}
    pattern = r"CREATE\s+(?:OR\s+REPLACE\s+)?(TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)"
    for kind, name in re.findall(pattern, SCHEMA_SQL + ANALYSIS_SQL, flags=re.IGNORECASE):
        if name not in found[kind.lower()]:
            found[kind.lower()].append(name)
    return found
