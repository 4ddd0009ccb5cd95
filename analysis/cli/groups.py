"""`transferlab groups`: PVI task groups for multi-task learning (t-test / ANOVA within one setup); stores
every test in pvi_tests, prints the groups, optionally writes the YAML groups fragment and figures."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.cli.common import DB_NOTE, add_command, dump, json_flag, names, table
from analysis.errors import AnalysisError


def _print_plan(plan: Any) -> None:
    """The tests and the pvi / dissimilar / random groups of a plan as text."""
    print(f"setup {plan.setup}: {len(plan.tasks)} tasks, {len(plan.tests)} tests ({plan.variant} t-test for pairs, "
          f"one-way ANOVA for triples; similar when p > {plan.threshold:g}; seeds: {plan.seeds})")
    how = {"pvi": plan.rule, "dissimilar": "smallest p per task", "random": "same sizes as pvi, seed 0"}
    for name in ("pvi", "dissimilar", "random"):
        print(f"{name} groups ({how[name]}): " + ("; ".join(", ".join(g) for g in getattr(plan, name)) or "none"))
    table(["tasks", "test", "n", "statistic", "p", "effect", "effect_size", "similar"],
          [(" | ".join(t.tasks), t.test, "/".join(map(str, t.n)), t.statistic, f"{t.p:.3g}", t.effect,
            t.effect_size, t.is_similar) for t in plan.tests])


def _cmd_groups(args: argparse.Namespace) -> int:
    from analysis.pvi.grouping import (  # lazy: scipy, duckdb only when `groups` runs
        plan_groups,
        pvi_figures,
        write_groups_config,
    )
    from analysis.store.duck import open_store  # lazy: duckdb only when `groups` runs

    if args.figures:
        try:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AnalysisError(f"--figures {args.figures}: cannot create the folder ({e.strerror})") from None

    with open_store(args.db) as con:
        plan = plan_groups(con, args.setup, args.threshold, args.rule, args.welch, args.seed, args.tasks, args.prefer)
        figures = pvi_figures(con, args.setup, args.figures, args.threshold, args.welch, args.seed) \
            if args.figures else []
    if args.write_config:
        write_groups_config(plan, args.write_config)
    if args.json:
        dump(plan.to_dict())
        return 0
    _print_plan(plan)
    if args.write_config:
        print(f"wrote {args.write_config}")
    for f in figures:
        print(f"wrote {f}")
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `groups`."""
    p = add_command(sub, default_db, "groups",
                    "PVI task groups for multi-task learning (t-test / ANOVA within one setup)", _cmd_groups,
                    "Compares per-instance PVI distributions of tasks within one setup, stores every test in "
                    "pvi_tests and prints the groups. " + DB_NOTE)
    p.add_argument("--setup", required=True, help="model family unit of the PVI runs, e.g. full:minilm (required)")
    p.add_argument("--threshold", type=float, default=0.01, help="similar when p > this (default: %(default)s)")
    p.add_argument("--rule", choices=["greedy", "cliques", "paper"], default="greedy",
                   help="greedy: disjoint groups; cliques: all maximal, overlapping; paper: Li et al.'s (triples by "
                        "ANOVA alone, per task its pair of larger |t|, overlapping) (default: %(default)s)")
    p.add_argument("--prefer", choices=["p", "size"], default="p",
                   help="greedy order: by p, or larger groups first (default: %(default)s)")
    p.add_argument("--welch", action="store_true", help="Welch's t-test for pairs (default: Student's)")
    p.add_argument("--seed", type=int, help="one seed's PVI pair (default: each instance's mean over seeds)")
    p.add_argument("--tasks", type=names, help="only these tasks, comma-separated (default: every task)")
    p.add_argument("--write-config", help="write the YAML fragment `groups: {pvi, dissimilar, all, random, single}` here "
                                          "(default: print only)")
    p.add_argument("--figures", help="write the PVI distributions per task and the heatmap of pairwise p-values "
                                     "(PNG) into this folder (default: none)")
    json_flag(p)
