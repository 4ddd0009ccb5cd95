"""Help that explains itself: every analysis subcommand and `sql` has a description, every argument
and option a help text that states its default, `sql --help` names every table and view of a real
store and says it is read-only, and `transferlab --version` prints the installed version."""

from __future__ import annotations

import argparse
import importlib.metadata

import duckdb
import pytest

from analysis.store.results import ResultStore
from rayjobs.cli import build_parser, main

# the subcommands this part of the CLI owns (`run` and `multitask` are documented with the jobs)
COMMANDS = ["sql", "import", "analyze", "selectors", "compute-selector", "compare-selectors", "tune-lambda",
            "evaluate-selection", "select", "report"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_argument_has_help_with_its_default(name):
    sub = _subparsers()[name]
    assert sub.description and len(sub.description) > 30
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings or [action.dest]
        assert action.help and len(action.help) > 10, f"{name} {label}: no help"
        has_default = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if has_default:
            assert "default" in action.help, f"{name} {label}: default {action.default!r} not stated"
    rendered = sub.format_help()
    assert "%(default)" not in rendered


def test_help_prints_and_exits_zero(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: transferlab " + name in capsys.readouterr().out


def test_sql_help_lists_every_table_and_view(tmp_path, capsys):
    store = ResultStore(tmp_path, db_path=tmp_path / "s.duckdb")
    with store.connect():
        pass
    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT internal").fetchall()]
        views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
    assert "runs" in tables and "transfer_scores" in views
    with pytest.raises(SystemExit):
        main(["sql", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "read-only" in text.lower()
    listed = {w.strip(",.") for w in text.split()}
    assert not [n for n in tables + views if n not in listed], "sql --help misses relations"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"transferlab {importlib.metadata.version('transferlab')}"
