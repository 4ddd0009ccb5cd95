"""Run a user's SQL over the results store without letting it write, read the host or reconfigure DuckDB.

Why not string matching: DuckDB's own parser decides what a statement is (`extract_statements`),
so comments, quoting and odd spacing cannot smuggle a second statement or a COPY past the check.
Why lock the connection as well: a SELECT can still call table functions that touch the host
(`read_csv('/etc/passwd')`, `glob`, `read_text`, http URLs); with external access disabled and the
configuration locked before the user's SQL runs, DuckDB itself refuses them, and no later statement
can switch them back on.

One entry point, `run_guarded`, serves every place that runs user SQL (`transferlab sql`, the
Serve app). `open_guarded` opens a store read-only for it.

Why a deadline and a memory limit: a single SELECT can still run for hours (`SELECT sum(x) FROM
range(1e12)`) or hold the machine's memory. The query runs in a worker thread while the caller's thread
waits, so the deadline or a Ctrl-C (KeyboardInterrupt in the waiting thread) cancels it with
`con.interrupt()`; DuckDB's own `memory_limit` is set before the configuration is locked.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.store.views import ANALYSIS_SQL

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


DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_LIMIT = "2GB"


def lock_down(con: duckdb.DuckDBPyConnection, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> None:
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
    try:
        con.execute("SET memory_limit = ?", [memory_limit])
    except duckdb.Error as e:
        raise SqlRefused(f"memory limit {memory_limit!r}: {_one_line(e)} (e.g. 512MB, 2GB)") from None
    for name, value in LOCKDOWN_SETTINGS:
        con.execute(f"SET {name} = {value}")


def run_guarded(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | dict[str, Any] | None = None, *,
                timeout_s: float | None = DEFAULT_TIMEOUT_S, memory_limit: str = DEFAULT_MEMORY_LIMIT
                ) -> tuple[list[str], list[tuple]]:
    """Check `sql`, lock the connection, run it within `timeout_s` (None: no deadline) and `memory_limit`;
    (column names, rows). Any refusal, a deadline passed, a Ctrl-C or the memory limit reached is one
    `SqlRefused` line."""
    query = check_query(con, sql)
    lock_down(con, memory_limit)

    def run() -> tuple[list[str], list[tuple]]:
        cur = con.execute(query, params) if params is not None else con.execute(query)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()

    try:
        return run_interruptible(con, run, timeout_s)
    except duckdb.OutOfMemoryException as e:
        raise SqlRefused(f"the query needs more than the memory limit {memory_limit} ({_one_line(e)})") from None
    except duckdb.Error as e:  # many subclasses (Catalog, Binder, Permission, ...): all are the user's SQL
        raise SqlRefused(f"SQL error: {_one_line(e)}") from None


def run_interruptible(con: duckdb.DuckDBPyConnection, fn: Any, timeout_s: float | None) -> Any:
    """`fn()` (queries on `con`) in a worker thread; past `timeout_s`, or on Ctrl-C in this thread, the
    running query is cancelled with `con.interrupt()` and `SqlRefused` says which."""
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C may report a live thread as ended

    def work() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["err"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="sql-query", daemon=True).start()
    why = None
    try:
        if not done.wait(timeout_s):
            why = f"the query ran past its time limit of {timeout_s:g}s and was cancelled (--timeout)"
    except KeyboardInterrupt:
        why = "the query was cancelled (Ctrl-C)"
    if why is not None:
        con.interrupt()
        done.wait(30)
        raise SqlRefused(why)
    if "err" in box:
        raise box["err"]
    return box["out"]


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
    from analysis.store.results import SCHEMA_SQL  # lazy: pyarrow only when a store is opened

    found: dict[str, list[str]] = {"table": [], "view": []}
    pattern = r"CREATE\s+(?:OR\s+REPLACE\s+)?(TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)"
    for kind, name in re.findall(pattern, SCHEMA_SQL + ANALYSIS_SQL, flags=re.IGNORECASE):
        if name not in found[kind.lower()]:
            found[kind.lower()].append(name)
    return found
