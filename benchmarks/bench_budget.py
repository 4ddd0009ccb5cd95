"""Replay speed of the budgeted-grid evaluation (analysis.budget): every released TaskWeb setup,
30 A/B seed splits, one policy at one budget plus the references (random + completion, prior top-k),
on one process. Prints seconds per setup, episodes and replayed runs per second.

    python benchmarks/bench_budget.py [--policy racing] [--fraction 0.2] [--splits 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from analysis.budget.evaluate import evaluate
    from analysis.budget.replay import full_grid_cost, load_grid, released_setups, taskweb_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="racing")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--splits", type=int, default=30)
    args = ap.parse_args()
    release = Path(os.environ.get("TRANSFERLAB_DATA") or ROOT.parent / "shared" / "data") / "taskweb"
    if not release.is_dir():
        print(f"skipped: no TaskWeb release at {release}")
        return 0
    t0 = time.perf_counter()
    con = taskweb_store(release)
    t_load = time.perf_counter() - t0
    total_runs = episodes = 0
    t1 = time.perf_counter()
    for setup in released_setups(con):
        ts = time.perf_counter()
        grid = load_grid(con, setup)
        out = evaluate(grid, args.policy, [args.fraction], n_splits=args.splits)
        rows = [r for r in out["table"] if r["fraction"] is not None]
        runs = sum(r["transfers"] * full_grid_cost(grid).transfers * r["n_splits"] for r in rows)
        total_runs += runs
        episodes += sum(r["n_splits"] for r in rows)
        best = next(r for r in rows if r["method"] == args.policy)
        print(f"{setup:18s} {time.perf_counter() - ts:6.1f} s   {args.policy} NDCG {100 * best['ndcg']:.2f}")
    el = time.perf_counter() - t1
    print(f"import {t_load:.1f} s; {episodes} episodes, {total_runs:.0f} replayed transfer runs in {el:.1f} s "
          f"({episodes / el:.1f} episodes/s, {total_runs / el:.0f} runs/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
