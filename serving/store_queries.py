"""Source ranking for a target, answered from the results store without writing to it.

The selectors (`analysis.selection.selectors.resolve`) materialise their scores into `selector_scores` (TaskShop,
oracle, random, size). The service must not write to the store it reads (a training job may ingest into
it; serving holds no write lock), so every query runs on `analysis.store.duck.read_store`: a private in-memory
copy of the store, attached READ_ONLY for the time of one request, so a writer waits at most one query
and new runs are visible to the next request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.selection.fute import resolve_space, spaces
from analysis.selection.source_sets import select_sources
from analysis.store.duck import read_store
from analysis.store.results import StoreError


class StoreTimeout(Exception):
    """A store query cancelled at its deadline (the service answers 504)."""


@contextmanager
def read_only_store(db: str | Path, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """`analysis.store.duck.read_store`, with "no store" / "cannot open it" as `StoreError` (the service is not
    ready: 503) rather than `AnalysisError` (a bad request: 422). Past `timeout_s` the running query is
    cancelled (`con.interrupt()` from a timer thread) and the block raises `StoreTimeout`."""
    path = Path(db)
    if not path.is_file():
        raise StoreError(f"no results database at {path} (import or run something first, e.g. "
                         f"`transferlab import taskweb ../shared/data/taskweb --db {path}`)")
    with ExitStack() as stack:
        try:
            con = stack.enter_context(read_store(path))
        except AnalysisError as e:  # the file exists but cannot be attached (locked by a writer, corrupt)
            raise StoreError(str(e)) from None
        fired = threading.Event()
        if timeout_s is not None:
            timer = threading.Timer(timeout_s, lambda: (fired.set(), con.interrupt()))
            timer.daemon = True
            timer.start()
            stack.callback(timer.cancel)
        try:
            yield con
        except Exception:
            if fired.is_set():
                raise StoreTimeout(f"the store query ran past {timeout_s:g}s (store_timeout_s)") from None
            raise


def rank_sources(db: str | Path, target: str, selector: str, k: int = 5, setup: str | None = None,
                 lam: float | None = None, seed: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
    """The top-k sources for `target` by `selector` (`analysis.selection.source_sets.select_sources`), with
    scores and ranks; ties rank by source name."""
    with read_only_store(db, timeout_s) as con:
        res = select_sources(con, target, selector, k, setup=setup, lam=lam, seed=seed)
    ranking = res["ranking"]
    return {"target": target, "selector": selector, "stored_as": res["stored_as"], "setup": setup, "k": k,
            "n_candidates": len(ranking),
            "sources": [{"rank": i + 1, "source": r["source"], "score": float(r["score"])}
                        for i, r in enumerate(ranking[:k])]}


def _space(con: duckdb.DuckDBPyConnection, space: str | None) -> str:
    """The space a request names, or the only one stored; embeddings of two spaces are never compared."""
    if space:
        return resolve_space(con, space)
    found = spaces(con)
    if len(found) == 1:
        return str(found[0]["space"])
    if not found:
        raise AnalysisError("no task embeddings stored (run an embed job: `transferlab embed CONFIG`)")
    raise AnalysisError("several embedding spaces are stored: name one with 'space' ("
                        + ", ".join(f"{s['space']} ({s['name']})" for s in found) + ")")


def rank_models(db: str | Path, target: str, space: str | None = None, k: int = 5, data: str | None = None,
                models: list[str] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """FUTE model selection: the black boxes of a space (fine-tuned models, model + prompt) ranked for
    `target` by cos(MTE, DTE(target)); the top k."""
    # lazy: each query binds its own `rank` (models or prompts)
    from analysis.selection.fute import rank_models as rank

    with read_only_store(db, timeout_s) as con:
        res = rank(con, _space(con, space), target, data, models)
    ranking = res["ranking"]
    return {"space": res["space"], "target": target, "dte": res["dte"], "k": k, "n_candidates": len(ranking),
            "models": [{key: r[key] for key in ("rank", "name", "model", "prompt", "source_task", "cosine",
                                                "run_key")} for r in ranking[:k]]}


def rank_prompts(db: str | Path, task: str, model: str, space: str | None = None, k: int = 5,
                 data: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """FUTE prompt selection: one model's prompts on `task` ranked by cos(MTE(model + prompt), DTE(task))."""
    # lazy: each query binds its own `rank` (models or prompts)
    from analysis.selection.fute import rank_prompts as rank

    with read_only_store(db, timeout_s) as con:
        res = rank(con, _space(con, space), task, model, data)
    ranking = res["ranking"]
    return {"space": res["space"], "task": task, "model": model, "dte": res["dte"], "k": k,
            "n_candidates": len(ranking),
            "prompts": [{key: r[key] for key in ("rank", "prompt", "cosine", "run_key")} for r in ranking[:k]]}


def stored_runs(db: str | Path, timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Finished runs with a model checkpoint (servable as run:<key>), newest first; an embed run's
    `checkpoint` is its vector file, not a model."""
    with read_only_store(db, timeout_s) as con:
        rows = con.execute("""SELECT run_key, coalesce(target, source), setup, score FROM runs
                              WHERE status = 'ok' AND checkpoint IS NOT NULL AND kind <> 'embed'
                              ORDER BY created_at DESC, run_key""").fetchall()
    return [{"id": f"run:{r[0]}", "task": r[1], "setup": r[2], "score": r[3]} for r in rows]
