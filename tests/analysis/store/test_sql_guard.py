"""`transferlab sql` is read-only in fact: one query, no host files, no other stores, no settings.

Every attack is run through the real CLI against a real store file; each must end in one error
line with exit status 2 and leave nothing written or read outside the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest
from analysis_support import copy_db, needs_taskweb, taskweb_db

from analysis.store.results import ResultStore
from analysis.store.sql_guard import SqlRefused, open_guarded, run_guarded
from rayjobs.cli import main


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _store(path: Path) -> Path:
    """A store with one target-only baseline and one transfer run (so transfer_scores has a row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ResultStore(path.parent, db_path=path)
    with store.connect() as con:
        store.insert_rows([
            {"run_key": "b1", "kind": "target", "setup": "full:tiny", "model": "tiny", "adaptation": "full",
             "target": "rte", "seed": 0, "score": 0.5, "metric": "accuracy"},
            {"run_key": "x1", "kind": "transfer", "setup": "full:tiny", "model": "tiny", "adaptation": "full",
             "source": "cb", "target": "rte", "seed": 0, "score": 0.6, "metric": "accuracy",
             "baseline_run_key": "b1", "hparams": {"lr": 0.001}},
        ], con)
    return path


@pytest.fixture()
def db(tmp_path) -> Path:
    return _store(tmp_path / "store" / "tl.duckdb")


def sql(capsys, db: Path, query: str, *extra: str) -> tuple[int, str, str]:
    code = main(["sql", query, "--db", str(db), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, message: str) -> None:
    assert code == 2 and out == ""
    assert err.startswith("transferlab: error: ") and err.count("\n") == 1, err  # exactly one line
    assert message in err and "Traceback" not in err


def test_copy_to_writes_nothing(db, tmp_path, capsys):
    target = tmp_path / "leak.csv"
    assert_refused(*sql(capsys, db, f"COPY runs TO '{target}'"), "this is a COPY statement")
    assert_refused(*sql(capsys, db, f"COPY (SELECT 'x') TO '{target}' (FORMAT csv)"), "COPY statement")
    assert not target.exists()


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
])
def test_host_files_cannot_be_read(db, capsys, query):
    code, out, err = sql(capsys, db, query)
    assert_refused(code, out, err, "file system operations are disabled")
    assert "root:" not in out + err


def test_network_reads_are_refused(db, capsys):
    assert_refused(*sql(capsys, db, "SELECT * FROM read_csv('https://example.com/x.csv')"), "SQL error")


def test_attach_and_delete_leave_the_other_store_intact(db, tmp_path, capsys):
    other = _store(tmp_path / "other" / "other.duckdb")
    before = _sha(other)
    assert_refused(*sql(capsys, db, f"ATTACH '{other}' AS o (READ_ONLY false)"), "this is a ATTACH statement")
    assert_refused(*sql(capsys, db, f"ATTACH '{other}' AS o (READ_ONLY false); DELETE FROM o.runs"),
                   "the query holds 2 statements")
    assert_refused(*sql(capsys, db, "DELETE FROM runs"), "this is a DELETE statement")
    assert _sha(other) == before
    with duckdb.connect(str(other), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2


@pytest.mark.parametrize("query, message", [
    ("INSTALL httpfs", "this is a LOAD statement"),
    ("LOAD httpfs", "this is a LOAD statement"),
    ("SET enable_external_access = true", "this is a SET statement"),
    ("SET threads = 1", "this is a SET statement"),
    ("USE memory", "this is a SET statement"),
    ("PRAGMA enable_profiling", "this is a PRAGMA statement"),
    ("CALL pragma_version()", "this is a CALL statement"),
    ("EXPORT DATABASE '/tmp/transferlab-export'", "this is a EXPORT statement"),
    ("CREATE TABLE t AS SELECT 1", "this is a CREATE statement"),
    ("BEGIN TRANSACTION", "this is a TRANSACTION statement"),
    ("COPY runs TO '/tmp/transferlab-leak.csv'; SELECT 42", "the query holds 2 statements"),
    ("SELECT 1; SELECT 2", "the query holds 2 statements"),
    ("SELECT * FROM query('SET threads = 1')", "SQL error"),
    ("PIVOT runs ON kind USING count(*)", "a PIVOT needs its values listed"),  # runs statements before the query  # DuckDB's own check: query() takes one SELECT
    ("", "empty query"),
    ("   \n ", "empty query"),
    ("-- just a comment", "holds no statement (only comments?)"),
    ("/* a block comment */", "holds no statement"),
    ("SELEC 1", "SQL error: Parser Error"),
    ("SELECT * FROM no_such_table", "SQL error: Catalog Error"),
])
def test_non_queries_are_refused(db, capsys, query, message):
    assert_refused(*sql(capsys, db, query), message)
    assert not Path("/tmp/transferlab-leak.csv").exists() and not Path("/tmp/transferlab-export").exists()


def test_queries_still_work(db, capsys):
    code, out, _ = sql(capsys, db, "SELECT source, target, n_seeds, round(pc, 4) AS pc FROM transfer_scores", "--json")
    # one transfer 0.6 over a baseline 0.5: PC = (0.6 - 0.5) / 0.5
    assert code == 0 and json.loads(out) == [{"source": "cb", "target": "rte", "n_seeds": 1, "pc": 0.2}]
    code, out, _ = sql(capsys, db, "WITH r AS (FROM runs) SELECT list(run_key ORDER BY run_key) AS keys, "
                                   "json_object('n', count(*)) AS j, hparams->>'lr' AS lr FROM r "
                                   "WHERE kind = 'transfer' GROUP BY hparams", "--json")
    assert code == 0 and json.loads(out) == [{"keys": ["x1"], "j": '{"n":1}', "lr": "0.001"}]
    # statement words inside a string literal or comment are data, not statements
    code, out, _ = sql(capsys, db, "SELECT 'COPY runs TO x; ATTACH y' AS s -- ; DELETE FROM runs", "--json")
    assert code == 0 and json.loads(out) == [{"s": "COPY runs TO x; ATTACH y"}]
    for q in ("DESCRIBE runs", "SHOW TABLES", "SUMMARIZE runs", "VALUES (1, 2)", "FROM runs SELECT count(*)",
              "PIVOT runs ON kind IN ('target', 'transfer') USING count(*)"):
        code, out, err = sql(capsys, db, q)
        assert code == 0 and err == "", (q, err)


def test_configuration_is_locked_before_the_query(db, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    with open_guarded(db) as con:
        cols, rows = run_guarded(con, "SELECT current_setting('enable_external_access') AS ext, "
                                      "current_setting('lock_configuration') AS locked")
        assert cols == ["ext", "locked"] and rows == [(False, True)]
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(SqlRefused, match="file system operations are disabled"):
            run_guarded(con, "SELECT * FROM read_csv(?)", [str(secret)])


def test_reading_leaves_the_store_unchanged(db, capsys):
    before = _sha(db)
    assert sql(capsys, db, "SELECT * FROM transfer_scores")[0] == 0
    assert_refused(*sql(capsys, db, "DELETE FROM runs"), "DELETE statement")
    assert _sha(db) == before and not db.with_name(db.name + ".wal").exists()


def test_missing_store_is_not_created(tmp_path, capsys):
    missing = tmp_path / "none.duckdb"
    assert_refused(*sql(capsys, missing, "SELECT 1"), "no results database at")
    assert not missing.exists()


@needs_taskweb
def test_every_view_runs_with_external_access_off(tmp_path):
    """No view of the store reads files: each one answers under the lock on real (TaskWeb) data."""
    db = copy_db(taskweb_db(), tmp_path)
    with duckdb.connect(str(db), read_only=True) as con:
        names = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                           "AND database_name = current_database()").fetchall()]
    assert {"transfer_scores", "setup_similarity", "target_performance", "multitask_table"} <= set(names)
    with open_guarded(db) as con:
        counts = {v: run_guarded(con, f'SELECT count(*) FROM "{v}"')[1][0][0] for v in names}
    assert counts["transfer_scores"] == 3528 and counts["setup_transfers"] > 0
