"""`transferlab import taskweb DIR | its DIR | sizes FILE`: published data into the store (the one command,
with `compute-selector`, that writes)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from analysis.cli.common import add_command, dump, json_flag


def _cmd_import(args: argparse.Namespace) -> int:
    from analysis.importers.its import import_its  # lazy: duckdb only when a store is opened
    from analysis.importers.taskweb import (  # lazy: duckdb only when a store is opened
        import_task_sizes,
        import_taskweb,
    )
    from analysis.store.duck import open_store  # lazy: duckdb only when a store is opened

    with open_store(args.db, create=True) as con:
        if args.what == "taskweb":
            report = import_taskweb(con, args.path, strict=args.strict)
        elif args.what == "its":
            report = import_its(con, args.path, strict=args.strict)
        else:
            report = import_task_sizes(con, args.path, strict=args.strict)
    if args.json:
        dump(report.to_dict())
    else:
        for name, n in report.kept.items():
            print(f"imported {n} rows from {name}")
        for name in report.missing:
            print(f"not found: {name}")
        for note in report.notes:
            print(f"note: {note}")
    for bad in report.skipped:
        print(f"skipped malformed row: {bad}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `import`."""
    p = add_command(sub, default_db, "import",
                    "import published results (TaskWeb release, Lin et al.'s ITS, task sizes) into the store",
                    _cmd_import, "Creates the store if needed; a failed import leaves no new file behind. "
                    "Re-importing a file replaces its rows (idempotent).")
    p.add_argument("what", choices=["taskweb", "its", "sizes"],
                   help="taskweb: a release folder; its: Lin et al.'s Table 7 folder; sizes: task,train_examples CSV")
    p.add_argument("path", help="the folder (e.g. ../shared/data/taskweb, ../shared/data/its) or the sizes CSV")
    p.add_argument("--strict", action="store_true", help="import nothing if any row is malformed (default: skip it)")
    json_flag(p)
