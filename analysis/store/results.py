"""The results store: one Parquet file per finished run, ingested idempotently into DuckDB.

Why two layers: a trial writes its row atomically next to its checkpoint (no shared writer, no lock,
works from any node that sees the results folder); the driver ingests those files into the DuckDB
file with INSERT OR REPLACE on the run key. A crash between the two loses nothing (the Parquet file
is still there) and duplicates nothing (the key is the primary key).

Why the bookkeeping tables (`store_files`, `run_files`, `prediction_keys`): a study of 30,000 runs
must not re-read 30,000 files at every periodic ingest or resume check. The store records which
files it has ingested (name, size, mtime) and where each run's row lives, so an ingest reads only
new files and `finished_keys` lists one folder and answers the rest from the table. Ingested
per-run files are then merged into a few Parquet parts (`analysis.store.compaction`), which keeps the
folders small; every reader takes a run from its own file when there is one, else from a part.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from analysis.errors import StoreError  # noqa: F401 - callers catch it from here too
from analysis.store.compaction import compact_if_due
from analysis.store.remote import RemoteResults
from analysis.store.schema import (  # noqa: F401 - the schema's names are the store's
    _JSON_COLS,
    PREDICTION_COLUMNS,
    PREDICTION_SCHEMA,
    RUN_COLUMNS,
    RUN_SCHEMA,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    migrate,
    registered,
)
from analysis.store.views import ANALYSIS_SQL

DB_NAME = "transferlab.duckdb"
#: files and bytes read per ingest transaction (bound the driver's memory while catching up on many runs)
BATCH_FILES, BATCH_BYTES = 256, 64 * 2**20
#: SQL: is the file `_file` (a name relative to the results folder) a compacted part?
_IS_PART = "contains(_file, '/part-')"
#: glob of the compacted parts (analysis.store.compaction) in `runs/` and (partitioned) in `predictions/`
RUN_PARTS, PREDICTION_PARTS = "part-*.parquet", "**/part-*.parquet"


class ResultStore:
    """A results folder: `runs/<key>.parquet`, `predictions/<key>.parquet`, `checkpoints/<key>/` and
    the DuckDB file. A trial writes its predictions first and its run row last: the run row is the
    commit marker, so a run counts as done only when both are on disk."""

    def __init__(self, root: str | os.PathLike, db_path: str | os.PathLike | None = None,
                 remote: str | None = None):
        self.root = Path(root).expanduser().resolve()
        #: the results location when it is not a folder here (s3://...): `root` is then its local mirror
        self.remote_uri = remote
        self.remote = None
        if remote:
            self.remote = RemoteResults(remote)
        self.db_path = Path(db_path).expanduser().resolve() if db_path else self.root / DB_NAME
        self.runs_dir = self.root / "runs"
        self.checkpoints_dir = self.root / "checkpoints"
        self.predictions_dir = self.root / "predictions"
        #: rows the latest `ingest()` added per table (new run keys, new prediction rows): for metrics
        self.last_ingested: dict[str, int] = {}

    # -- setup -----------------------------------------------------------------------------
    def ensure_writable(self) -> None:
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe", delete=True)
            probe.close()
        except OSError as e:
            raise StoreError(f"results dir {self.root} is not writable: {e.strerror or e}") from None
        if self.remote is not None:
            self.remote.check()
        with self.connect():
            pass

    # -- a remote results location (analysis.store.remote) -----------------------------------------
    def sync_down(self, predictions: bool = True) -> None:
        """Run rows (and predictions) the remote has and this mirror lacks (checkpoints stay remote)."""
        if self.remote is not None:
            self.remote.pull_new("runs", self.runs_dir)
            if predictions:
                self.remote.pull_new("predictions", self.predictions_dir)

    def push_run(self, run_key: str) -> None:
        if self.remote is not None:
            self.remote.push_run(self.root, run_key)

    def pull_run(self, run_key: str, checkpoint: bool = True) -> bool:
        return self.remote.pull_run(self.root, run_key, checkpoint) if self.remote is not None else False

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.db_path.exists():
            raise StoreError(f"no results database at {self.db_path} (run a job or `transferlab import` first)")
        try:
            con = duckdb.connect(str(self.db_path), read_only=read_only)
        except (duckdb.IOException, duckdb.Error) as e:
            raise StoreError(f"cannot open results database {self.db_path}: {e}") from None
        try:
            if not read_only:
                con.execute(SCHEMA_SQL)
                migrate(con)
                if ANALYSIS_SQL.strip():
                    con.execute(ANALYSIS_SQL)
            yield con
        finally:
            con.close()

    # -- trial side: atomic result files ------------------------------------------------------
    def checkpoint_dir(self, run_key: str) -> Path:
        return self.checkpoints_dir / run_key

    def result_path(self, run_key: str) -> Path:
        return self.runs_dir / f"{run_key}.parquet"

    def write_result(self, row: dict[str, Any]) -> Path:
        """Write one run row as `runs/<key>.parquet` atomically (temp file + rename)."""
        full = normalise_row(row)
        return _write_atomic(pa.Table.from_pylist([full], schema=RUN_SCHEMA), self.result_path(full["run_key"]))

    def prediction_path(self, key: str) -> Path:
        return self.predictions_dir / f"{key}.parquet"

    def write_predictions(self, key: str, rows: list[dict[str, Any]]) -> Path | None:
        """Write the per-example rows of one run or scoring key atomically (before its run row)."""
        if not rows:
            return None
        table = pa.Table.from_pylist([{**{n: r.get(n) for n in PREDICTION_SCHEMA.names}, "key": key} for r in rows],
                                     schema=PREDICTION_SCHEMA)
        return _write_atomic(table, self.prediction_path(key))

    def read_predictions(self, key: str) -> pa.Table | None:
        """One key's per-example rows, from its own file or, once compacted, from the parts."""
        try:
            return pq.read_table(self.prediction_path(key), schema=PREDICTION_SCHEMA)
        except FileNotFoundError:  # compacted (the part was committed before the file went)
            pass
        parts = _files(self.predictions_dir, PREDICTION_PARTS)
        if not parts:
            return None
        t = _dataset(parts, PREDICTION_SCHEMA).to_table(filter=pc.field("key") == key)
        return t if t.num_rows else None

    def read_result(self, run_key: str) -> dict[str, Any] | None:
        """A run's row, from its own file or, once compacted, from the parts of `runs/`."""
        try:
            return pq.read_table(self.result_path(run_key), schema=RUN_SCHEMA).to_pylist()[0]
        except FileNotFoundError:
            pass
        parts = _files(self.runs_dir, RUN_PARTS)
        if not parts:
            return None
        rows = _dataset(parts, RUN_SCHEMA).to_table(filter=pc.field("run_key") == run_key).to_pylist()
        return rows[0] if rows else None

    def read_runs(self, columns: list[str]) -> pa.Table:
        """`columns` of every run of the folder, from the files alone (read while trials write and the
        compactor merges: each file is whole or absent, a run in a part and its own file counts once)."""
        cols = list(dict.fromkeys(["run_key", *columns]))
        for _ in range(5):  # a file listed and then compacted away: list again
            try:
                parts = _dataset(_files(self.runs_dir, RUN_PARTS), RUN_SCHEMA).to_table(columns=cols)
                single = _dataset(_files(self.runs_dir, RUN_SINGLE), RUN_SCHEMA).to_table(columns=cols)
                break
            except FileNotFoundError:
                continue
        else:
            raise StoreError(f"the files of {self.runs_dir} keep changing while being read")
        both = pa.concat_tables([single, parts])
        if parts.num_rows:  # a run in its own file and a part, or in two parts (a crash amid compaction): once
            keys = both["run_key"].to_pylist()
            if len(set(keys)) < len(keys):
                first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
                both = both.take(first)
        return both.select(columns)

    def write_json(self, name: str, obj: Any) -> None:
        """A small JSON document next to the results (e.g. the driver's plan), written atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, self.root / name)

    def read_json(self, name: str) -> Any:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def finished_keys(self, statuses: tuple[str, ...] = ("ok", "stopped")) -> set[str]:
        """Run keys with a decided result (the source of truth for resuming): finished, or stopped early by
        the scheduler (`statuses` narrows it). From the store's record of ingested files plus only the
        files that are new since (O(new runs), not O(study)); when another process holds the database,
        from the files alone."""
        self.sync_down(predictions=False)
        try:
            with self.connect() as con:
                self._ingest_runs(con)
                rows = con.execute("SELECT run_key FROM run_files WHERE root = $root AND list_contains($st, status)",
                                   {"root": str(self.root), "st": list(statuses)}).fetchall()
        except StoreError:
            t = self.read_runs(["run_key", "status"])
            return {k for k, st in zip(t["run_key"].to_pylist(), t["status"].to_pylist(), strict=True)
                    if st in statuses}
        return {r[0] for r in rows}

    # -- driver side: idempotent, incremental ingest ---------------------------------------------
    def ingest(self, compact: bool = True) -> int:
        """Upsert the result files not ingested yet into `runs`, and the prediction files of runs stored
        ok and not ingested yet into `predictions`; then (a local folder, enough ingested per-run files)
        compact them. Returns the number of result files read."""
        self.sync_down()
        with self.connect() as con:
            before = _counts(con)
            n = self._ingest_runs(con)
            self._ingest_predictions(con)
            self.last_ingested = {t: c - before[t] for t, c in _counts(con).items()}
        if compact and self.remote is None:
            compact_if_due(self)
        return n

    def _known(self, con: duckdb.DuckDBPyConnection, folder: str) -> dict[str, tuple[int, int]]:
        rows = con.execute("SELECT name, size, mtime_ns FROM store_files WHERE root = $root AND "
                           "starts_with(name, $folder)", {"root": str(self.root), "folder": folder + "/"}).fetchall()
        return {n: (s, m) for n, s, m in rows}

    def _ingest_runs(self, con: duckdb.DuckDBPyConnection) -> int:
        """Result files (own or parts) new or changed since the last ingest; a part's runs map to it."""
        root = str(self.root)
        known = self._known(con, "runs")
        on_disk = _listing(self.root, self.runs_dir, recursive=False)
        gone = [n for n in known if n not in on_disk]
        new = sorted(n for n, st in on_disk.items() if known.get(n) != st)
        if gone:  # a result file removed by hand: its run is no longer stored (a re-run trains it again)
            con.execute("BEGIN")
            con.execute("DELETE FROM run_files WHERE root = $root AND list_contains($gone, file)",
                        {"root": root, "gone": gone})
            con.execute("DELETE FROM store_files WHERE root = $root AND list_contains($gone, name)",
                        {"root": root, "gone": gone})
            con.execute("COMMIT")
        n = 0
        for batch in _batches(new, BATCH_FILES, on_disk):
            table, batch = _read_with_names(self.root, batch, RUN_SCHEMA)
            if table is None:
                continue
            n += len(batch)
            cols = ", ".join(RUN_SCHEMA.names)
            con.execute("BEGIN")
            try:
                with registered(con, "_incoming", table):
                    # a run in a part and in its own file (crash before the files' removal): the part wins
                    con.execute(f"""CREATE OR REPLACE TEMP TABLE _new AS SELECT * FROM _incoming
                        QUALIFY row_number() OVER (PARTITION BY run_key ORDER BY {_IS_PART} DESC, _file) = 1""")
                con.execute(f"INSERT OR REPLACE INTO runs ({cols}) SELECT {cols} FROM _new")
                con.execute("INSERT OR REPLACE INTO run_files SELECT $root, run_key, status, kind, _file FROM _new",
                            {"root": root})
                self._record_files(con, batch, on_disk)
                con.execute("DROP TABLE _new")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return n

    def _record_files(self, con: duckdb.DuckDBPyConnection, names: list[str],
                      stats: dict[str, tuple[int, int]]) -> None:
        files = pa.table({"root": pa.array([str(self.root)] * len(names), pa.string()),
                          "name": pa.array(names, pa.string()),
                          "size": pa.array([stats[n][0] for n in names], pa.int64()),
                          "mtime_ns": pa.array([stats[n][1] for n in names], pa.int64())})
        with registered(con, "_files", files):
            con.execute("INSERT OR REPLACE INTO store_files SELECT root, name, size, mtime_ns FROM _files")

    def _ingest_predictions(self, con: duckdb.DuckDBPyConnection) -> int:
        """Prediction files are immutable once their run row exists: each key's rows go in once, when
        its run is stored ok (the run row is the commit marker), in key order. A key's rows live in one
        file (its own, or the one part the compactor moved them to), which is what makes "once" hold."""
        root = str(self.root)
        on_disk = _listing(self.root, self.predictions_dir, recursive=True)
        if not on_disk:
            return 0
        known = self._known(con, "predictions")
        new = sorted(n for n, st in on_disk.items() if known.get(n) != st)
        if not new:
            return 0
        single = {Path(n).stem: n for n in new if n.count("/") == 1}
        ready: set[str] = set()
        if single:
            ready = {r[0] for r in con.execute(
                "SELECT run_key FROM run_files WHERE root = $root AND status = 'ok' AND list_contains($keys, run_key)",
                {"root": root, "keys": list(single)}).fetchall()}
        take = [n for n in new if n.count("/") > 1 or Path(n).stem in ready]  # the rest: run not stored yet
        rows = 0
        for batch in _batches(take, BATCH_FILES, on_disk):
            table, batch = _read_with_names(self.root, batch, PREDICTION_SCHEMA)
            if table is None:
                continue
            cols = ", ".join(PREDICTION_SCHEMA.names)
            con.execute("BEGIN")
            try:
                with registered(con, "_incoming", table):
                    con.execute(f"""CREATE OR REPLACE TEMP TABLE _new AS
                        WITH src AS (SELECT key, arg_max(_file, {_IS_PART}) AS _file
                                     FROM (SELECT DISTINCT key, _file FROM _incoming) GROUP BY key)
                        SELECT i.* FROM _incoming i JOIN src USING (key, _file)""")
                rows += con.execute(f"""INSERT INTO predictions ({cols}) SELECT {cols} FROM _new
                    WHERE key NOT IN (SELECT key FROM prediction_keys) ORDER BY key""").fetchone()[0]
                # keys new to the store, and keys whose rows a part now holds (compaction, or its recovery)
                con.execute(f"""INSERT INTO prediction_keys
                    SELECT key, $root, count(*), any_value(_file) FROM _new GROUP BY key
                    ON CONFLICT (key) DO UPDATE SET root = excluded.root, file = excluded.file
                    WHERE prediction_keys.file IS NULL OR NOT {_IS_PART.replace('_file', 'prediction_keys.file')}""",
                            {"root": root})
                con.execute("DROP TABLE _new")
                self._record_files(con, batch, on_disk)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return rows

    def insert_rows(self, rows: Iterable[dict[str, Any]], con: duckdb.DuckDBPyConnection) -> int:
        """Upsert rows given in memory (imports), through Arrow so it is vectorised."""
        table = pa.Table.from_pylist([normalise_row(r) for r in rows], schema=RUN_SCHEMA)
        if table.num_rows == 0:
            return 0
        cols = ", ".join(n for n, _, _ in RUN_COLUMNS)
        if hasattr(con, "abort"):  # duckdb 2: a partly read result blocks register()
            con.abort()
        con.register("_incoming", table)
        try:
            con.execute(f"INSERT OR REPLACE INTO runs ({cols}) SELECT {cols} FROM _incoming")
        finally:
            con.unregister("_incoming")
        return table.num_rows


def _listing(root: Path, folder: Path, recursive: bool) -> dict[str, tuple[int, int]]:
    """Parquet files under `folder` (names relative to `root`) -> (size, mtime_ns); temp files left out."""
    out: dict[str, tuple[int, int]] = {}
    if not folder.is_dir():
        return out
    base = folder.relative_to(root).as_posix()
    stack = [(folder, base)]
    while stack:
        d, rel = stack.pop()
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append((Path(e.path), f"{rel}/{e.name}"))
            elif e.name.endswith(".parquet"):
                try:
                    st = e.stat()
                except FileNotFoundError:  # compacted away since the listing
                    continue
                out[f"{rel}/{e.name}"] = (st.st_size, st.st_mtime_ns)
    return out


def _files(folder: Path, pattern: str) -> list[str]:
    """The parts (`pattern` = RUN_PARTS / PREDICTION_PARTS) or, for RUN_SINGLE, the per-run files."""
    if not folder.is_dir():
        return []
    if pattern == RUN_SINGLE:
        return sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith(("part-", ".")))
    return sorted(str(p) for p in folder.glob(pattern))


RUN_SINGLE = "single"


def _dataset(files: list[str], schema: pa.Schema) -> ds.Dataset:
    return ds.dataset(files, schema=schema, format="parquet")


def _batches(items: list[str], n: int, stats: dict[str, tuple[int, int]]) -> Iterator[list[str]]:
    """`items` in runs of at most `n` files and about BATCH_BYTES (at least one file each)."""
    batch: list[str] = []
    size = 0
    for it in items:
        if batch and (len(batch) >= n or size + stats[it][0] > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += stats[it][0]
    if batch:
        yield batch


def _read_with_names(root: Path, names: list[str], schema: pa.Schema) -> tuple[pa.Table | None, list[str]]:
    """The files `names` (relative to `root`) as one table with a `_file` column; files gone since the
    listing (compacted) are left out, and so are their names from the list returned."""
    tables, read = [], []
    for n in names:
        try:
            t = pq.read_table(root / n, schema=schema, partitioning=None)
        except FileNotFoundError:
            continue
        tables.append(t.append_column("_file", pa.array([n] * t.num_rows, pa.string())))
        read.append(n)
    return (pa.concat_tables(tables) if tables else None), read


def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    runs, predictions = con.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM predictions)").fetchone()
    return {"runs": runs, "predictions": predictions}


def _write_atomic(table: pa.Table, dest: Path) -> Path:
    """Parquet through a temp file and a rename: readers see the whole file or none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(RUN_SCHEMA.names)
    if unknown:
        raise ValueError(f"unknown run columns: {sorted(unknown)}")
    out: dict[str, Any] = {n: row.get(n) for n in RUN_SCHEMA.names}
    for c in _JSON_COLS:
        if out[c] is not None and not isinstance(out[c], str):
            out[c] = json.dumps(out[c], sort_keys=True)
    if out["created_at"] is None:
        out["created_at"] = _utcnow()
    if out["status"] is None:
        out["status"] = "ok"
    if out["provenance"] is None:
        out["provenance"] = "local"
    return out


def _utcnow():
    return dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).replace(tzinfo=None)
