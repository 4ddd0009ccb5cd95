"""The results store: one Parquet file per finished run, ingested idempotently into DuckDB.

Why two layers: a trial writes its row atomically next to its checkpoint (no shared writer, no lock,
works from any node that sees the results folder); the driver ingests those files into the DuckDB
file with INSERT OR REPLACE on the run key. A crash between the two loses nothing (the Parquet file
is still there) and duplicates nothing (the key is the primary key).
"""

from __future__ import annotations

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
import pyarrow.parquet as pq

from analysis.views import ANALYSIS_SQL

DB_NAME = "transferlab.duckdb"

# (column, DuckDB type, Arrow type) -- the one schema of a run row.
RUN_COLUMNS: list[tuple[str, str, pa.DataType]] = [
    ("run_key", "VARCHAR PRIMARY KEY", pa.string()),
    ("experiment", "VARCHAR", pa.string()),
    ("kind", "VARCHAR", pa.string()),  # source | target | transfer | multitask
    ("setup", "VARCHAR", pa.string()),
    ("model", "VARCHAR", pa.string()),
    ("adaptation", "VARCHAR", pa.string()),
    ("source", "VARCHAR", pa.string()),
    ("target", "VARCHAR", pa.string()),
    ("sources", "VARCHAR[]", pa.list_(pa.string())),  # multi-task source set
    ("seed", "INTEGER", pa.int64()),
    ("source_run_key", "VARCHAR", pa.string()),
    ("baseline_run_key", "VARCHAR", pa.string()),
    ("n_train", "INTEGER", pa.int64()),
    ("n_eval", "INTEGER", pa.int64()),
    ("hparams", "JSON", pa.string()),
    ("metric", "VARCHAR", pa.string()),
    ("score", "DOUBLE", pa.float64()),  # the task metric p, a fraction
    ("metrics", "JSON", pa.string()),
    ("trainable_params", "BIGINT", pa.int64()),
    ("total_params", "BIGINT", pa.int64()),
    ("train_time_s", "DOUBLE", pa.float64()),
    ("wall_time_s", "DOUBLE", pa.float64()),
    ("host", "VARCHAR", pa.string()),
    ("checkpoint", "VARCHAR", pa.string()),
    ("status", "VARCHAR", pa.string()),  # ok | failed
    ("error", "VARCHAR", pa.string()),
    ("provenance", "VARCHAR", pa.string()),  # local | taskweb:<file> | ...
    ("created_at", "TIMESTAMP", pa.timestamp("us")),
]
RUN_SCHEMA = pa.schema([(n, t) for n, _, t in RUN_COLUMNS])
_JSON_COLS = {"hparams", "metrics"}

# Per-example outputs (DESIGN.md "Predictions"): one row per (run or scoring key, example, template).
# Every per-example number of the system (PVI, prompt-selection baselines, FUTE soft labels, served
# predictions) is computed from these rows. Choice tasks fill the list columns in the task's canonical
# label order; free-text and score answers fill pred_text / pred_value (and gold_text / gold_value).
PREDICTION_COLUMNS: list[tuple[str, str, pa.DataType]] = [
    ("key", "VARCHAR", pa.string()),  # run_key of a training run, or the key of a scoring trial
    ("example_id", "VARCHAR", pa.string()),  # stable id of the example within its task
    ("template", "VARCHAR", pa.string()),  # prompt template name ('input' = the task's base rendering)
    ("task", "VARCHAR", pa.string()),
    ("split", "VARCHAR", pa.string()),  # eval | train | pool (unlabelled probe pool)
    ("gold", "INTEGER", pa.int64()),  # gold choice index; NULL when unlabelled
    ("choices", "VARCHAR[]", pa.list_(pa.string())),  # verbalised choices as the model saw them
    ("logprobs", "DOUBLE[]", pa.list_(pa.float64())),  # summed log-likelihood per choice (encoders: log-softmax)
    ("logprobs_mean", "DOUBLE[]", pa.list_(pa.float64())),  # length-normalised per choice
    ("probs", "DOUBLE[]", pa.list_(pa.float64())),  # softmax over the choices of the scores used to predict
    ("prediction", "INTEGER", pa.int64()),
    ("correct", "BOOLEAN", pa.bool_()),
    ("pred_text", "VARCHAR", pa.string()),  # greedy generation (text tasks, or on request)
    ("gold_text", "VARCHAR", pa.string()),
    ("pred_value", "DOUBLE", pa.float64()),  # regression answers
    ("gold_value", "DOUBLE", pa.float64()),
    ("prompt_ppl", "DOUBLE", pa.float64()),  # perplexity of the rendered prompt (on request)
]
PREDICTION_SCHEMA = pa.schema([(n, t) for n, _, t in PREDICTION_COLUMNS])

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS runs ({", ".join(f"{n} {t}" for n, t, _ in RUN_COLUMNS)});

CREATE TABLE IF NOT EXISTS predictions (
    {", ".join(f"{n} {t}" for n, t, _ in PREDICTION_COLUMNS)},
    PRIMARY KEY (key, example_id, template));

-- Aggregated transfer scores imported from a publication (no per-seed baselines released).
CREATE TABLE IF NOT EXISTS published_transfer_scores (
    model VARCHAR, adaptation VARCHAR, source VARCHAR, target VARCHAR,
    pc DOUBLE, pm DOUBLE, provenance VARCHAR,
    PRIMARY KEY (model, adaptation, source, target, provenance));

-- Seed-paired PC / PM (DESIGN.md): each transfer run names the target-only baseline it pairs with.
CREATE OR REPLACE VIEW transfer_pairs AS
SELECT x.setup, x.model, x.adaptation, x.source, x.target, x.seed,
       x.score AS p_transfer, b.score AS p_target,
       (x.score - b.score) / b.score AS rel_change,
       CASE WHEN x.score > b.score THEN 1.0 ELSE 0.0 END AS positive,
       x.run_key, b.run_key AS baseline_run_key, x.experiment
FROM runs x JOIN runs b ON b.run_key = x.baseline_run_key
WHERE x.kind = 'transfer' AND x.status = 'ok' AND b.status = 'ok' AND b.score <> 0;

CREATE OR REPLACE VIEW transfer_scores AS
SELECT model, adaptation, source, target, pc, pm,
       0.5 * pc + 0.5 * (0.2 * pm - 0.1) AS score, n_seeds, setup, provenance
FROM (
    SELECT model, adaptation, source, target, avg(rel_change) AS pc, avg(positive) AS pm,
           count(*) AS n_seeds, setup, 'local' AS provenance
    FROM transfer_pairs GROUP BY setup, model, adaptation, source, target
    UNION ALL
    SELECT p.model, p.adaptation, p.source, p.target, p.pc, p.pm,
           coalesce(n.n_seeds, 0) AS n_seeds, p.adaptation || ':' || p.model AS setup, p.provenance
    FROM published_transfer_scores p
    LEFT JOIN (SELECT model, adaptation, source, target, provenance, count(*) AS n_seeds FROM runs
               WHERE kind = 'transfer' AND status = 'ok' GROUP BY ALL) n
      ON n.model = p.model AND n.adaptation = p.adaptation AND n.source = p.source AND n.target = p.target
         AND split_part(n.provenance, ':', 1) = split_part(p.provenance, ':', 1)
);
"""


class StoreError(RuntimeError):
    """The results location cannot be used (missing, not writable, corrupt)."""


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
            from analysis.remote import RemoteResults

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

    # -- a remote results location (analysis.remote) -----------------------------------------
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
        p = self.prediction_path(key)
        return pq.read_table(p) if p.exists() else None

    def read_result(self, run_key: str) -> dict[str, Any] | None:
        p = self.result_path(run_key)
        if not p.exists():
            return None
        return pq.read_table(p).to_pylist()[0]

    def read_runs(self, columns: list[str]) -> pa.Table:
        """`columns` of every result file (read while trials write: each file is whole or absent)."""
        import pyarrow.dataset as ds

        files = [str(p) for p in self.runs_dir.glob("*.parquet")] if self.runs_dir.exists() else []
        return ds.dataset(files, schema=RUN_SCHEMA, format="parquet").to_table(columns=columns)

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
        """Run keys with a decided result file (the source of truth for resuming): finished, or stopped
        early by the scheduler; `statuses` narrows it."""
        self.sync_down(predictions=False)
        if not self.runs_dir.exists():
            return set()
        files = [str(p) for p in self.runs_dir.glob("*.parquet")]
        if not files:
            return set()
        con = duckdb.connect()
        try:
            rows = con.execute(
                "SELECT run_key FROM read_parquet($files) WHERE list_contains($st, status)",
                {"files": files, "st": list(statuses)}
            ).fetchall()
        finally:
            con.close()
        return {r[0] for r in rows}

    # -- driver side: idempotent ingest ---------------------------------------------------------
    def ingest(self) -> int:
        """Upsert every result file into `runs`, and the prediction files of runs not yet ingested into
        `predictions`; returns the number of result files read."""
        self.sync_down()
        files = sorted(str(p) for p in self.runs_dir.glob("*.parquet")) if self.runs_dir.exists() else []
        with self.connect() as con:
            before = _counts(con)
            if files:
                cols = ", ".join(n for n, _, _ in RUN_COLUMNS)
                con.execute(f"INSERT OR REPLACE INTO runs ({cols}) SELECT {cols} FROM read_parquet($files)",
                            {"files": files})
            self._ingest_predictions(con)
            self.last_ingested = {t: n - before[t] for t, n in _counts(con).items()}
        return len(files)

    def _ingest_predictions(self, con: duckdb.DuckDBPyConnection) -> int:
        """Prediction files are immutable once their run row exists: ingest each key once."""
        if not self.predictions_dir.exists():
            return 0
        have = {r[0] for r in con.execute("SELECT DISTINCT key FROM predictions").fetchall()}
        files = sorted(str(p) for p in self.predictions_dir.glob("*.parquet") if p.stem not in have)
        if not files:
            return 0
        cols = ", ".join(n for n, _, _ in PREDICTION_COLUMNS)
        con.execute(f"INSERT OR REPLACE INTO predictions ({cols}) SELECT {cols} FROM read_parquet($files, "
                    "union_by_name = true)", {"files": files})
        return len(files)

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
    import datetime as dt

    return dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).replace(tzinfo=None)
