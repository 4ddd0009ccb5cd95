"""`transferlab analyze matrix|commutativity|transitivity|setup-similarity`: the transfer analyses of a
setup, as text or `--json`. Reads only."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from analysis.cli.common import DB_NOTE, add_command, dump, floats, json_flag, table, thresholds_text


def _matrix(con: Any, args: argparse.Namespace) -> None:
    from analysis import transfer as an  # lazy: duckdb only when a store is opened

    m = an.transfer_matrix(con, args.setup)
    if args.json:
        dump({"setup": args.setup, "matrix": {s: {t: v for t, v in row.items() if not math.isnan(v)}
                                              for s, row in m.iterrows()}})
    else:
        print(m.round(3).to_string(na_rep="-"))


def _commutativity(con: Any, args: argparse.Namespace) -> None:
    from analysis import transfer as an  # lazy: duckdb only when a store is opened

    c = an.commutativity(con, args.setup)
    if args.json:
        dump(c)
    else:
        print(f"setup {c['setup']}: {c['n_commutative']} of {c['n_pairs']} unordered pairs share a sign "
              f"({c['n_non_commutative']} do not)")
        table(["task_a", "task_b", "score_ab", "score_ba", "commutative"], [tuple(p.values()) for p in c["pairs"]])


def _transitivity(con: Any, args: argparse.Namespace) -> None:
    from analysis import transfer as an  # lazy: duckdb only when a store is opened

    setups = None if args.setup == "all" else [args.setup]
    df = an.transitivity(con, args.thresholds, setups)
    if args.json:
        dump(df.to_dict(orient="records"))
    else:
        table(list(df.columns), [tuple(r) for r in df.itertuples(index=False)])


def _setup_similarity(con: Any, args: argparse.Namespace) -> None:
    from analysis import transfer as an  # lazy: duckdb only when a store is opened

    sim = an.setup_similarity(con)
    if args.json:
        dump({a: row.to_dict() for a, row in sim.iterrows()})
    else:
        print(sim.round(3).to_string())


_ANALYSES: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "matrix": _matrix, "commutativity": _commutativity, "transitivity": _transitivity,
    "setup-similarity": _setup_similarity,
}


def _cmd_analyze(args: argparse.Namespace) -> int:
    from analysis import transfer as an  # lazy: duckdb only when a store is opened
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    if args.setup is None:
        args.setup = "all" if args.what == "transitivity" else an.MEAN
    with read_store(args.db) as con:
        _ANALYSES[args.what](con, args)
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `analyze`."""
    from analysis.transfer import DEFAULT_THRESHOLDS  # lazy: duckdb only when a store is opened

    p = add_command(sub, default_db, "analyze", "transfer matrix, commutativity, transitivity, setup similarity",
                    _cmd_analyze, "Transfer score T = 0.5*PC + 0.5*(0.2*PM - 0.1) per (source, target, setup). "
                    + DB_NOTE)
    p.add_argument("what", choices=["matrix", "commutativity", "transitivity", "setup-similarity"],
                   help="which analysis to print")
    p.add_argument("--setup", default=None,
                   help="ADAPTATION:MODEL or 'mean' (default: 'mean', the average over setups; "
                        "for transitivity 'all', every setup and the mean)")
    p.add_argument("--thresholds", type=floats, default=list(DEFAULT_THRESHOLDS),
                   help=f"transitivity thresholds on T(A->B) and T(B->C), comma-separated "
                        f"(default: {thresholds_text()})")
    json_flag(p)
