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

from analysis.ranking.evaluate import set_category_source
from analysis.reports.textout import print_table
from analysis.store.remote import is_uri, node_mirror
from analysis.store.results import DB_NAME, ResultStore
from analysis.store.sql_guard import open_guarded, run_guarded, store_relations
from analysis.store.status import PLAN_FILE, render, summarise
from rayjobs.engine.driver import add_job_arguments, run_from_args
from rayjobs.errors import guarded
from rayjobs.job import job_kinds
from rayjobs.models.peft_export import export_peft
from rayjobs.tasks.registry import TaskRegistry

DEFAULT_RESULTS = os.environ.get("TRANSFERLAB_RESULTS", "results")


def default_db() -> str:
    """The store a reading command uses without `--db`: $TRANSFERLAB_DB; else the newest store under
    $TRANSFERLAB_RESULTS (default ./results): `results/transferlab.duckdb`, `results/<experiment>/
    transferlab.duckdb` (where `transferlab run` writes) or `results/*.duckdb` (imports); else the
    path `results/transferlab.duckdb` (commands that create a store create it there)."""
    if os.environ.get("TRANSFERLAB_DB"):
        return os.environ["TRANSFERLAB_DB"]
    root = Path(DEFAULT_RESULTS)
    found = [p for p in [root / DB_NAME, *root.glob(f"*/{DB_NAME}"), *root.glob("*.duckdb")] if p.is_file()]
    if not found:
        return str(root / DB_NAME)
    return str(max(found, key=lambda p: p.stat().st_mtime))


def _cmd_run(args: argparse.Namespace) -> int:
    return run_from_args(args)


def _cmd_embed(args: argparse.Namespace) -> int:
    return run_from_args(args, expect="embed")


def _cmd_sql(args: argparse.Namespace) -> int:
    with open_guarded(args.db) as con:
        cols, rows = run_guarded(con, args.query, timeout_s=args.timeout or None, memory_limit=args.memory_limit)
    if args.json:
        print(json.dumps([dict(zip(cols, r, strict=False)) for r in rows], default=str))
    else:
        print_table(cols, rows)
    return 0


def _cmd_export_peft(args: argparse.Namespace) -> int:
    out = export_peft(args.run_key, args.results, args.out)
    print(f"transferlab: run {out['run_key']} exported to {out['out']} ({', '.join(out['files'])}; base model "
          f"{out['base_model'] or 'unnamed: set base_model_name_or_path'})")
    return 0


def _sql_description() -> str:
    rel = store_relations()
    return ("Run one read-only SQL query (DuckDB dialect) over the results store and print the rows.\n\n"
            "Read-only: exactly one statement, and it must be a query (SELECT, WITH, FROM, DESCRIBE, SHOW);\n"
            "the store is opened read-only and file, network and extension access are disabled.\n\n"
            + textwrap.fill("Tables: " + ", ".join(rel["table"]), 100) + "\n"
            + textwrap.fill("Views: " + ", ".join(rel["view"]), 100) + "\n"
            "(analysis/store/results.py and analysis/store/views.py define them.)\n\n"
            'Example: transferlab sql "SELECT source, target, score FROM transfer_scores ORDER BY score DESC LIMIT 5"')


def _cmd_status(args: argparse.Namespace) -> int:

    if is_uri(args.results):  # a remote results location: read it through this machine's mirror
        store = ResultStore(node_mirror(args.results), remote=args.results)
        store.sync_down(predictions=False)  # status reads the run rows and the plan only
        if store.remote.exists(PLAN_FILE):
            store.remote.get_file(PLAN_FILE, store.root / PLAN_FILE)
    else:
        store = ResultStore(args.results)
    summary = summarise(store)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print("\n".join(render(summary)))
    return 0


def _registry_categories() -> dict[str, str]:
    reg = TaskRegistry.load()
    return {name: reg.get(name).category or "other" for name in reg.names}


def _version() -> str:
    try:
        return importlib.metadata.version("transferlab")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)


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

    q = sub.add_parser("sql", help="run one read-only SQL query over the results store and print the rows",
                       description=_sql_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("query", help="one SELECT statement, quoted as one shell argument")
    q.add_argument("--db", default=default_db(), help="DuckDB results store (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print rows as a JSON list of objects (default: a text table)")
    q.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="cancel the query after this long (0: no limit; default: %(default)g); Ctrl-C cancels too")
    q.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit for the query (default: %(default)s)")
    q.set_defaults(func=_cmd_sql)

    xp_help = "export a stored LoRA run as a peft adapter folder (adapter_config.json + adapter_model.safetensors)"
    xp = sub.add_parser("export-peft", help=xp_help, description=xp_help + ", for vLLM --lora-modules, ray.serve.llm "
                        "multi-LoRA or PeftModel.from_pretrained")
    xp.add_argument("run_key", help="the run's key (transferlab sql \"SELECT run_key FROM runs\")")
    xp.add_argument("out", help="the adapter folder to write (new or empty)")
    xp.add_argument("--results", default=DEFAULT_RESULTS, help="results folder holding checkpoints/<run_key> "
                                                                "(default: %(default)s)")
    xp.set_defaults(func=_cmd_export_peft)

    st = sub.add_parser("status", help="an experiment's progress from its result files (works while it runs): "
                                       "done / failed (with errors) / remaining per stage, ETA")
    st.add_argument("--results", required=True, help="the job's results folder or URI (its --results)")
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.set_defaults(func=_cmd_status)

    for register in command_groups():
        register(sub, default_db)
    return p


#: the entry-point group through which packages add `transferlab` subcommands (pyproject.toml): the CLI
#: composes them without importing the packages above it (`serving`) or beside it (`analysis.cli`)
COMMAND_GROUP = "transferlab.commands"


def command_groups() -> list[Callable[..., None]]:
    """Every installed package's `register(subparsers, default_db)`, in entry-point name order."""
    found = sorted(importlib.metadata.entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    if not found:
        raise SystemExit(f"transferlab: error: no command groups are installed (entry points {COMMAND_GROUP!r}); "
                         "install the package: pip install -e .")
    return [ep.load() for ep in found]


def main(argv: list[str] | None = None) -> int:
    set_category_source(_registry_categories)  # analysis knows no task registry; the CLI composes the two
    args = build_parser().parse_args(argv)
    try:
        return guarded(args.func, args)
    except BrokenPipeError:  # `transferlab sql ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
