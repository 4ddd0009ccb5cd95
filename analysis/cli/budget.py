"""`transferlab budget-eval` and `transferlab predict-transfers` (registered by analysis.cli.commands).

budget-eval replays a budget policy on released per-seed runs under the held-out-seed protocol
(analysis.budget.evaluate) and prints the table, optionally the `--json` record of every split and
a figure of NDCG and Regret@5 against the share of the full grid's runs spent.
predict-transfers fits the predictor on a setup's stored runs and writes predicted_transfer_scores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from analysis.budget.policies import Policy
from analysis.cli.common import data_root, names
from analysis.errors import AnalysisError
from analysis.reports.textout import print_table


def _release_dir() -> Path:
    return data_root() / "taskweb"


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"budget fractions must be positive numbers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return v


def _source(args: argparse.Namespace) -> Any:
    from analysis.budget.replay import taskweb_store  # lazy: duckdb only when a store is opened

    if args.db:
        from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

        return read_store(args.db)
    release = Path(args.release) if args.release else _release_dir()
    if not release.is_dir():
        raise AnalysisError(f"TaskWeb release folder {release} does not exist (pass --release DIR or --db FILE)")

    return nullcontext(taskweb_store(release))


def cmd_budget_eval(args: argparse.Namespace) -> int:
    from analysis.budget.evaluate import evaluate  # lazy: duckdb only when a store is opened
    from analysis.budget.replay import load_grid, released_setups  # lazy: duckdb only when a store is opened

    if args.policy not in Policy.registry:
        raise AnalysisError(f"unknown budget policy '{args.policy}' (choose from {', '.join(Policy.registry)})")
    results = []
    with _source(args) as con:
        have = released_setups(con)
        setups = have if args.setup == "all" else names(args.setup)
        bad = [s for s in setups if s not in have]
        if bad:
            raise AnalysisError(f"no per-seed transfer runs for setup(s) {', '.join(bad)} "
                                f"(setups: {', '.join(have)}, or 'all')")
        for setup in setups:
            grid = load_grid(con, setup, priors=args.priors)
            results.append(evaluate(grid, args.policy, args.fraction, n_splits=args.splits, n_seen=args.seen,
                                    seed=args.seed, prior=list(grid.priors), k=args.k, keep_runs=args.json,
                                    rank=args.rank, round_size=args.round_size, screen=args.screen))
            results[-1].update(exact_baselines=bool(grid.exact.all()), n_seeds=len(grid.seeds))
    if args.figure:
        draw(results, args.figure)
    if args.json:
        out = [{k: r[k] for k in ("setup", "policy", "splits", "table", "full_grid_runs", "exact_baselines")}
               for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
        return 0

    for r in results:
        print(f"{r['setup']}: {r['policy']}, {args.splits} splits of {args.seen} seen / {r['n_seeds'] - args.seen} gold seeds, "
              f"full grid = {r['full_grid_runs']} runs"
              + ("" if r["exact_baselines"] else " (baselines estimated: no published PC)"))
        print_table(["method", "budget", "runs spent %", "transfers %", "NDCG", "sd", "Regret@5", "sd"],
                    [(t["method"], "-" if t["fraction"] is None else f"{t['fraction']:g}", f"{100 * t['spent']:.1f}",
                      f"{100 * t['transfers']:.1f}", f"{100 * t['ndcg']:.2f}", f"{100 * t['ndcg_sd']:.2f}",
                      f"{100 * t['regret_at_5']:.2f}", f"{100 * t['regret_sd']:.2f}") for t in r["table"]])
        print()
    if args.figure:
        print(f"figure: {args.figure}")
    return 0


def draw(results: list[dict[str, Any]], path: str) -> None:
    """NDCG and Regret@5 against the share of the full grid's runs spent, one row per setup."""
    import matplotlib  # lazy: matplotlib only when drawing a figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib only when drawing a figure

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    for row, r in zip(axes, results, strict=True):
        curves: dict[str, list[dict[str, Any]]] = {}
        for t in r["table"]:
            curves.setdefault(t["method"], []).append(t)
        for ax, key, sd, label in ((row[0], "ndcg", "ndcg_sd", "NDCG"), (row[1], "regret_at_5", "regret_sd", "Regret@5")):
            for method, pts in curves.items():
                pts = sorted(pts, key=lambda p: p["spent"])
                xs = [100 * p["spent"] for p in pts]
                ys = [100 * p[key] for p in pts]
                es = [100 * p[sd] for p in pts]
                fmt = "-o" if len(pts) > 1 else ("s" if "full" in method else "^")
                ax.errorbar(xs, ys, yerr=es, fmt=fmt, capsize=3, label=method, markersize=5)
            ax.set_xlabel("runs spent (% of the full 8-seed grid)")
            ax.set_ylabel(f"{label} vs held-out seeds (%)")
            ax.set_title(f"{r['setup']}: {label}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_predict(args: argparse.Namespace) -> int:
    from analysis.budget.store import (  # lazy: duckdb only when a store is opened
        predict_setup,
        write_predictions,
    )
    from analysis.store.duck import open_store  # lazy: duckdb only when a store is opened

    with open_store(args.db) as con:
        table = predict_setup(con, args.setup, seeds=args.seeds, priors=args.priors, rank=args.rank,
                              tasks=args.tasks)
        n = write_predictions(con, table)
    obs = sum(table.column("observed").to_pylist())
    print(f"stored {n} pairs of setup '{args.setup}' ({obs} observed, {n - obs} predicted) in "
          f"predicted_transfer_scores; use them as T with --setup {args.setup}@predicted")
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = sub.add_parser("budget-eval", help="replay a budgeted-grid policy on released per-seed runs: NDCG / "
                                           "Regret@5 against held-out seeds",
                       description="Replays a budget policy (racing, prior-topk, active, random) on the per-seed "
                                   "runs of a setup: the policy sees seeds A only, the gold ranking comes from the "
                                   "other seeds; prints the table next to the full grid on A, the prior alone, "
                                   "random pairs + completion and prior top-k.")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL, comma-separated, or 'all' (required)")
    p.add_argument("--policy", default="racing", help="racing | prior-topk | active | random (default: %(default)s)")
    p.add_argument("--fraction", type=_fractions, default=[0.2],
                   help="budget(s): fraction of the full 8-seed grid's runs (baselines and sources counted), "
                        "comma-separated; a value > 1 is an absolute number of runs (default: 0.2)")
    p.add_argument("--splits", type=_positive, default=30, help="random A/B seed splits (default: %(default)s)")
    p.add_argument("--seen", type=int, default=4, help="seeds in A (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and policies (default: %(default)s)")
    p.add_argument("--k", type=_positive, default=5, help="racing: contenders per target (default: %(default)s)")
    p.add_argument("--rank", type=int, default=0, help="predictor's low-rank residual (default: %(default)s)")
    p.add_argument("--round-size", type=int, default=None, help="runs per planned round (default: the policy's)")
    p.add_argument("--screen", type=float, default=1.0,
                   help="racing / active: round 0 trains each target's top share of sources by the prior "
                        "(default: %(default)s, every pair)")
    p.add_argument("--priors", type=names, default=None,
                   help="stored selectors (or oracle[SETUP]) the policies may use (default: roe,llm where stored)")
    p.add_argument("--release", default=None, help="TaskWeb release folder (default: ../shared/data/taskweb)")
    p.add_argument("--db", default=None, help="replay a store's runs instead of the release (read only)")
    p.add_argument("--json", action="store_true",
                   help="print {setup, policy, splits: [{seeds_seen, runs, ranking}], table} (default: a table)")
    p.add_argument("--figure", help="draw NDCG and Regret@5 against runs spent into this PNG")
    p.set_defaults(func=cmd_budget_eval)

    p = sub.add_parser("predict-transfers", help="fit the transfer-matrix predictor on a setup's runs and store "
                                                 "predicted_transfer_scores (setup '<setup>@predicted')",
                       description="Fits source + target effects and prior features (Gaussian posterior) on the "
                                   "setup's per-seed transfer runs and writes a mean, sd and P(best) for every "
                                   "pair, observed or not; `--setup <setup>@predicted` then gives TaskShop, "
                                   "select and evaluate-selection the completed grid as T.")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL with per-seed transfer runs (required)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in names(s)], default=None,
                   help="use only these seeds' runs, comma-separated (default: all)")
    p.add_argument("--priors", type=names, default=None, help="prior features (default: roe,llm where stored)")
    p.add_argument("--rank", type=int, default=0, help="low-rank residual (default: %(default)s)")
    p.add_argument("--tasks", type=names, default=None,
                   help="the grid's tasks, comma-separated: every pair among them is predicted, also from sources "
                        "never trained (default: the tasks of the setup's transfer runs)")
    p.add_argument("--db", default=default_db(), help="DuckDB results store (default: %(default)s)")
    p.set_defaults(func=cmd_predict)
