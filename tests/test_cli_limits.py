"""Bounded CLI input: `transferlab sql` has a deadline, obeys Ctrl-C and a memory limit; a config that
is an alias bomb, too big or recursive is refused (exit 2) before it is expanded.

Each case runs the real CLI (a subprocess where a signal or the wall clock matters) on a real store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from rayjobs.cli import main
from rayjobs.config import MAX_CONFIG_BYTES, ConfigError, load_yaml
from tests.conftest import REPO

ENDLESS = "SELECT sum(x) FROM range(1000000000000) t(x)"  # hours of work, constant memory


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "s.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT 1 AS a")
    con.close()
    return path


def _one_error(code: int, err: str, fragment: str) -> None:
    assert code == 2 and err.startswith("transferlab: error: ") and err.count("\n") == 1, (code, err)
    assert fragment in err and "Traceback" not in err


def test_sql_deadline_cancels_an_endless_query(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code = main(["sql", ENDLESS, "--db", str(db), "--timeout", "1.5"])
    took = time.monotonic() - start
    _one_error(code, capsys.readouterr().err, "ran past its time limit of 1.5s and was cancelled (--timeout)")
    assert took < 20  # cancelled, not run to the end (which takes hours)
    assert main(["sql", "SELECT a FROM t", "--db", str(db), "--json"]) == 0  # the store is still usable
    assert capsys.readouterr().out.strip() == '[{"a": 1}]'


def test_sql_memory_limit_is_a_clear_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sql", "SELECT list(x) FROM range(100000000) t(x)", "--db", str(db), "--memory-limit", "64MB"])
    _one_error(code, capsys.readouterr().err, "needs more than the memory limit 64MB")
    code = main(["sql", "SELECT 1", "--db", str(db), "--memory-limit", "lots"])
    _one_error(code, capsys.readouterr().err, "memory limit 'lots'")
    # the limit is DuckDB's own setting (64 MB = 61.0 MiB), and the user's SQL cannot change it (SET is refused)
    code = main(["sql", "SELECT current_setting('memory_limit') AS m", "--db", str(db), "--memory-limit", "64MB",
                 "--json"])
    assert code == 0 and capsys.readouterr().out.strip() == '[{"m": "61.0 MiB"}]'
    _one_error(main(["sql", "SET memory_limit = '100GB'", "--db", str(db)]), capsys.readouterr().err,
               "only read-only queries")


def test_sql_ctrl_c_cancels_the_query(db: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "sql", ENDLESS, "--db", str(db), "--timeout", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(5)  # imports done, the query running
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    _one_error(proc.returncode, err, "the query was cancelled (Ctrl-C)")


BOMB = """job: pairwise
name: bomb
a: &a ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
setups:
  - adaptation: {method: lora, params: {r: *h}}
"""


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 200000 YAML nodes"):
        load_yaml(path)
    assert time.monotonic() - start < 5
    r = subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(path), "--results", str(tmp_path / "res")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    _one_error(r.returncode, r.stderr, "YAML alias bomb")
    # aliases that stay small are ordinary YAML and load as before
    small = tmp_path / "small.yaml"
    small.write_text("job: pairwise\nbase: &t {epochs: 1, batch_size: 8}\ntrain: *t\nsource_train: *t\n")
    assert load_yaml(small)["train"] == {"epochs": 1, "batch_size": 8}


def test_recursive_big_and_deep_configs_are_refused(tmp_path: Path) -> None:
    rec = tmp_path / "rec.yaml"
    rec.write_text("job: pairwise\nx: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml(rec)
    big = tmp_path / "big.yaml"
    big.write_text("job: pairwise\nnote: " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"at most {MAX_CONFIG_BYTES}"):
        load_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("job: pairwise\nx: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|expands to more than"):
        load_yaml(deep)
