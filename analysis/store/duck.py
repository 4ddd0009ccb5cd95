"""Small DuckDB helpers shared by the analyses: open the store (to write, or as a private in-memory
copy to read), move Arrow tables in and out.

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
from analysis.store.results import SCHEMA_SQL, ResultStore
from analysis.store.views import ANALYSIS_SQL


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
    """A writable connection to the store (schema and analysis views ensured), for commands that write.

    `create=False` refuses a path with no database, so a typo in `--db` is an error naming the
    path rather than a silently created empty store. A store created here whose block fails is
    removed again (file, WAL and the folders made for it): a failed import leaves nothing behind.
    """
    db = Path(db_path).expanduser()
    made: list[Path] = []
    created = not db.exists()
    if created:
        if not create:
            raise AnalysisError(f"no results database at {db} (run `transferlab run CONFIG` or "
                                f"`transferlab import taskweb DIR --db {db}` first)")
        made = [p for p in [db.parent, *db.parent.parents] if not p.exists()]
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ResultStore(db.parent, db_path=db).connect() as con:
            yield con
    except BaseException:
        if created:
            _remove_new_store(db, made)
        raise


def _remove_new_store(db: Path, made_dirs: list[Path]) -> None:
    for p in (db, db.with_name(db.name + ".wal")):
        p.unlink(missing_ok=True)
    for d in made_dirs:  # innermost first; only folders this call created, and only if still empty
        try:
            d.rmdir()
        except OSError:
            break


# Tables a reading command never writes and that can be large: read in place from the attached file.
READ_IN_PLACE = ("predictions",)
#: the store's ingest records (analysis.store.results): nothing an analysis reads, so not copied
BOOKKEEPING = ("store_files", "run_files", "prediction_keys")


@contextmanager
def read_store(db_path: str | os.PathLike) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private in-memory copy of the store, for every command that only reads.

    Why: reading commands (evaluate-selection, select, report, ...) materialise derived rows, such
    as the scores of `random`, `oracle` or `taskshop-*`, through the same code that stores them for
    `compute-selector`. Here those writes land in memory: the file is attached READ_ONLY, its
    tables are copied into an in-memory database that has this version's schema and views (large
    per-example tables are views onto the file instead), and the file stays byte-identical. It also
    works on a store written by an older version, whose views may be out of date.
    """
    db = Path(db_path).expanduser()
    if not db.is_file():
        raise AnalysisError(f"no results database at {db} (run `transferlab run CONFIG` or "
                            f"`transferlab import taskweb DIR --db {db}` first)")
    con = duckdb.connect()
    try:
        try:
            con.execute(f"ATTACH {_quote(str(db))} AS store (READ_ONLY)")
        except duckdb.Error as e:
            raise AnalysisError(f"cannot open results database {db}: {str(e).splitlines()[0]}") from None
        con.execute(SCHEMA_SQL)
        if ANALYSIS_SQL.strip():
            con.execute(ANALYSIS_SQL)
        _copy_tables(con)
        yield con
    finally:
        con.close()


def _copy_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Rows of every table of the attached `store` into the in-memory schema (by column name)."""
    def tables(database: str) -> list[str]:
        return [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
                                          "AND schema_name = 'main' ORDER BY table_name", [database]).fetchall()]

    mine = set(tables("memory"))
    for t in tables("store"):
        if t in BOOKKEEPING:
            continue
        src = f"store.main.{_ident(t)}"
        dest = f"memory.main.{_ident(t)}"
        if t in READ_IN_PLACE:
            con.execute(f"DROP TABLE IF EXISTS {dest}")
            con.execute(f"CREATE VIEW {dest} AS SELECT * FROM {src}")
        elif t in mine:  # the columns both versions know (an older store may lack some, a newer have more)
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE database_name = 'store' AND schema_name = 'main' "
                "AND table_name = ? AND column_name IN (SELECT column_name FROM duckdb_columns() "
                "WHERE database_name = 'memory' AND schema_name = 'main' AND table_name = ?) ORDER BY column_index",
                [t, t]).fetchall()]
            names = ", ".join(_ident(c) for c in cols)
            con.execute(f"INSERT INTO {dest} ({names}) SELECT {names} FROM {src}")
        else:  # a table this version does not define: copy it as it is
            con.execute(f"CREATE TABLE {dest} AS SELECT * FROM {src}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
