"""Compaction: merge ingested per-run files into a few Parquet parts, so a 30,000-run study keeps a few
hundred files in `runs/` and `predictions/` instead of 60,000.

Layout: `runs/part-<stage>-<token>.parquet` (the rows of one batch of one stage, sorted by run key) and
`predictions/experiment=<e>/kind=<stage>/part-<token>.parquet` (hive-partitioned, sorted by key, so a
reader filtering on experiment, stage or key skips the rest). Only runs stored `ok` are compacted (a
failed run's file is replaced by its retry); those files never change again.

Commit markers, as for a trial: a part is written to a temp file and renamed (the rename is its commit),
predictions before runs; then the store records that the part holds those runs; only then are the
per-run files removed. A crash at any point leaves every run in its own file, in a committed part, or
in both: readers take a run once (`ResultStore.read_runs` / `read_result` / `read_predictions`), the next
ingest registers a part it does not know (its runs map to the part), and the next compaction first
removes per-run files that a part holds. Nothing is lost, nothing counted twice.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.store.schema import PREDICTION_SCHEMA, RUN_SCHEMA, registered

#: an analysis.store.results.ResultStore (not imported: the store imports this module)
ResultStore = Any

#: ingested per-run files (stored ok, not yet in a part) that make an ingest compact them
COMPACT_MIN_FILES = 256
#: rows per Parquet row group of a predictions part (the unit a key filter skips)
ROW_GROUP = 64 * 1024
#: failure injection for tests: TRANSFERLAB_COMPACT_CRASH=<point> SIGKILLs the compactor there
CRASH_ENV = "TRANSFERLAB_COMPACT_CRASH"
CRASH_POINTS = ("before-commit", "after-predictions", "after-runs", "after-record", "mid-delete", "after-delete")


def _crash(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def pending(store: ResultStore, con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT count(*) FROM run_files WHERE root = $root AND status = 'ok' AND "
                       "NOT contains(file, '/part-')", {"root": str(store.root)}).fetchone()[0]


def compact_if_due(store: ResultStore, min_files: int | None = None) -> int:
    """Compact when at least `min_files` (default COMPACT_MIN_FILES) ingested per-run files wait."""
    if min_files is None:  # TRANSFERLAB_COMPACT_MIN_FILES: tests compact small studies while they run
        min_files = int(os.environ.get("TRANSFERLAB_COMPACT_MIN_FILES", COMPACT_MIN_FILES))
    with store.connect() as con:
        due = pending(store, con) >= min_files
    return compact(store) if due else 0


def compact(store: ResultStore, min_files: int = 1) -> int:
    """Merge the ingested per-run files of runs stored ok (at least `min_files` of them) into parts, one
    batch per stage; returns the number of runs moved. A local results folder only: a remote location
    keeps one object per run, and its mirror here one file per run (so it is never pulled again)."""
    if store.remote is not None:
        raise ValueError("compaction works on a local results folder; a remote location keeps per-run objects")
    root = str(store.root)
    moved = 0
    for d in (store.runs_dir, store.predictions_dir):  # temp files of a compactor that was killed
        for tmp in d.glob("**/.part-*.tmp") if d.is_dir() else ():
            tmp.unlink(missing_ok=True)
    with store.connect() as con:
        store._ingest_runs(con)  # registers parts a crashed compaction committed
        store._ingest_predictions(con)
        remove_covered(store, con)
        todo = con.execute("""SELECT kind, list(run_key ORDER BY run_key) FROM run_files
                              WHERE root = $root AND status = 'ok' AND NOT contains(file, '/part-')
                              GROUP BY kind ORDER BY kind""", {"root": root}).fetchall()
        if sum(len(keys) for _, keys in todo) < min_files:
            return 0
        for kind, keys in todo:
            moved += _compact_stage(store, con, kind or "none", keys)
    return moved


def _compact_stage(store: ResultStore, con: duckdb.DuckDBPyConnection, kind: str, keys: list[str]) -> int:
    root = str(store.root)
    token = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
    rows = _read_all([store.result_path(k) for k in keys], RUN_SCHEMA)
    if rows is None:
        return 0
    rows = rows.sort_by("run_key")
    keys = rows["run_key"].to_pylist()
    experiments = dict(zip(keys, rows["experiment"].to_pylist(), strict=True))
    pred_files = {r[0]: r[1] for r in con.execute(
        "SELECT key, file FROM prediction_keys WHERE list_contains($keys, key) AND file IS NOT NULL "
        "AND NOT contains(file, '/part-')", {"keys": keys}).fetchall()}
    by_exp: dict[str, list[str]] = {}
    for k in pred_files:
        by_exp.setdefault(experiments[k] or "none", []).append(k)
    pred_parts: dict[str, str] = {}  # key -> part name
    for exp, ks in sorted(by_exp.items()):  # 1. predictions, each part committed by its rename
        table = _read_all([store.root / pred_files[k] for k in ks], PREDICTION_SCHEMA)
        if table is None:
            continue
        name = f"predictions/experiment={quote(exp, safe='')}/kind={quote(kind, safe='')}/part-{token}.parquet"
        _write_part(table.sort_by([("key", "ascending")]), store.root / name)
        pred_parts.update(dict.fromkeys(ks, name))
    _crash("after-predictions")
    # 2. the run rows: the batch's commit. One run part per stage, rewritten with the new rows (run rows are
    # small: 30,000 are a few MB), so a trial's own look-up (`read_result`) opens a file or two, not hundreds
    prefix = f"runs/part-{quote(kind, safe='')}-"
    older = sorted(n for n in store._known(con, "runs") if n.startswith(prefix))
    if older:
        rows = pa.concat_tables([rows, *(t for t in [_read_all([store.root / n for n in older], RUN_SCHEMA)] if t)])
        keys_all = rows["run_key"].to_pylist()
        first = sorted({k: i for i, k in reversed(list(enumerate(keys_all)))}.values())  # a key once: its newest row
        rows = rows.take(first).sort_by("run_key")
        keys = rows["run_key"].to_pylist()
    run_part = f"{prefix}{token}.parquet"
    _write_part(rows, store.root / run_part)
    _crash("after-runs")
    con.execute("BEGIN")  # 3. the store records where the runs and predictions live now
    try:
        con.execute("UPDATE run_files SET file = $part WHERE root = $root AND list_contains($keys, run_key)",
                    {"part": run_part, "root": root, "keys": keys})
        if pred_parts:
            table = pa.table({"key": list(pred_parts), "file": list(pred_parts.values())})
            with registered(con, "_moved", table):
                con.execute("UPDATE prediction_keys SET file = m.file FROM _moved m WHERE prediction_keys.key = m.key")
        store._record_files(con, [run_part, *sorted(set(pred_parts.values()))],
                            {n: _stat(store.root / n) for n in [run_part, *pred_parts.values()]})
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    _crash("after-record")
    remove_covered(store, con)  # 4. the per-run files
    return len(keys)


def remove_covered(store: ResultStore, con: duckdb.DuckDBPyConnection) -> int:
    """Delete per-run files whose run (or predictions) a committed, recorded part holds, and run parts that
    a newer part replaced (no run maps to them any more)."""
    root = str(store.root)
    names = [r[0] for r in con.execute("""
        SELECT s.name FROM store_files s JOIN run_files r
          ON r.root = s.root AND s.name = 'runs/' || r.run_key || '.parquet'
        WHERE s.root = $root AND contains(r.file, '/part-')
        UNION ALL
        SELECT s.name FROM store_files s WHERE s.root = $root AND starts_with(s.name, 'runs/part-')
          AND s.name NOT IN (SELECT file FROM run_files WHERE root = $root)
        UNION ALL
        SELECT s.name FROM store_files s JOIN prediction_keys p
          ON s.name = 'predictions/' || p.key || '.parquet'
        WHERE s.root = $root AND contains(p.file, '/part-')
        ORDER BY 1""", {"root": root}).fetchall()]
    for i, n in enumerate(names):
        (store.root / n).unlink(missing_ok=True)
        if i == len(names) // 2:
            _crash("mid-delete")
    _crash("after-delete")
    if names:
        con.execute("DELETE FROM store_files WHERE root = $root AND list_contains($names, name)",
                    {"root": root, "names": names})
    return len(names)


def _read_all(paths: list[Path], schema: pa.Schema) -> pa.Table | None:
    tables = []
    for p in paths:
        try:
            tables.append(pq.read_table(p, schema=schema, partitioning=None))
        except FileNotFoundError:  # already in a part (a crashed run of this compaction)
            continue
    return pa.concat_tables(tables) if tables else None


def _write_part(table: pa.Table, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _crash("before-commit")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def file_counts(store: ResultStore) -> dict[str, int]:
    """Files per folder of the results (for the scale benchmark and `status`)."""
    out = {}
    for name in ("runs", "predictions", "checkpoints"):
        d = store.root / name
        out[name] = sum(len(files) for _, _, files in os.walk(d)) if d.is_dir() else 0
    return out

