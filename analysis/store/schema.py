"""The one schema of the results store: run rows, per-example predictions, the ingest records, and the
migration of stores written by older versions. (Its own module so that the store and its compactor
share it without importing each other.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa

#: the schema version `migrate` brings a store to: 3 = predictions keyed by task too, runs.stack, ingest records
SCHEMA_VERSION = 3

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
    ("stack", "JSON", pa.string()),  # library versions and device that produced the row (rayjobs.engine.stack)
]
RUN_SCHEMA = pa.schema([(n, t) for n, _, t in RUN_COLUMNS])
_JSON_COLS = {"hparams", "metrics", "stack"}

# Per-example outputs (DESIGN.md "Predictions"): one row per (run or scoring key, task, example, template);
# the task is part of the key because hub-loaded tasks number their examples alike (`split:i`).
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

-- Unique on (key, task, example_id, template) by construction: a key's rows are ingested once, in the
-- transaction that records the key in `prediction_keys` (no index: one over 30 M rows would cost the
-- driver gigabytes of memory). Rows are stored in key order, so a filter on `key` skips row groups.
CREATE TABLE IF NOT EXISTS predictions (
    {", ".join(f"{n} {t}" for n, t, _ in PREDICTION_COLUMNS)});

-- Bookkeeping of incremental ingest (see the module docstring): which files of which results folder
-- were ingested, where each run's row lives now, which keys' predictions are in `predictions`.
CREATE TABLE IF NOT EXISTS store_files (
    root VARCHAR, name VARCHAR, size BIGINT, mtime_ns BIGINT, PRIMARY KEY (root, name));
CREATE TABLE IF NOT EXISTS run_files (
    root VARCHAR, run_key VARCHAR, status VARCHAR, kind VARCHAR, file VARCHAR, PRIMARY KEY (root, run_key));
CREATE TABLE IF NOT EXISTS prediction_keys (
    key VARCHAR PRIMARY KEY, root VARCHAR, n_rows BIGINT, file VARCHAR);
CREATE TABLE IF NOT EXISTS store_meta (name VARCHAR PRIMARY KEY, value VARCHAR);

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


#: the schema version `migrate` brings a store to: 3 = predictions keyed by task too, runs.stack, ingest records
SCHEMA_VERSION = 3

def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Bring a store written by an older version to `SCHEMA_VERSION`, once (recorded in `store_meta`):
    the `stack` column of `runs`; `predictions` without its old key (key, example_id, template), which
    let two tasks' rows with one example id replace each other; `prediction_keys` from the rows there."""
    v = con.execute("SELECT value FROM store_meta WHERE name = 'schema_version'").fetchone()
    if v is not None and int(v[0]) >= SCHEMA_VERSION:
        return

    def columns(table: str) -> list[str]:
        return [r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table]).fetchall()]

    con.execute("BEGIN")
    try:
        if "stack" not in columns("runs"):
            con.execute("ALTER TABLE runs ADD COLUMN stack JSON")
        old_key = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() AND schema_name = "
            "'main' AND table_name = 'predictions' AND constraint_type = 'PRIMARY KEY'").fetchone()[0]
        if old_key:
            keep = ", ".join(c for c in columns("predictions") if c in PREDICTION_SCHEMA.names)
            con.execute(f"CREATE TABLE _predictions_v{SCHEMA_VERSION} "
                        f"({', '.join(f'{n} {t}' for n, t, _ in PREDICTION_COLUMNS)})")
            con.execute(f"INSERT INTO _predictions_v{SCHEMA_VERSION} ({keep}) SELECT {keep} FROM predictions ORDER BY key")
            con.execute("DROP TABLE predictions")
            con.execute(f"ALTER TABLE _predictions_v{SCHEMA_VERSION} RENAME TO predictions")
        con.execute("INSERT INTO prediction_keys SELECT key, NULL, count(*), NULL FROM predictions GROUP BY key "
                    "ON CONFLICT DO NOTHING")
        con.execute("INSERT OR REPLACE INTO store_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """Expose an Arrow table to SQL as `name` for the duration of the block."""
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


