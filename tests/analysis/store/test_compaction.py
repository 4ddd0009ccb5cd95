"""Compaction of per-run files into partitioned Parquet parts survives a SIGKILL at any point: every
run exactly once, every prediction row exactly once, nothing lost (issue 20, point 2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from analysis.store import compaction, status
from analysis.store.results import ResultStore

N_RUNS, N_EX = 60, 5
KINDS = ("source", "target", "transfer")


def _key(i: int) -> str:
    return f"{i:04d}{'ab' * 8}"


def _build(root: Path, compacted_half: bool = False) -> ResultStore:
    """N_RUNS ok runs and a failed one, ingested; with `compacted_half` the first half is compacted already
    (so a compaction merges new rows into the existing run parts)."""
    store = ResultStore(root)
    for i in range(N_RUNS):
        if compacted_half and i == N_RUNS // 2:
            store.ingest(compact=False)
            assert compaction.compact(store) == N_RUNS // 2
        key = _key(i)
        store.write_predictions(key, [{"example_id": f"train:{j}", "template": "input", "task": f"t{i % 4}",
                                       "split": "eval", "gold": j % 2, "probs": [0.25, 0.75],
                                       "prediction": 1, "correct": j % 2 == 1} for j in range(N_EX)])
        store.write_result({"run_key": key, "experiment": "exp/1", "kind": KINDS[i % 3], "setup": "full:m",
                            "target": f"t{i % 4}", "seed": i, "score": i / 100})
    store.write_result({"run_key": "failedrun", "experiment": "exp/1", "kind": "transfer", "status": "failed",
                        "error": "boom"})
    store.ingest(compact=False)
    return store


def _check(store: ResultStore) -> None:
    """Every run once, everywhere a reader looks; every prediction row once."""
    keys = {_key(i) for i in range(N_RUNS)}
    with store.connect() as con:
        assert con.execute("SELECT count(*), count(DISTINCT run_key) FROM runs").fetchone() == (N_RUNS + 1,) * 2
        assert con.execute("SELECT count(*), count(DISTINCT (key, task, example_id, template)) "
                           "FROM predictions").fetchone() == (N_RUNS * N_EX,) * 2
        assert con.execute("SELECT sum(score) FROM runs WHERE status = 'ok'").fetchone()[0] == pytest.approx(
            sum(i / 100 for i in range(N_RUNS)))
    files = store.read_runs(["run_key", "status", "score"])
    assert sorted(files["run_key"].to_pylist()) == sorted([*keys, "failedrun"])
    assert store.finished_keys() == keys
    for i in (0, 17, N_RUNS - 1):
        assert store.read_result(_key(i))["score"] == pytest.approx(i / 100)
        preds = store.read_predictions(_key(i))
        assert preds.num_rows == N_EX and set(preds["task"].to_pylist()) == {f"t{i % 4}"}
    s = status.summarise(store)
    assert sum(st["done"] for st in s["stages"]) == N_RUNS


@pytest.mark.parametrize("merge", [False, True], ids=["first", "merge"])
@pytest.mark.parametrize("point", compaction.CRASH_POINTS)
def test_compactor_killed_midway_loses_and_duplicates_nothing(tmp_path, point, merge):
    store = _build(tmp_path / "store", compacted_half=merge)
    env = {**os.environ, compaction.CRASH_ENV: point, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    code = (f"from analysis.store.results import ResultStore; from analysis.store.compaction import compact; "
            f"compact(ResultStore({str(store.root)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _check(store)  # readers after the crash, before any recovery
    store.ingest(compact=False)  # the next ingest registers what the crashed compactor committed
    _check(store)
    assert compaction.compact(store) >= 0
    _check(store)
    singles = [p.name for p in store.runs_dir.glob("*.parquet") if not p.name.startswith("part-")]
    assert singles == ["failedrun.parquet"]  # a failed run keeps its file (its retry replaces it)
    assert not list(store.predictions_dir.glob("*.parquet"))
    assert not list(store.root.glob("**/.part-*.tmp"))
    assert len(list(store.runs_dir.glob("part-*.parquet"))) == len(KINDS)  # one run part per stage, merged


def test_parts_are_partitioned_and_prune(tmp_path):
    store = _build(tmp_path / "store")
    assert compaction.compact(store) == N_RUNS
    parts = sorted(p.relative_to(store.root).as_posix() for p in store.root.glob("**/part-*.parquet"))
    assert [p.rsplit("-", 2)[0] for p in parts] == [
        "predictions/experiment=exp%2F1/kind=source/part", "predictions/experiment=exp%2F1/kind=target/part",
        "predictions/experiment=exp%2F1/kind=transfer/part", "runs/part-source", "runs/part-target",
        "runs/part-transfer"]
    dataset = ds.dataset(str(store.predictions_dir), format="parquet", partitioning="hive")
    assert len(list(dataset.get_fragments(filter=ds.field("kind") == "target"))) == 1
    assert dataset.count_rows(filter=ds.field("kind") == "target") == N_RUNS // 3 * N_EX
    import duckdb

    con = duckdb.connect()
    plan = "\n".join(r[1] for r in con.execute(
        f"EXPLAIN ANALYZE SELECT count(*) FROM read_parquet('{store.predictions_dir}/**/*.parquet', "
        "hive_partitioning = true) WHERE kind = 'target'").fetchall())
    assert "Scanning Files: 1/3" in plan  # DuckDB skips the other stages' files
    assert con.execute(f"SELECT count(*) FROM read_parquet('{store.predictions_dir}/**/*.parquet', "
                       "hive_partitioning = true) WHERE kind = 'target'").fetchone()[0] == N_RUNS // 3 * N_EX


def test_ingest_compacts_when_due_and_new_runs_still_count(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_MIN_FILES", 10)
    store = _build(tmp_path / "store")  # ingested without compaction
    store.ingest()  # due: 60 ok runs in their own files
    assert compaction.file_counts(store)["runs"] == 1 + 3  # the failed run's file and one part per stage
    fresh = ResultStore(tmp_path / "copy")  # a new database over the compacted folder rebuilds the same store
    shutil.copytree(store.runs_dir, fresh.runs_dir)
    shutil.copytree(store.predictions_dir, fresh.predictions_dir)
    fresh.ingest(compact=False)
    _check(fresh)
