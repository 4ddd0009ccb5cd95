"""Import the published TaskWeb release (Kim et al., 2023) into the results store.

Why: a user can start from the 25,000 published transfer experiments instead of re-running them,
and every analysis then works the same on published and locally produced results.

What lands where (provenance `taskweb:<file>` on every row):
  transfer_scores.csv            -> published_transfer_scores (PC / PM per setup; 'all:all' = average)
  runs.csv                       -> runs (kind 'transfer', one row per seed, score = task metric p)
  roe_scores_minilm_dot32.csv    -> selector_scores, selector 'roe'
  llm_similarity_davinci003.csv  -> selector_scores, selector 'llm' (symmetric: TaskWeb averages
                                    both directions, see its taskshop/llm_evaluate.py)

Task metric p of a run (TaskWeb taskshop/metrics.py + load.py): mean of the listed metrics that
the run reports (cb/mrpc/qqp: accuracy and F1; stsb: Pearson and Spearman; else accuracy), each
divided by 100 when above 1 (the release mixes percent and fractions). A run whose metric is NaN
(8 stsb runs with constant predictions) is stored with status 'failed' and no score.

How: Python's csv reader only splits records and counts lines; validation, typing and scoring
are one SQL statement per file over whole columns. Re-importing replaces the rows of the same
provenance (delete + insert in one transaction), so the store mirrors the file and importing twice
changes nothing. Malformed rows are skipped and reported as `file:line: reason`; with
`strict=True` nothing is written if any row is malformed.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.store.duck import query_arrow, registered
from analysis.store.results import RUN_COLUMNS

TRANSFER_FILE = "transfer_scores.csv"
RUNS_FILE = "runs.csv"
ROE_FILE = "roe_scores_minilm_dot32.csv"
LLM_FILE = "llm_similarity_davinci003.csv"
TASKWEB_FILES = (TRANSFER_FILE, RUNS_FILE, ROE_FILE, LLM_FILE)

# metrics averaged into p per target task (TaskWeb taskshop/metrics.py TASK2METRICS); default accuracy
TASKWEB_METRICS: dict[str, tuple[str, ...]] = {
    "cb": ("accuracy", "f1"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "squad_v2": ("exact", "f1"),
    "stsb": ("pearson", "spearmanr"),
}
_ALL_METRICS = ("accuracy", "f1", "pearson", "spearmanr", "exact")
_METRIC_NAME = {("accuracy",): "accuracy", ("accuracy", "f1"): "acc_f1",
                ("pearson", "spearmanr"): "pearson_spearman", ("exact", "f1"): "exact_f1"}

# The release holds two configs for (t5l finetune, copa): batch size 8 and 32. TaskWeb's
# configs/t5l_finetune.json names batch size 8 for copa, and Table 2's Regret@5 is computed from it.
TASKWEB_PINNED_HPARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("finetune:t5l", "copa"): {"batch_size": 8, "epochs": 5, "learning_rate": 0.0001},
}

ROE_PARAMS = {"model": "all-MiniLM-L6-v2", "similarity": "dot", "n_target": 32, "n_source": 100,
              "input": "{choices}</s>{input}"}
LLM_PARAMS = {"model": "text-davinci-003", "symmetric": True}


@dataclass
class ImportReport:
    """What an import did: rows kept per file, malformed rows skipped, files not found, notes."""

    kept: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "skipped": self.skipped, "missing": self.missing, "notes": self.notes}


# -- column checks, compiled to SQL -----------------------------------------------------------------
def _q(col: str) -> str:
    return f'"{col}"'


def _check_name(col: str) -> str:
    return f"CASE WHEN {_q(col)} = '' THEN 'empty {col}' END"


def _check_float(col: str, lo: float | None = None, hi: float | None = None) -> str:
    v = f"TRY_CAST({_q(col)} AS DOUBLE)"
    parts = [f"WHEN {v} IS NULL THEN '{col} is not a number: ' || {_q(col)}",
             f"WHEN NOT isfinite({v}) THEN '{col} is not finite: ' || {_q(col)}"]
    if lo is not None:
        parts.append(f"WHEN {v} < {lo} THEN '{col}=' || {_q(col)} || ' below {lo}'")
    if hi is not None:
        parts.append(f"WHEN {v} > {hi} THEN '{col}=' || {_q(col)} || ' above {hi}'")
    return "CASE " + " ".join(parts) + " END"


def _check_int(col: str, positive: bool = False) -> str:
    extra = f" WHEN TRY_CAST({_q(col)} AS BIGINT) <= 0 THEN '{col} must be positive'" if positive else ""
    return (f"CASE WHEN NOT regexp_full_match({_q(col)}, '-?[0-9]+') "
            f"THEN '{col} is not an integer: ' || {_q(col)}{extra} END")


def _validated(con: duckdb.DuckDBPyConnection, raw: pa.Table, checks: list[str], key: list[str],
               select: str, source: str = "_raw") -> tuple[list[tuple[int, str]], pa.Table]:
    """Run the checks over all rows at once; return (line, reason) of bad rows and the good rows.

    `source` is the relation the checks see (`_raw` is the file's string columns, possibly joined
    with lookup columns); `select` is evaluated on good rows only (relation `g`, where its casts
    are safe); duplicates of `key` after the first occurrence are bad rows too.
    """
    reason = "coalesce(" + ", ".join(checks) + ")"
    keys = ", ".join(_q(k) for k in key)
    with registered(con, "_raw", raw):
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _checked AS
            WITH r AS (SELECT *, {reason} AS _reason FROM {source})
            SELECT *, coalesce(_reason, CASE WHEN row_number() OVER w > 1
                                             THEN 'duplicate of line ' || first_value(_line) OVER w END) AS _why
            FROM r WINDOW w AS (PARTITION BY {keys}, (_reason IS NULL) ORDER BY _line)""")
        bad = con.execute("SELECT _line, _why FROM _checked WHERE _why IS NOT NULL ORDER BY _line").fetchall()
        good = query_arrow(con, f"WITH g AS (SELECT * FROM _checked WHERE _why IS NULL) "
                                f"SELECT {select} FROM g ORDER BY g._line")
    con.execute("DROP TABLE IF EXISTS _checked")
    return bad, good


def _read_columns(path: Path, header: tuple[str, ...]) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Split CSV records (quoted fields may hold commas or newlines) into string columns + `_line`."""
    cols: dict[str, list[str]] = {c: [] for c in header}
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            head = [h.strip() for h in next(reader)]
        except StopIteration:
            raise AnalysisError(f"{path}: empty file (expected header {','.join(header)})") from None
        missing = [c for c in header if c not in head]
        if missing:
            raise AnalysisError(f"{path}:1: header lacks column(s) {', '.join(missing)} (got {','.join(head)})")
        idx = [(cols[c], head.index(c)) for c in header]
        width = len(head)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a NUL byte: report the record, keep reading
                bad.append((reader.line_num, f"unreadable CSV record ({e})"))
                continue
            if len(cells) != width:
                if any(c.strip() for c in cells):
                    bad.append((reader.line_num, f"expected {width} fields, got {len(cells)}"))
                continue
            for lst, i in idx:
                lst.append(cells[i].strip())
            lines.append(reader.line_num)
    table = pa.table({**{c: pa.array(v, pa.string()) for c, v in cols.items()}, "_line": pa.array(lines, pa.int64())})
    return table, bad


def _parse(con: duckdb.DuckDBPyConnection, path: Path, header: tuple[str, ...], checks: list[str],
           key: list[str], select: str, source: str = "_raw") -> tuple[pa.Table, list[str]]:
    raw, bad = _read_columns(path, header)
    bad_rows, good = _validated(con, raw, checks, key, select, source)
    return good, [f"{path}:{line}: {why}" for line, why in sorted(bad + bad_rows)]


# -- the four TaskWeb files -----------------------------------------------------------------------
def _parse_transfer(con: duckdb.DuckDBPyConnection, path: Path, prov: str) -> tuple[pa.Table, list[str]]:
    cols = ("source", "target", "model", "adaptation", "pc", "pm")
    checks = [_check_name(c) for c in cols[:4]] + [_check_float("pc"), _check_float("pm", 0.0, 1.0)]
    select = (f"model, adaptation, source, target, CAST(pc AS DOUBLE) AS pc, CAST(pm AS DOUBLE) AS pm, "
              f"'{prov}' AS provenance")
    return _parse(con, path, cols, checks, ["model", "adaptation", "source", "target"], select)


def _metric_sql() -> tuple[str, list[str], str]:
    """The raw relation joined with each target's wanted metrics, the checks, and TaskWeb's p."""
    wanted_rows = ", ".join(
        f"('{t}', " + ", ".join("true" if m in ms else "false" for m in _ALL_METRICS)
        + f", '{_METRIC_NAME[ms]}', '{', '.join('eval_' + m for m in ms)}')"
        for t, ms in TASKWEB_METRICS.items())
    wcols = ", ".join(f"w_{m}" for m in _ALL_METRICS)
    flags = ", ".join(f"coalesce(w.w_{m}, {'true' if m == 'accuracy' else 'false'}) AS w_{m}" for m in _ALL_METRICS)
    source = (f"(SELECT r.*, {flags}, "
              f"coalesce(w.metric, 'accuracy') AS metric, coalesce(w.wanted, 'eval_accuracy') AS wanted "
              f"FROM _raw r LEFT JOIN (VALUES {wanted_rows}) w(target, {wcols}, metric, wanted) ON w.target = r.target)")
    mj = "CASE WHEN json_valid(metrics_json) THEN metrics_json ELSE '{}' END"
    checks = ["CASE WHEN NOT json_valid(metrics_json) THEN 'metrics_json is not JSON' "
              f"WHEN json_type({mj}) <> 'OBJECT' THEN 'metrics_json is not an object' END"]
    present = []
    for m in _ALL_METRICS:
        typ = f"json_type(json_extract({mj}, '$.eval_{m}'))"
        checks.append(f"CASE WHEN w_{m} AND {typ} NOT IN ('DOUBLE', 'BIGINT', 'UBIGINT', 'NULL') "
                      f"THEN 'eval_{m} is not a number' END")
        present.append(f"CASE WHEN w_{m} AND {typ} IN ('DOUBLE', 'BIGINT', 'UBIGINT') THEN 1 ELSE 0 END")
    checks.append(f"CASE WHEN ({' + '.join(present)}) = 0 "
                  "THEN 'metrics_json has none of the target''s metrics (' || wanted || ')' END")

    def norm(m: str) -> str:  # metric m of the run, percent -> fraction, NULL unless wanted and present
        x = f"TRY_CAST(json_extract_string(metrics_json, '$.eval_{m}') AS DOUBLE)"
        return f"CASE WHEN w_{m} THEN (CASE WHEN {x} > 1.0 THEN {x} / 100.0 ELSE {x} END) END"

    n = " + ".join(f"CASE WHEN ({norm(m)}) IS NULL THEN 0 ELSE 1 END" for m in _ALL_METRICS)
    total = " + ".join(f"coalesce({norm(m)}, 0)" for m in _ALL_METRICS)
    return source, checks, f"({total}) / ({n})"


def _parse_runs(con: duckdb.DuckDBPyConnection, path: Path, prov: str) -> tuple[pa.Table, list[str]]:
    cols = ("source", "target", "model", "adaptation", "epochs", "learning_rate", "batch_size", "seed",
            "metrics_json")
    source, mchecks, score = _metric_sql()
    checks = ([_check_name(c) for c in cols[:4]] + [_check_int("epochs"), _check_float("learning_rate", 0.0),
                                                     _check_int("batch_size"), _check_int("seed")] + mchecks)
    key = ["model", "adaptation", "source", "target", "epochs", "learning_rate", "batch_size", "seed"]
    select = f"""
        source, target, model, adaptation, adaptation || ':' || model AS setup,
        CAST(seed AS BIGINT) AS seed, {score} AS score, metric, metrics_json AS metrics,
        CAST(epochs AS BIGINT) AS epochs, CAST(learning_rate AS DOUBLE) AS learning_rate,
        CAST(batch_size AS BIGINT) AS batch_size
    """
    return _parse(con, path, cols, checks, key, select, source)


def _parse_pairs(con: duckdb.DuckDBPyConnection, path: Path, cols: tuple[str, ...], details: str | None
                 ) -> tuple[pa.Table, list[str]]:
    a, b = cols[0], cols[1]
    checks = [_check_name(a), _check_name(b)] + [_check_float(c) for c in cols[2:]]
    det = details or "NULL"
    select = f"{_q(a)} AS source, {_q(b)} AS target, CAST(score AS DOUBLE) AS score, {det} AS details"
    return _parse(con, path, cols, checks, [a, b], select)


# -- public entry points ------------------------------------------------------------------------------
def import_taskweb(con: duckdb.DuckDBPyConnection, directory: str | Path, strict: bool = False) -> ImportReport:
    """Load the TaskWeb release files found in `directory` into the store behind `con`."""
    root = Path(directory)
    if not root.is_dir():
        raise AnalysisError(f"TaskWeb directory {root} does not exist")
    present = [n for n in TASKWEB_FILES if (root / n).is_file()]
    if not present:
        raise AnalysisError(f"no TaskWeb files in {root} (expected {', '.join(TASKWEB_FILES)})")
    report = ImportReport(missing=[n for n in TASKWEB_FILES if n not in present])
    parsed: dict[str, tuple[Path, pa.Table, list[str]]] = {}
    for name in present:
        path, prov = root / name, f"taskweb:{name}"
        if name == TRANSFER_FILE:
            good, bad = _parse_transfer(con, path, prov)
        elif name == RUNS_FILE:
            good, bad = _parse_runs(con, path, prov)
        elif name == ROE_FILE:
            good, bad = _parse_pairs(con, path, ("source", "target", "score"), None)
        else:
            good, bad = _parse_pairs(con, path, ("task_a", "task_b", "score", "logp_a", "logp_b"),
                                     "json_object('logp_a', CAST(logp_a AS DOUBLE), 'logp_b', CAST(logp_b AS DOUBLE))")
        parsed[name] = (path, good, bad)
        report.skipped += bad
    if strict and report.skipped:
        shown = "\n  ".join(report.skipped[:20])
        raise AnalysisError(f"{len(report.skipped)} malformed rows, nothing imported:\n  {shown}")

    con.execute("BEGIN TRANSACTION")
    try:
        for name, (path, good, bad) in parsed.items():
            prov = f"taskweb:{name}"
            if name == TRANSFER_FILE:
                con.execute("DELETE FROM published_transfer_scores WHERE provenance = ?", [prov])
                _insert_arrow(con, "published_transfer_scores", good)
            elif name == RUNS_FILE:
                n_failed = _write_runs(con, good, prov)
                if n_failed:
                    report.notes.append(f"{n_failed} runs in {name} report a NaN metric: stored with status 'failed'")
            elif name == ROE_FILE:
                _write_selector(con, good, "roe", "roe", ROE_PARAMS, prov)
            else:
                _write_selector(con, good, "llm", "llm-similarity", LLM_PARAMS, prov)
            con.execute("INSERT OR REPLACE INTO imports VALUES (?, ?, ?, ?, ?, ?)",
                        [prov, str(path.resolve()), _sha256(path), good.num_rows, len(bad), _utcnow()])
            report.kept[name] = good.num_rows
        if RUNS_FILE in parsed:
            for (setup, target), hp in TASKWEB_PINNED_HPARAMS.items():
                con.execute("INSERT OR REPLACE INTO target_hparams VALUES (?, ?, ?, ?)",
                            [setup, target, json.dumps(hp, sort_keys=True), "taskweb:configs/t5l_finetune.json"])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return report


def import_task_sizes(con: duckdb.DuckDBPyConnection, path: str | Path, strict: bool = False) -> ImportReport:
    """Load `task,train_examples` (e.g. ../shared/data/its/task_sizes.csv) for the SIZE baseline."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"task sizes file {p} does not exist")
    prov = f"sizes:{p.name}"
    good, bad = _parse(con, p, ("task", "train_examples"),
                       [_check_name("task"), _check_int("train_examples", positive=True)], ["task"],
                       f"task, CAST(train_examples AS BIGINT) AS n_train, '{prov}' AS provenance")
    if strict and bad:
        raise AnalysisError(f"{len(bad)} malformed rows, nothing imported:\n  " + "\n  ".join(bad[:20]))
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM task_sizes WHERE provenance = ?", [prov])
        _insert_arrow(con, "task_sizes", good)
        con.execute("INSERT OR REPLACE INTO imports VALUES (?, ?, ?, ?, ?, ?)",
                    [prov, str(p.resolve()), _sha256(p), good.num_rows, len(bad), _utcnow()])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return ImportReport(kept={p.name: good.num_rows}, skipped=bad)


# -- writing: whole columns through Arrow / SQL -----------------------------------------------------
def _insert_arrow(con: duckdb.DuckDBPyConnection, table_name: str, table: pa.Table) -> None:
    with registered(con, "_incoming", table):
        cols = ", ".join(table.column_names)
        con.execute(f"INSERT OR REPLACE INTO {table_name} ({cols}) SELECT {cols} FROM _incoming")


def _write_runs(con: duckdb.DuckDBPyConnection, good: pa.Table, prov: str) -> int:
    """Insert the runs in the store's run schema; returns how many have a NaN metric (failed)."""
    with registered(con, "_incoming", good):
        con.execute("DELETE FROM runs WHERE provenance = ?", [prov])
        # run key: sha256 of everything that identifies the run in the release (deterministic)
        exprs = {
            "run_key": f"'tw-' || sha256('{prov}|' || concat_ws('|', model, adaptation, source, target, "
                       "epochs, learning_rate, batch_size, seed))[:24]",
            "experiment": "'taskweb'", "kind": "'transfer'", "setup": "setup", "model": "model",
            "adaptation": "adaptation", "source": "source", "target": "target", "seed": "seed",
            "hparams": "json_object('batch_size', batch_size, 'epochs', epochs, 'learning_rate', learning_rate)",
            "metric": "metric",
            "score": "CASE WHEN isnan(score) THEN NULL ELSE score END",
            "metrics": "metrics",
            "status": "CASE WHEN score IS NULL OR isnan(score) THEN 'failed' ELSE 'ok' END",
            "error": "CASE WHEN score IS NULL OR isnan(score) THEN 'metric is NaN' END",
            "provenance": f"'{prov}'",
            "created_at": "now()::TIMESTAMP",
        }
        names = [n for n, _, _ in RUN_COLUMNS if n in exprs]
        con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(names)}) "
                    f"SELECT {', '.join(exprs[n] for n in names)} FROM _incoming")
    return con.execute("SELECT count(*) FROM runs WHERE provenance = ? AND status = 'failed'", [prov]).fetchone()[0]


def _write_selector(con: duckdb.DuckDBPyConnection, good: pa.Table, selector: str, method: str,
                    params: dict[str, Any], prov: str) -> None:
    with registered(con, "_incoming", good):
        con.execute("DELETE FROM selector_scores WHERE selector = ?", [selector])
        con.execute("INSERT INTO selector_scores (selector, method, params, source, target, score, details, provenance) "
                    "SELECT ?, ?, ?, source, target, score, details, ? FROM _incoming",
                    [selector, method, json.dumps(params, sort_keys=True), prov])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
