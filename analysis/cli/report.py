"""`transferlab report`: the PNG figures (heatmap, TaskWeb graph, transitivity, ...) and index.html. Reads only."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from analysis.cli.common import DB_NOTE, add_command, floats, thresholds_text


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.reports.experiment import write_report  # lazy: matplotlib, duckdb only when `report` runs
    from analysis.store.duck import read_store  # lazy: duckdb only when `report` runs

    with read_store(args.db) as con:
        res = write_report(con, args.out, args.setup, tuple(args.thresholds), args.graph_top_k, args.graph_min_abs,
                           store_path=args.db, selection_setup=args.selection_setup)
    print(f"wrote {len(res['files'])} figures and {res['index']}")
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `report`."""
    from analysis.transfer import DEFAULT_THRESHOLDS  # lazy: duckdb, pandas: not at every CLI start

    p = add_command(sub, default_db, "report",
                    "write the figures (heatmap, TaskWeb graph, transitivity, ...) and index.html", _cmd_report,
                    "index.html shows every figure with a caption, the store's provenance (path, date, run counts) "
                    "and a selection table (NDCG / Regret@5 per selector, paper Table 2 style). " + DB_NOTE)
    p.add_argument("--out", default="reports", help="output folder (default: %(default)s)")
    p.add_argument("--setup", action="append",
                   help="setup(s) to draw, repeatable: ADAPTATION:MODEL or 'mean' (default: 'mean')")
    p.add_argument("--thresholds", type=floats, default=list(DEFAULT_THRESHOLDS),
                   help=f"transitivity thresholds, comma-separated (default: {thresholds_text()})")
    p.add_argument("--graph-top-k", type=int, default=3,
                   help="TaskWeb graph: draw each target's k strongest sources by |score| (default: %(default)s)")
    p.add_argument("--graph-min-abs", type=float, default=0.0,
                   help="TaskWeb graph: and only edges with |score| above this (default: %(default)s)")
    p.add_argument("--selection-setup",
                   help="setup of the selection table (default: the first drawn real setup, else the one with the "
                        "most transfer runs)")
