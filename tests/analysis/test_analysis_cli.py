"""The `transferlab` analysis subcommands end to end: real store file, real parser, JSON output,
figures on disk, and one clear error line (exit status 2) for each kind of bad request."""

from __future__ import annotations

import json

import pytest
from analysis_support import TASKWEB, copy_db, needs_taskweb, taskweb_db

from analysis.store.results import ResultStore
from rayjobs.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@needs_taskweb
def test_import_then_evaluate_json(tmp_path, capsys):
    db = str(tmp_path / "store" / "tl.duckdb")
    code, out, err = run(capsys, "import", "taskweb", str(TASKWEB), "--db", db)
    assert code == 0 and "imported 31936 rows from runs.csv" in out and err == ""
    code, out, _ = run(capsys, "evaluate-selection", "--selector", "taskshop-roe", "--lambda", "0.7",
                       "--setup", "finetune:t5l", "--json", "--db", db)
    res = json.loads(out)
    assert code == 0
    assert round(100 * res["ndcg"], 2) == 71.54 and round(100 * res["regret_at_5"], 2) == 2.66
    assert set(res["by_category"]) == {"nli", "paraphrase", "commonsense", "sentiment", "qa", "semantics"}
    assert len(res["by_target"]) == 20 and 0 <= res["by_target"]["copa"]["ndcg"] <= 1


@needs_taskweb
def test_select_analyze_selectors_tune(tmp_path, capsys):
    db = str(copy_db(taskweb_db(), tmp_path))
    code, out, _ = run(capsys, "select", "--target", "copa", "--selector", "oracle", "--setup", "finetune:t5l",
                       "--k", "5", "--json", "--db", db)
    res = json.loads(out)
    assert code == 0 and res["top"] == ["cosmosqa", "winogrande", "scitail", "piqa", "socialiqa"]
    assert len(res["bottom"]) == len(res["random"]) == 5
    code, out, _ = run(capsys, "analyze", "commutativity", "--json", "--db", db)
    assert code == 0 and json.loads(out)["n_pairs"] == 210
    code, out, _ = run(capsys, "analyze", "transitivity", "--setup", "mean", "--thresholds", "0,0.05", "--json", "--db", db)
    rows = json.loads(out)
    assert code == 0 and [r["threshold"] for r in rows] == [0.0, 0.05] and rows[0]["n_triples"] > rows[1]["n_triples"]
    code, out, _ = run(capsys, "analyze", "matrix", "--setup", "finetune:t5l", "--json", "--db", db)
    assert code == 0 and len(json.loads(out)["matrix"]) == 22
    code, out, _ = run(capsys, "tune-lambda", "--selector", "taskshop-roe", "--setup", "finetune:t5l", "--json", "--db", db)
    assert code == 0 and json.loads(out)["best_lambda"] == 0.9
    code, out, _ = run(capsys, "compute-selector", "taskshop", "--f", "llm", "--setup", "finetune:t5l",
                       "--lambda", "0.5", "--db", db)
    assert code == 0 and "stored 484 scores as selector 'taskshop-llm[finetune:t5l,lambda=0.5]'" in out
    code, out, _ = run(capsys, "selectors", "--json", "--db", db)
    assert {"roe", "llm", "taskshop-llm[finetune:t5l,lambda=0.5]"} <= {s["name"] for s in json.loads(out)}


@needs_taskweb
def test_report_writes_readable_figures(tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, _ = run(capsys, "report", "--out", str(out_dir), "--setup", "mean", "--setup", "finetune:t5l",
                       "--db", str(taskweb_db()))
    assert code == 0
    names = {p.name for p in out_dir.iterdir()}
    assert {"index.html", "transitivity.png", "setup_similarity.png", "transfer_matrix_mean.png",
            "taskweb_graph_mean.png", "transfer_matrix_finetune_t5l.png", "taskweb_graph_finetune_t5l.png"} <= names
    for p in out_dir.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    html = (out_dir / "index.html").read_text()
    assert all(f'src="{n}"' in html for n in names if n.endswith(".png"))
    assert "124 of 210 unordered pairs share a sign" in html


@needs_taskweb
@pytest.mark.parametrize("argv, message", [
    (["evaluate-selection", "--selector", "bogus", "--setup", "finetune:t5l"], "unknown selector 'bogus'"),
    (["evaluate-selection", "--selector", "roe", "--setup", "full:tiny"], "no transfer scores for setup 'full:tiny'"),
    (["select", "--target", "nosuchtask", "--selector", "roe"], "selector 'roe' has no scores for target 'nosuchtask'"),
    (["compute-selector", "roe", "--tasks", "nosuchtask"], "no few-shot examples for task(s) nosuchtask"),
    (["analyze", "matrix", "--setup", "x:y"], "no transfer scores for setup 'x:y'"),
])
def test_bad_requests_are_one_clear_line(argv, message, tmp_path, capsys):
    db = str(copy_db(taskweb_db(), tmp_path))
    code, out, err = run(capsys, *argv, "--db", db)
    assert code == 2 and err.startswith("transferlab: error: ") and message in err and "Traceback" not in err


def test_empty_or_missing_store(tmp_path, capsys):
    code, _, err = run(capsys, "evaluate-selection", "--selector", "roe", "--setup", "finetune:t5l",
                       "--db", str(tmp_path / "none.duckdb"))
    assert code == 2 and "no results database at" in err
    assert not (tmp_path / "none.duckdb").exists()
    empty = tmp_path / "empty.duckdb"
    (tmp_path / "nothing").mkdir()
    code, _, _ = run(capsys, "import", "taskweb", str(tmp_path / "nothing"), "--db", str(empty))
    assert code == 2 and not empty.exists()  # an empty folder imports nothing and leaves no store behind
    with ResultStore(tmp_path, db_path=empty).connect():
        pass  # an empty store, as a job creates before its first run finishes
    code, _, err = run(capsys, "analyze", "transitivity", "--db", str(empty))
    assert code == 2 and "the store holds no transfer scores" in err
