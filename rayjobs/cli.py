"""`transferlab` command line: run jobs, query and analyse the results store."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.store import DB_NAME, StoreError
from rayjobs.config import ConfigError
from rayjobs.models.loading import ModelError
from rayjobs.tasks import TaskError

DEFAULT_RESULTS = os.environ.get("TRANSFERLAB_RESULTS", "results")


def default_db() -> str:
    """The configured store: $TRANSFERLAB_DB, else <$TRANSFERLAB_RESULTS or ./results>/transferlab.duckdb."""
    return os.environ.get("TRANSFERLAB_DB") or str(Path(DEFAULT_RESULTS) / DB_NAME)


def _cmd_run(args: argparse.Namespace) -> int:
    from rayjobs.pairwise import main as pairwise_main

    argv = ["--config", args.config]
    if args.results:
        argv += ["--results", args.results]
    if args.smoke:
        argv += ["--smoke"]
    return pairwise_main(argv)


def _cmd_sql(args: argparse.Namespace) -> int:
    from analysis.sql_guard import open_guarded, run_guarded

    with open_guarded(args.db) as con:
        cols, rows = run_guarded(con, args.query)
    if args.json:
        print(json.dumps([dict(zip(cols, r, strict=False)) for r in rows], default=str))
    else:
        print_table(cols, rows)
    return 0


def _sql_description() -> str:
    from analysis.sql_guard import store_relations

    rel = store_relations()
    return ("Run one read-only SQL query (DuckDB dialect) over the results store and print the rows.\n\n"
            "Read-only: exactly one statement, and it must be a query (SELECT, WITH, FROM, DESCRIBE, SHOW);\n"
            "the store is opened read-only and file, network and extension access are disabled.\n\n"
            + textwrap.fill("Tables: " + ", ".join(rel["table"]), 100) + "\n"
            + textwrap.fill("Views: " + ", ".join(rel["view"]), 100) + "\n"
            "(analysis/store.py and analysis/views.py define them.)\n\n"
            'Example: transferlab sql "SELECT source, target, score FROM transfer_scores ORDER BY score DESC LIMIT 5"')


def print_table(cols: list[str], rows: list[tuple]) -> None:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _version() -> str:
    try:
        return importlib.metadata.version("transferlab")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pairwise-transfer experiment config on Ray")
    r.add_argument("config")
    r.add_argument("--results", help="results folder (overrides the config's results_dir)")
    r.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: check a config end to end")
    r.set_defaults(func=_cmd_run)

    from rayjobs.multitask import add_subcommand as add_multitask

    add_multitask(sub)

    q = sub.add_parser("sql", help="run one read-only SQL query over the results store and print the rows",
                       description=_sql_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("query", help="one SELECT statement, quoted as one shell argument")
    q.add_argument("--db", default=default_db(), help="DuckDB results store (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print rows as a JSON list of objects (default: a text table)")
    q.set_defaults(func=_cmd_sql)

    from analysis.commands import register

    register(sub, default_db)
    return p


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, TaskError, StoreError, ModelError,
                                                FileNotFoundError, PermissionError)


def guarded(fn: Callable[..., int | None], *args: Any) -> int:
    """Run a command; a user error becomes one clear line on stderr and exit code 2."""
    try:
        return int(fn(*args) or 0)
    except USER_ERRORS as e:
        msg = str(e).strip() or type(e).__name__
        print(f"transferlab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferlab: interrupted; finished runs are stored, re-run to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return guarded(args.func, args)
    except BrokenPipeError:  # `transferlab sql ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
