"""`transferlab evaluate-selection | select`: NDCG / Regret@k of a selector, leave-one-out over targets
(paper 000 Table 2; `--selector all` side by side), and the top / bottom / random k sources of a target
for multi-task training. Reads only."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from analysis.cli.common import (
    DB_NOTE,
    add_command,
    check_k,
    dump,
    json_flag,
    names,
    pct,
    require_scores,
    table,
)
from analysis.errors import AnalysisError


def _families(text: str) -> list[str]:
    from analysis.ranking.families import FAMILIES, RENAMED  # lazy: duckdb only when a store is opened

    given = names(text)
    unknown = [n for n in given if n not in FAMILIES]
    if unknown or not given:
        hint = "".join(f"; {n}: {RENAMED[n]}" for n in unknown if n in RENAMED)
        raise argparse.ArgumentTypeError(f"unknown metric family {', '.join(unknown) or repr(text)} "
                                         f"(choose from {', '.join(FAMILIES)}){hint}")
    return given


def _cmd_compare_all(args: argparse.Namespace) -> int:
    from analysis.ranking.comparison import (  # lazy: duckdb only when a store is opened
        compare_all,
        table_rows,
        winner_sentences,
    )
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    if args.targets or args.categories or args.lam is not None:
        raise AnalysisError("--selector all evaluates every target with each selector's defaults: "
                            "drop --targets / --categories / --lambda")
    with read_store(args.db) as con:
        res = compare_all(con, args.setup, args.metrics, args.k, args.seed, pool=args.pool)
    res["summary"] = winner_sentences(res)
    if args.json:
        dump(res)
        return 0
    pool = f", pool {res['pool']}" if res["pool"] else ""
    ks = ", ".join(f"{f} k={k}" for f, k in res["k"].items())
    print(f"every selector on {res['setup']}{pool} ({ks}); metric families side by side, never mixed")
    cols, rows, reasons = table_rows(res)
    table(cols, rows)
    for line in res["summary"]:
        print(line)
    for r in reasons:
        print(f"n/a {r}")
    return 0


def _print_evaluation(res: dict, k: int, regret: bool) -> None:
    """One selector's evaluation as text: per category and overall NDCG, Regret@k (if the family has it), rho."""
    rk = f"regret_at_{k}"
    lam = f", lambda={res['lambda']:g}" if res["lambda"] is not None else ""
    pool = f", pool {res['pool']}" if res["pool"] else ""
    print(f"selector {res['selector']} (stored as {res['stored_as']}) on {res['setup']}{lam}{pool}, "
          f"{res['metric_family']} metrics")

    def rho(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def cells(v: dict) -> tuple:
        return (pct(v["ndcg"]), *([pct(v[rk])] if regret else []), rho(v["rho"]))
    rows = [(c, v["n_targets"], *cells(v)) for c, v in res["by_category"].items()]
    rows.append(("overall", len(res["by_target"]), *cells(res)))
    table(["category", "targets", "NDCG %", *([f"Regret@{k} %"] if regret else []), "rho"], rows)
    for note in res["notes"]:
        print(f"note: {note}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from analysis.ranking.evaluate import (  # lazy: duckdb only when a store is opened
        evaluate_selection,
        evaluation_plan,
        load_categories,
    )
    from analysis.ranking.families import get_family  # lazy: duckdb only when a store is opened
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    if args.selector == "all":
        return _cmd_compare_all(args)
    if len(args.metrics) != 1:
        raise AnalysisError("several metric families go with --selector all only; name one")
    args.metrics = args.metrics[0]
    if args.k is None:  # the family's paper's k (taskweb 5, lin 1)
        args.k = get_family(args.metrics).default_k
    cats = load_categories(args.categories) if args.categories else None
    with read_store(args.db) as con:
        targets, _ = evaluation_plan(con, args.setup, args.targets, cats)
        check_k(con, args.setup, targets, args.k)
        require_scores(con, args.selector, args.db)
        res = evaluate_selection(con, args.selector, args.setup, args.lam, args.k, args.targets, cats, args.seed,
                                 metrics=args.metrics, pool=args.pool)
    if args.json:
        dump(res)
        return 0
    _print_evaluation(res, args.k, get_family(args.metrics).regret)  # vu defines no regret: no column of dashes
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from analysis.selection.source_sets import select_sources  # lazy: duckdb only when a store is opened
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    with read_store(args.db) as con:
        require_scores(con, args.selector, args.db)
        res = select_sources(con, args.target, args.selector, args.k, args.setup, args.lam, args.seed)
    if args.json:
        dump(res)
    else:
        for part in ("top", "bottom", "random"):
            print(f"{part}-{args.k}: {', '.join(res[part])}")
    return 0


# -- parsers ---------------------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "evaluate-selection", "NDCG and Regret@k of a selector, leave-one-out over targets",
                    _cmd_evaluate, "Paper 000 Table 2: per target, rank the candidate sources by the selector and "
                    "compare with the ranking by transfer score; per category and overall means. " + DB_NOTE)
    p.add_argument("--selector", required=True,
                   help="roe, llm, taskshop-roe, taskshop-llm, taskshop-<stored>, random, size, oracle, "
                        "or a stored name; 'all': every selector that applies, one table (required)")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL, e.g. finetune:t5l (required)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="TaskShop lambda (default: 0.7)")
    p.add_argument("--k", type=int, default=None,
                   help="k of Regret@k, at most the number of candidate sources (default: the metric family's "
                        "paper's: taskweb 5, lin and lin-per-seed 1)")
    p.add_argument("--targets", type=names, default=None,
                   help="targets to evaluate, comma-separated (default: Table 2's 20 for TaskWeb data, else all)")
    p.add_argument("--categories", help="JSON/YAML category map {category: [tasks]} (default: Table 2's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selector (default: %(default)s)")
    p.add_argument("--metrics", type=_families, default=["taskweb"],
                   help="metric family: taskweb (Kim et al.), lin (Lin et al.: seed-averaged scores), lin-per-seed "
                        "(ranked per seed, then averaged), vu (rho and NDCG of Vu et al., as FUTE reports); with "
                        "--selector all, several, comma-separated, side by side (default: taskweb)")
    p.add_argument("--pool", help="rank only the sources of this pool (table source_pools, e.g. its-qa) "
                                  "(default: every candidate)")
    json_flag(p)


def _add_select(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "select", "top-k, bottom-k and random-k sources for a target (multi-task sets)",
                    _cmd_select, "Ties keep the alphabetical order of source names; the random set depends only on "
                    "the candidates and the seed. " + DB_NOTE)
    p.add_argument("--target", required=True, help="the target task (required)")
    p.add_argument("--selector", required=True, help="any selector name, or 'oracle' (the stored transfers) (required)")
    p.add_argument("--k", type=int, default=5, help="size of each set (default: %(default)s)")
    p.add_argument("--setup", help="transfer setup for taskshop-* and oracle (default: none; required for them)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="TaskShop lambda (default: 0.7)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random-k set (and the random selector) (default: %(default)s)")
    json_flag(p)


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `evaluate-selection` and `select`, in that order."""
    _add_evaluate(sub, default_db)
    _add_select(sub, default_db)
