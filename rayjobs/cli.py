"""`transferlab` command line: run jobs, query and analyse the results store."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.store import DB_NAME, ResultStore, StoreError
from analysis.textout import print_table
from rayjobs.config import ConfigError
from rayjobs.models.loading import ModelError
from rayjobs.tasks import TaskError

DEFAULT_RESULTS = os.environ.get("TRANSFERLAB_RESULTS", "results")


def default_db() -> str:
    """The configured store: $TRANSFERLAB_DB, else <$TRANSFERLAB_RESULTS or ./results>/transferlab.duckdb."""
    return os.environ.get("TRANSFERLAB_DB") or str(Path(DEFAULT_RESULTS) / DB_NAME)


def _cmd_run(args: argparse.Namespace) -> int:
    from rayjobs.driver import run_from_args

    return run_from_args(args)


def _cmd_embed(args: argparse.Namespace) -> int:
    from rayjobs.driver import run_from_args

    return run_from_args(args, expect="embed")


def _cmd_sql(args: argparse.Namespace) -> int:
    db = Path(args.db)
    store = ResultStore(db.parent, db_path=db)
    with store.connect(read_only=True) as con:
        try:
            cur = con.execute(args.query)
        except Exception as e:  # duckdb raises many error types; all are user errors here
            raise StoreError(f"SQL error: {e}") from None
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall()
    if args.json:
        print(json.dumps([dict(zip(cols, r, strict=False)) for r in rows], default=str))
    else:
        print_table(cols, rows)
    return 0


def _registry_categories() -> dict[str, str]:
    from rayjobs.tasks import TaskRegistry

    reg = TaskRegistry.load()
    return {name: reg.get(name).category or "other" for name in reg.names}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    from rayjobs.driver import add_job_arguments
    from rayjobs.job import job_kinds

    run_help = (f"run a job config on Ray (any kind: {', '.join(job_kinds())}; the config's `job:` names it); "
                "runs already stored are skipped, so re-running resumes")
    r = sub.add_parser("run", help=run_help, description=run_help)
    add_job_arguments(r)
    r.set_defaults(func=_cmd_run)

    embed_help = ("compute FUTE task embeddings (a `job: embed` config, paper 004): DTEs and MTEs in one space per "
                  "surrogate, as trials with run keys; re-running resumes (the same as `run`)")
    e = sub.add_parser("embed", help=embed_help, description=embed_help)
    add_job_arguments(e)
    e.set_defaults(func=_cmd_embed)

    q = sub.add_parser("sql", help="run SQL over the results store and print the rows")
    q.add_argument("query")
    q.add_argument("--db", default=default_db(), help="DuckDB file (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print rows as a JSON list of objects")
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
    from analysis.ranking import set_category_source

    set_category_source(_registry_categories)  # analysis knows no task registry; the CLI composes the two
    args = build_parser().parse_args(argv)
    try:
        return guarded(args.func, args)
    except BrokenPipeError:  # `transferlab sql ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
