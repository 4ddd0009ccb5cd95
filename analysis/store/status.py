"""`transferlab status`: where an experiment stands, read from its result files (running or finished).

Why from the files and not the DuckDB file: while a job runs its driver holds the DuckDB file open,
but every finished trial has already written `runs/<key>.parquet` (whole or not at all; once ingested,
merged into a few `runs/part-*.parquet`, so a 30,000-run study reads a handful of files). The driver
records what it planned in `plan.json` (run key -> stage) when it starts, so the summary can say
what is still to come. Per stage: planned, done (status ok), failed (with the first line of each
error), remaining; and an ETA = remaining / the rate at which runs finished since the driver started
(runs finished per second of wall time, so it accounts for trials running in parallel). It warns
when the ok runs come from more than one software stack (`runs.stack`, rayjobs.engine.stack).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import duckdb
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.store.results import ResultStore

PLAN_FILE = "plan.json"
#: failed runs listed with their error (the rest are counted)
MAX_ERRORS = 10


def write_plan(store: ResultStore, experiment: str, job: str, trials: dict[str, str]) -> None:
    """Record a driver's plan (run key -> stage) and its start time for `status` (replaces an older plan)."""
    store.write_json(PLAN_FILE, {"experiment": experiment, "job": job, "started_at": time.time(),
                                 "trials": trials})
    if store.remote is not None:  # `status` on another machine reads it from there
        store.remote.put_file(store.root / PLAN_FILE, PLAN_FILE)


def summarise(store: ResultStore, now: float | None = None) -> dict[str, Any]:
    """The status of the experiment in `store` as a dict: `stages` (one entry per stage: planned, done,
    failed, remaining), `errors` (run key, stage, first error line), `eta_s` (None when unknown)."""
    plan = store.read_json(PLAN_FILE)
    runs = store.read_runs(["run_key", "kind", "status", "error", "created_at", "stack"])
    if plan is None and runs.num_rows == 0:
        raise AnalysisError(f"no transferlab results in {store.root} (no {PLAN_FILE}, no runs/*.parquet)")
    now = time.time() if now is None else now
    planned = plan["trials"] if plan else {}
    plan_tbl = pa.table({"run_key": pa.array(list(planned), pa.string()),
                         "stage": pa.array(list(planned.values()), pa.string())})
    started = plan["started_at"] if plan else None
    con = duckdb.connect()
    try:
        con.register("runs", runs)
        con.register("plan", plan_tbl)
        # with a plan: its runs only (a results folder may hold other experiments); without: every file
        scope = ("SELECT p.run_key, p.stage, r.status, r.error, r.created_at FROM plan p "
                 "LEFT JOIN runs r USING (run_key)" if plan else
                 "SELECT run_key, kind AS stage, status, error, created_at FROM runs")
        stages = con.execute(f"""
            SELECT stage, count(*) AS planned, count(*) FILTER (status = 'ok') AS done,
                   count(*) FILTER (status = 'failed') AS failed,
                   count(*) FILTER (status IS NULL) AS remaining
            FROM ({scope}) GROUP BY stage ORDER BY min(created_at) NULLS LAST, stage""").fetchall()
        errors = con.execute(f"""
            SELECT run_key, stage, split_part(trim(error), chr(10), 1) FROM ({scope})
            WHERE status = 'failed' ORDER BY created_at LIMIT {MAX_ERRORS}""").fetchall()
        since = _utc(started) if started else None
        stacks = mixed_stacks(con)
        finished_since = con.execute(f"SELECT count(*) FROM ({scope}) WHERE status IS NOT NULL "
                                     "AND created_at >= $since", {"since": since}).fetchone()[0] if since else 0
    finally:
        con.close()
    out_stages = [dict(zip(("stage", "planned", "done", "failed", "remaining"), s, strict=True)) for s in stages]
    remaining = sum(s["remaining"] for s in out_stages)
    eta = None
    if remaining == 0:
        eta = 0.0
    elif started and finished_since:
        eta = remaining * (now - started) / finished_since
    return {"results": str(store.root), "experiment": plan.get("experiment") if plan else None,
            "job": plan.get("job") if plan else None, "started_at": started, "stages": out_stages,
            "remaining": remaining, "finished_since_start": finished_since, "eta_s": eta,
            "errors": [{"run_key": k, "stage": st, "error": e} for k, st, e in errors], "stacks": stacks}


def mixed_stacks(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The software stacks (rayjobs.engine.stack) of the ok runs in `runs`, with their run counts, when there is
    more than one: only the fields that differ (e.g. {'torch': '2.3.0', 'runs': 120})."""
    rows = con.execute("SELECT CAST(stack AS VARCHAR), count(*) FROM runs WHERE status = 'ok' AND stack IS NOT NULL "
                       "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
    if len(rows) < 2:
        return []
    stacks = [(json.loads(s), n) for s, n in rows]
    fields = sorted({k for s, _ in stacks for k in s})
    differ = [f for f in fields if len({json.dumps(s.get(f)) for s, _ in stacks}) > 1]
    return [{**{f: s.get(f) for f in differ}, "runs": n} for s, n in stacks]


def stack_warning(stacks: list[dict[str, Any]]) -> str | None:
    """One line saying the store mixes stacks, or None."""
    if not stacks:
        return None
    parts = ["; ".join([", ".join(f"{k} {v}" for k, v in s.items() if k != "runs") + f" ({s['runs']} runs)"])
             for s in stacks]
    return (f"WARNING: these runs were produced by {len(stacks)} different software stacks "
            f"(numbers may not be comparable): {' | '.join(parts)}")


def _utc(epoch: float) -> dt.datetime:
    """Epoch seconds as the naive UTC timestamp the run rows' `created_at` holds."""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).replace(tzinfo=None)


def format_duration(s: float) -> str:
    s = int(round(max(0.0, s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(summary: dict[str, Any]) -> list[str]:
    """The summary as lines for the terminal."""
    head = f"{summary['job'] or 'results'} {summary['experiment']!r}" if summary["experiment"] else "results"
    lines = [f"{head} in {summary['results']}"]
    cols = ("stage", "planned", "done", "failed", "remaining")
    rows = [[str(s[c]) for c in cols] for s in summary["stages"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    if summary["remaining"] == 0:
        lines.append("finished: no planned run is missing" + ("" if not summary["errors"] else
                                                               " (failed runs are retried by a re-run)"))
    elif summary["eta_s"] is not None:
        lines.append(f"{summary['remaining']} runs to go, ETA {format_duration(summary['eta_s'])} "
                     f"({summary['finished_since_start']} finished since the driver started)")
    else:
        lines.append(f"{summary['remaining']} runs to go, ETA unknown (no run finished since the driver started)")
    for e in summary["errors"]:
        lines.append(f"FAILED {e['stage']} {e['run_key']}: {e['error']}")
    warning = stack_warning(summary.get("stacks", []))
    if warning:
        lines.append(warning)
    return lines
