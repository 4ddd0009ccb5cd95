"""Reading commands do not write: the store file is byte-identical after each of them (even those
that materialise derived selectors such as random, oracle and taskshop-*), and a failed import
leaves no file behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest
from analysis_support import TASKWEB, copy_db, needs_taskweb, pristine_taskweb_db

from analysis.store.duck import read_store
from rayjobs.cli import main

READS = [
    ["analyze", "matrix", "--setup", "finetune:t5l"],
    ["analyze", "commutativity"],
    ["analyze", "transitivity", "--thresholds", "0,0.05"],
    ["analyze", "setup-similarity"],
    ["selectors"],
    ["compare-selectors", "roe", "llm"],
    ["tune-lambda", "--selector", "taskshop-roe", "--setup", "finetune:t5l", "--grid", "0.5,0.7"],
    ["evaluate-selection", "--selector", "taskshop-roe", "--setup", "finetune:t5l"],
    ["evaluate-selection", "--selector", "random", "--setup", "finetune:t5l"],
    ["evaluate-selection", "--selector", "oracle", "--setup", "finetune:t5l"],
    ["select", "--target", "copa", "--selector", "taskshop-llm", "--setup", "finetune:t5l"],
    ["select", "--target", "copa", "--selector", "random"],
    ["select", "--target", "copa", "--selector", "oracle", "--setup", "finetune:t5l"],
    ["sql", "SELECT count(*) FROM transfer_scores"],
]


def _state(folder: Path) -> dict[str, str]:
    """sha256 of every file in the store's folder (the DuckDB file, and any WAL it might grow)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    return copy_db(pristine_taskweb_db(), folder)


@needs_taskweb
@pytest.mark.parametrize("argv", READS, ids=[" ".join(a[:2]) for a in READS])
def test_read_leaves_store_byte_identical(store, argv, capsys):
    before = _state(store.parent)
    code = main([*argv, "--db", str(store)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert _state(store.parent) == before


@needs_taskweb
def test_report_leaves_store_byte_identical(store, tmp_path, capsys):
    before = _state(store.parent)
    assert main(["report", "--out", str(tmp_path / "rep"), "--db", str(store)]) == 0
    capsys.readouterr()
    assert _state(store.parent) == before


@needs_taskweb
def test_derived_selectors_are_computed_but_not_kept(store, capsys):
    """random and taskshop-* are materialised in memory for the read: evaluating them works, twice the
    same, and afterwards the store still lists only the imported selectors."""
    runs = []
    for _ in range(2):
        assert main(["evaluate-selection", "--selector", "random", "--setup", "finetune:t5l", "--json",
                     "--db", str(store)]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["stored_as"] == "random[seed=0]" and runs[0]["ndcg"] == runs[1]["ndcg"]
    assert main(["selectors", "--json", "--db", str(store)]) == 0
    assert sorted(s["name"] for s in json.loads(capsys.readouterr().out)) == ["llm", "roe"]


@needs_taskweb
def test_read_store_copies_rows_and_current_views(store):
    with read_store(store) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 31936  # rows of TaskWeb's runs.csv
        assert con.execute("SELECT count(*) FROM selector_scores").fetchone()[0] == 484 + 506
        con.execute("DELETE FROM runs")  # writes go to memory only
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    with read_store(store) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 31936


def test_failed_import_leaves_no_file(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    db = tmp_path / "new" / "deeper" / "tl.duckdb"
    assert main(["import", "taskweb", str(tmp_path / "nothing"), "--db", str(db)]) == 2
    assert main(["import", "sizes", str(tmp_path / "no-such.csv"), "--db", str(db)]) == 2
    bad = tmp_path / "sizes.csv"
    bad.write_text("")
    assert main(["import", "sizes", str(bad), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("transferlab: error: ") == 3
    assert not db.exists() and not (tmp_path / "new").exists()  # nor the folders made for it


@needs_taskweb
def test_failed_import_keeps_an_existing_store(tmp_path, capsys):
    db = copy_db(pristine_taskweb_db(), tmp_path)
    (tmp_path / "nothing").mkdir()
    assert main(["import", "taskweb", str(tmp_path / "nothing"), "--db", str(db)]) == 2
    assert db.exists() and main(["sql", "SELECT count(*) AS n FROM runs", "--json", "--db", str(db)]) == 0
    assert "31936" in capsys.readouterr().out


@needs_taskweb
def test_successful_import_creates_the_store(tmp_path, capsys):
    db = tmp_path / "new" / "tl.duckdb"
    assert main(["import", "taskweb", str(TASKWEB), "--db", str(db)]) == 0
    capsys.readouterr()
    assert db.is_file()


@needs_taskweb
def test_read_store_takes_the_columns_both_versions_know(tmp_path):
    """A store from another version (a column missing here, an extra one there) still reads."""
    db = copy_db(pristine_taskweb_db(), tmp_path)
    with duckdb.connect(str(db)) as con:
        con.execute("ALTER TABLE selector_scores DROP COLUMN details")
        con.execute("ALTER TABLE runs ADD COLUMN from_the_future INTEGER")
    with read_store(db) as con:
        assert con.execute("SELECT count(*), count(details) FROM selector_scores").fetchone() == (990, 0)
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 31936
