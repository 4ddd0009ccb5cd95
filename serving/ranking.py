"""Source ranking for a target, answered from the results store without writing to it.

The selectors (`analysis.selectors.resolve`) materialise their scores into `selector_scores` (TaskShop,
oracle, random, size). The service must not write to the store it reads (a training job may ingest into
it; serving holds no write lock), so every query runs on `analysis.db.read_store`: a private in-memory
copy of the store, attached READ_ONLY for the time of one request, so a writer waits at most one query
and new runs are visible to the next request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.store import StoreError


@contextmanager
def read_only_store(db: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """`analysis.db.read_store`, with "no store" / "cannot open it" as `StoreError` (the service is not
    ready: 503) rather than `AnalysisError` (a bad request: 422)."""
    from analysis.db import read_store

    path = Path(db)
    if not path.is_file():
        raise StoreError(f"no results database at {path} (import or run something first, e.g. "
                         f"`transferlab import taskweb ../shared/data/taskweb --db {path}`)")
    with ExitStack() as stack:
        try:
            con = stack.enter_context(read_store(path))
        except AnalysisError as e:  # the file exists but cannot be attached (locked by a writer, corrupt)
            raise StoreError(str(e)) from None
        yield con


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
