"""Source ranking for a target, answered from the results store without writing to it.

The selectors (`analysis.selectors.resolve`) materialise their scores into `selector_scores` (TaskShop,
oracle, random, size). The service must not write to the store it reads (a training job may ingest into
it; serving holds no write lock), so every query runs in an in-memory DuckDB that ATTACHes the store
READ_ONLY: the store's tables are visible through views of the same names, `selector_scores` is a
private in-memory copy the selectors may write to, and the analysis views are recreated over them. The
store is attached per request and detached at once, so a writer waits at most one query, and new runs
are visible to the next request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.store import SCHEMA_SQL, StoreError
from analysis.views import ANALYSIS_SQL

#: the one table the selectors write; copied so their writes stay in memory
WRITTEN = ("selector_scores",)


@contextmanager
def read_only_store(db: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory connection that reads the store at `db` and leaves it untouched."""
    path = Path(db)
    if not path.is_file():
        raise StoreError(f"no results database at {path} (import or run something first, e.g. "
                         f"`transferlab import taskweb ../shared/data/taskweb --db {path}`)")
    con = duckdb.connect(":memory:")
    try:
        con.execute(SCHEMA_SQL)
        con.execute(ANALYSIS_SQL)
        try:
            con.execute("ATTACH ? AS store (READ_ONLY)", [str(path)])
        except duckdb.Error as e:
            raise StoreError(f"cannot open results database {path} read-only: {e}") from None
        stored = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'store' "
                                            "AND schema_name = 'main'").fetchall()]
        mine = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                          "current_database()").fetchall()}
        for name in stored:
            if name in WRITTEN:
                con.execute(f'INSERT INTO main."{name}" BY NAME SELECT * FROM store.main."{name}"')
                continue
            if name in mine:
                con.execute(f'DROP TABLE main."{name}"')
            con.execute(f'CREATE VIEW main."{name}" AS SELECT * FROM store.main."{name}"')
        yield con
    finally:
        con.close()


def rank_sources(db: str | Path, target: str, selector: str, k: int = 5, setup: str | None = None,
                 lam: float | None = None, seed: int = 0) -> dict[str, Any]:
    """The top-k sources for `target` by `selector` (`analysis.multitask_sets.select_sources`), with
    scores and ranks; ties rank by source name."""
    from analysis.multitask_sets import select_sources

    with read_only_store(db) as con:
        res = select_sources(con, target, selector, k, setup=setup, lam=lam, seed=seed)
    ranking = res["ranking"]
    return {"target": target, "selector": selector, "stored_as": res["stored_as"], "setup": setup, "k": k,
            "n_candidates": len(ranking),
            "sources": [{"rank": i + 1, "source": r["source"], "score": float(r["score"])}
                        for i, r in enumerate(ranking[:k])]}


def stored_runs(db: str | Path) -> list[dict[str, Any]]:
    """Finished runs with a checkpoint (servable as run:<key>), newest first."""
    with read_only_store(db) as con:
        rows = con.execute("""SELECT run_key, coalesce(target, source), setup, score FROM runs
                              WHERE status = 'ok' AND checkpoint IS NOT NULL
                              ORDER BY created_at DESC, run_key""").fetchall()
    return [{"id": f"run:{r[0]}", "task": r[1], "setup": r[2], "score": r[3]} for r in rows]


__all__ = ["AnalysisError", "rank_sources", "read_only_store", "stored_runs"]
