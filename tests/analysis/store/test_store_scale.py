"""The store's cost is linear in new work (issue 20), its predictions are keyed by task and old stores
migrate once (issue 21 item 3), and every run row records its software stack (issue 21 item 11)."""

from __future__ import annotations

import json

import duckdb
import pytest

from analysis.store import status
from analysis.store.results import ResultStore
from analysis.store.schema import PREDICTION_COLUMNS, RUN_COLUMNS, SCHEMA_VERSION


def _write_run(store: ResultStore, key: str, n_examples: int = 3, task: str = "rte", status_: str = "ok",
               stack: dict | None = None, kind: str = "transfer") -> None:
    rows = [{"example_id": f"validation:{i}", "template": "input", "task": task, "split": "eval", "gold": i % 2,
             "probs": [0.3, 0.7], "prediction": 1, "correct": i % 2 == 1} for i in range(n_examples)]
    if status_ == "ok":
        store.write_predictions(key, rows)
    store.write_result({"run_key": key, "experiment": "e", "kind": kind, "setup": "full:m", "target": task,
                        "seed": 1, "score": 0.5, "status": status_, "stack": stack})


def _db_rows(store: ResultStore, sql: str) -> list[tuple]:
    with store.connect() as con:
        return con.execute(sql).fetchall()


def test_ingest_reads_only_new_files(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    for i in range(5):
        _write_run(store, f"k{i}")
    assert store.ingest(compact=False) == 5
    assert store.ingest(compact=False) == 0  # nothing new: nothing read
    read: list[list[str]] = []
    import analysis.store.results as st

    real = st._read_with_names

    def spy(root, names, schema):
        read.append(list(names))
        return real(root, names, schema)

    monkeypatch.setattr(st, "_read_with_names", spy)
    _write_run(store, "k5")
    assert store.ingest(compact=False) == 1
    assert read == [["runs/k5.parquet"], ["predictions/k5.parquet"]]
    assert _db_rows(store, "SELECT count(*), count(DISTINCT run_key) FROM runs") == [(6, 6)]
    assert _db_rows(store, "SELECT count(*) FROM predictions") == [(18,)]
    read.clear()
    assert store.finished_keys() == {f"k{i}" for i in range(6)}
    assert read == []  # answered from the store's record: no file re-read


def test_finished_keys_sees_new_failed_and_removed_runs(tmp_path):
    store = ResultStore(tmp_path)
    _write_run(store, "a")
    _write_run(store, "b", status_="failed")
    store.ingest(compact=False)
    assert store.finished_keys() == {"a"}
    _write_run(store, "b")  # the retry succeeds: same file name, new content
    _write_run(store, "c")  # new since the ingest
    assert store.finished_keys() == {"a", "b", "c"}
    store.result_path("a").unlink()  # a result removed by hand is no longer stored: a re-run trains it
    assert store.finished_keys() == {"b", "c"}


def test_predictions_wait_for_their_run_row(tmp_path):
    """The run row is the commit marker: predictions of a run without one are not ingested yet."""
    store = ResultStore(tmp_path)
    store.write_predictions("x", [{"example_id": "1", "template": "input", "task": "rte"}])
    store.ingest(compact=False)
    assert _db_rows(store, "SELECT count(*) FROM predictions") == [(0,)]
    store.write_result({"run_key": "x", "kind": "score"})
    store.ingest(compact=False)
    assert _db_rows(store, "SELECT key, task FROM predictions") == [("x", "rte")]


def test_two_tasks_sharing_example_ids_keep_both(tmp_path):
    """A multi-task run over hub-loaded tasks (ids `split:i`): both tasks' rows are stored."""
    store = ResultStore(tmp_path)
    rows = [{"example_id": f"validation:{i}", "template": "input", "task": t, "split": "eval", "gold": g,
             "probs": [0.9, 0.1] if g == 0 else [0.2, 0.8], "prediction": g, "correct": True}
            for t, g in (("rte", 0), ("cb", 1)) for i in range(4)]
    store.write_predictions("mtl1", rows)
    store.write_result({"run_key": "mtl1", "kind": "mtl", "sources": ["rte", "cb"]})
    store.ingest(compact=False)
    got = _db_rows(store, "SELECT task, count(*), min(gold), max(gold) FROM predictions GROUP BY task ORDER BY task")
    assert got == [("cb", 4, 1, 1), ("rte", 4, 0, 0)]


OLD_SQL = (  # the schema before version 3 (no runs.stack, predictions keyed without the task)
    f"CREATE TABLE runs ({', '.join(f'{n} {t}' for n, t, _ in RUN_COLUMNS if n != 'stack')});"
    f"CREATE TABLE predictions ({', '.join(f'{n} {t}' for n, t, _ in PREDICTION_COLUMNS)}, "
    "PRIMARY KEY (key, example_id, template));"
    "CREATE VIEW old_view AS SELECT key, count(*) AS n FROM predictions GROUP BY key;")  # views over it, as then


def test_old_store_is_migrated_once(tmp_path):
    store = ResultStore(tmp_path)
    _write_run(store, "old1", n_examples=4)
    con = duckdb.connect(str(store.db_path))
    con.execute(OLD_SQL)
    con.execute("INSERT INTO runs (run_key, kind, status, score) VALUES ('old1', 'transfer', 'ok', 0.5)")
    con.execute("INSERT INTO predictions (key, example_id, template, task) "
                "SELECT 'old1', 'validation:' || i, 'input', 'rte' FROM range(4) t(i)")
    con.close()
    with pytest.raises(duckdb.ConstraintException):  # the old key: a second task's row with the same id collides
        c = duckdb.connect(str(store.db_path))
        try:
            c.execute("INSERT INTO predictions (key, example_id, template, task) VALUES ('old1', 'validation:0', "
                      "'input', 'cb')")
        finally:
            c.close()

    # two tasks sharing ids, written after the upgrade
    rows = [{"example_id": "validation:0", "template": "input", "task": t, "split": "eval"} for t in ("rte", "cb")]
    store.write_predictions("new1", rows)
    store.write_result({"run_key": "new1", "kind": "mtl"})
    store.ingest(compact=False)
    assert _db_rows(store, "SELECT value FROM store_meta WHERE name = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _db_rows(store, "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'predictions' "
                           "AND constraint_type = 'PRIMARY KEY'") == [(0,)]
    # old rows kept once (the old run's prediction file on disk is not ingested a second time), new ones added
    assert _db_rows(store, "SELECT key, task, count(*) FROM predictions GROUP BY ALL ORDER BY ALL") == [
        ("new1", "cb", 1), ("new1", "rte", 1), ("old1", "rte", 4)]
    assert "stack" in [r[0] for r in _db_rows(store, "DESCRIBE runs")]
    store.ingest(compact=False)  # a second open: no second migration, nothing duplicated
    assert _db_rows(store, "SELECT count(*) FROM predictions") == [(6,)]


def test_stack_recorded_and_mixed_stacks_warned(tmp_path):
    from rayjobs.engine import stack as stk

    described = stk.describe()
    assert set(described) == {"python", "torch", "transformers", "peft", "deepspeed", "ray", "device"}
    import importlib.metadata
    import platform

    assert described["python"] == platform.python_version()
    assert described["ray"] == importlib.metadata.version("ray")
    store = ResultStore(tmp_path)
    _write_run(store, "a", stack=described)
    _write_run(store, "b", stack=described)
    s = status.summarise(store)
    assert s["stacks"] == [] and not any("WARNING" in line for line in status.render(s))
    _write_run(store, "c", stack={**described, "torch": "0.0.1-other"})
    s = status.summarise(store)
    assert s["stacks"] == [{"torch": described["torch"], "runs": 2}, {"torch": "0.0.1-other", "runs": 1}]
    warning = [line for line in status.render(s) if line.startswith("WARNING")]
    assert len(warning) == 1 and "2 different software stacks" in warning[0] and "0.0.1-other (1 runs)" in warning[0]
    store.ingest(compact=False)
    stored = _db_rows(store, "SELECT run_key, stack FROM runs ORDER BY run_key")
    assert json.loads(stored[2][1])["torch"] == "0.0.1-other"

    from analysis.reports.experiment import provenance
    from analysis.store.duck import read_store

    with read_store(store.db_path) as con:
        assert provenance(con, store.db_path)["stacks"] == s["stacks"]
