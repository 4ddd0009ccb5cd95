"""Importing the published TaskWeb release: counts, provenance, scores, idempotency, bad rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from analysis_support import TASKWEB, needs_taskweb, taskweb_db
from loop_reference import run_metric

from analysis.errors import AnalysisError
from analysis.importers.taskweb import import_task_sizes, import_taskweb
from analysis.store.duck import open_store


@needs_taskweb
def test_counts_and_provenance():
    with open_store(taskweb_db()) as con:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        assert q("SELECT provenance, count(*) FROM published_transfer_scores GROUP BY ALL") == [
            ("taskweb:transfer_scores.csv", 3528)]
        assert q("SELECT provenance, status, count(*) FROM runs GROUP BY ALL ORDER BY status") == [
            ("taskweb:runs.csv", "failed", 8), ("taskweb:runs.csv", "ok", 31928)]
        assert q("SELECT selector, provenance, count(*) FROM selector_scores WHERE selector IN ('roe', 'llm') "
                 "GROUP BY ALL ORDER BY 1") == [("llm", "taskweb:llm_similarity_davinci003.csv", 506),
                                                ("roe", "taskweb:roe_scores_minilm_dot32.csv", 484)]
        # 7 setups + the published average, 22 sources x 21 targets each
        assert q("SELECT count(DISTINCT setup), count(*) FROM transfer_scores") == [(8, 3528)]
        assert q("SELECT count(*) FROM imports WHERE provenance LIKE 'taskweb:%' AND length(sha256) = 64") == [(4,)]


@needs_taskweb
def test_run_scores_match_taskweb_metric_definition():
    """Every imported run's p equals TaskWeb's load.py rule applied to the raw metrics JSON."""
    expected = {}
    with open(TASKWEB / "runs.csv", newline="") as f:
        for r in csv.DictReader(f):
            key = (f"{r['adaptation']}:{r['model']}", r["source"], r["target"], int(r["seed"]),
                   int(r["batch_size"]), int(r["epochs"]), float(r["learning_rate"]))
            expected[key] = run_metric(r["target"], json.loads(r["metrics_json"]))
    with open_store(taskweb_db()) as con:
        rows = con.execute("""SELECT setup, source, target, seed, CAST(hparams->>'batch_size' AS INT),
                                     CAST(hparams->>'epochs' AS INT), CAST(hparams->>'learning_rate' AS DOUBLE),
                                     score, status FROM runs""").fetchall()
    assert len(rows) == len(expected) == 31936
    for *key, score, status in rows:
        want = expected[tuple(key)]
        if math.isnan(want):
            assert status == "failed" and score is None
        else:
            assert status == "ok" and score == pytest.approx(want, abs=1e-12)


@needs_taskweb
def test_published_average_is_mean_of_setups():
    """The release's 'all:all' rows equal our 'mean' pseudo-setup (mean over the 7 setups)."""
    with open_store(taskweb_db()) as con:
        diff = con.execute("""SELECT max(abs(a.score - m.score)), count(*) FROM transfer_scores a
                              JOIN analysis_transfers m ON m.setup = 'mean' AND m.source = a.source
                                   AND m.target = a.target WHERE a.setup = 'all:all'""").fetchone()
    assert diff[1] == 441 and diff[0] < 1e-12


@needs_taskweb
def test_reimport_is_idempotent(tmp_path):
    db = tmp_path / "s.duckdb"
    # order-independent content digests (float sums would vary with parallel aggregation order)
    snapshot = """SELECT (SELECT count(*) FROM runs), (SELECT sum(hash(run_key, score, status, hparams)) FROM runs),
                         (SELECT count(*) FROM published_transfer_scores),
                         (SELECT sum(hash(model, adaptation, source, target, pc, pm)) FROM published_transfer_scores),
                         (SELECT count(*) FROM selector_scores), (SELECT sum(hash(selector, source, target, score)) FROM selector_scores),
                         (SELECT list(run_key ORDER BY run_key)[1:3] FROM runs)"""
    with open_store(db, create=True) as con:
        first = import_taskweb(con, TASKWEB)
        before = con.execute(snapshot).fetchone()
        second = import_taskweb(con, TASKWEB)
        after = con.execute(snapshot).fetchone()
    assert before == after
    assert first.kept == second.kept and not first.skipped


def _write(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_malformed_rows_reported_with_file_and_line(tmp_path):
    d = tmp_path / "tw"
    d.mkdir()
    ts = _write(d / "transfer_scores.csv", "source,target,model,adaptation,pc,pm", [
        "cb,rte,t5l,finetune,0.1,0.5",        # line 2 ok
        "cb,rte,t5l,finetune,0.2,0.5",        # 3 duplicate of 2
        "copa,rte,t5l,finetune,abc,0.5",      # 4 pc not a number
        "wic,rte,t5l,finetune,0.1,1.5",       # 5 pm above 1
        "wsc,rte,t5l,finetune,0.1",           # 6 too few fields
        ",rte,t5l,finetune,0.1,0.5",          # 7 empty source
        "rte,cb,t5l,finetune,-0.05,0.25",     # 8 ok
    ])
    runs = _write(d / "runs.csv", "source,target,model,adaptation,epochs,learning_rate,batch_size,seed,metrics_json", [
        'cb,rte,t5l,finetune,5,1e-4,16,10,"{""eval_accuracy"": 71.5}"',       # 2 ok, percent
        'cb,rte,t5l,finetune,5,1e-4,16,x,"{""eval_accuracy"": 0.7}"',         # 3 seed not int
        'cb,rte,t5l,finetune,5,1e-4,16,15,"{not json"',                        # 4 bad JSON
        'cb,rte,t5l,finetune,5,1e-4,16,20,"{""eval_f1"": 0.7}"',              # 5 lacks accuracy
        'rte,mrpc,t5l,finetune,5,1e-4,16,10,"{""eval_accuracy"": 0.8, ""eval_f1"": 0.6}"',  # 6 ok: (0.8+0.6)/2
        'rte,cb,t5l,finetune,5,1e-4,16,10,"{""eval_accuracy"": ""high""}"',   # 7 not a number
    ])
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        rep = import_taskweb(con, d)
        assert rep.kept == {"transfer_scores.csv": 2, "runs.csv": 2}
        assert rep.missing == ["roe_scores_minilm_dot32.csv", "llm_similarity_davinci003.csv"]
        got = {s.split(": ", 1)[0]: s.split(": ", 1)[1] for s in rep.skipped}
        assert got == {
            f"{ts}:3": "duplicate of line 2",
            f"{ts}:4": "pc is not a number: abc",
            f"{ts}:5": "pm=1.5 above 1.0",
            f"{ts}:6": "expected 6 fields, got 5",
            f"{ts}:7": "empty source",
            f"{runs}:3": "seed is not an integer: x",
            f"{runs}:4": "metrics_json is not JSON",
            f"{runs}:5": "metrics_json has none of the target's metrics (eval_accuracy)",
            f"{runs}:7": "eval_accuracy is not a number",
        }
        scores = dict(con.execute("SELECT target, score FROM runs ORDER BY target").fetchall())
        assert scores == {"rte": pytest.approx(0.715), "mrpc": pytest.approx(0.7)}


def test_strict_import_writes_nothing(tmp_path):
    d = tmp_path / "tw"
    d.mkdir()
    _write(d / "transfer_scores.csv", "source,target,model,adaptation,pc,pm",
           ["cb,rte,t5l,finetune,0.1,0.5", "copa,rte,t5l,finetune,nan,0.5"])
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        with pytest.raises(AnalysisError, match=r"1 malformed rows, nothing imported:\n  .*transfer_scores.csv:3: pc is not finite"):
            import_taskweb(con, d, strict=True)
        assert con.execute("SELECT count(*) FROM published_transfer_scores").fetchone() == (0,)


def test_bad_header_and_missing_folder(tmp_path):
    d = tmp_path / "tw"
    d.mkdir()
    _write(d / "transfer_scores.csv", "source,target,model,pc,pm", ["cb,rte,t5l,0.1,0.5"])
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        with pytest.raises(AnalysisError, match=r"transfer_scores.csv:1: header lacks column\(s\) adaptation"):
            import_taskweb(con, d)
        with pytest.raises(AnalysisError, match="does not exist"):
            import_taskweb(con, tmp_path / "nope")
        (d / "transfer_scores.csv").unlink()
        with pytest.raises(AnalysisError, match="no TaskWeb files"):
            import_taskweb(con, d)


def test_task_sizes_import(tmp_path):
    f = _write(tmp_path / "sizes.csv", "task,train_examples", ["cb,250", "copa,400", "rte,-3", "wic,x"])
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        rep = import_task_sizes(con, f)
        assert rep.kept == {"sizes.csv": 2}
        assert [s.split(": ", 1)[1] for s in rep.skipped] == ["train_examples must be positive",
                                                               "train_examples is not an integer: x"]
        assert con.execute("SELECT task, n_train FROM task_sizes ORDER BY task").fetchall() == [("cb", 250), ("copa", 400)]
