"""FUTE's cost claim counted on a store (paper 004, Sec. 4.2.5): black-box calls and seconds of FUTE,
O((k_p + k_D) c), against the prompt-selection baselines, O(k_p k_D c), and where they break even.

    python benchmarks/fute_cost.py --db results/fute_cpu/transferlab.duckdb --experiment fute-cpu \\
        --k-p 6 --k-d 4 --what-if 0.5 2

Unit costs are the experiment's measured wall times (analysis.selection.fute_cost); `--what-if` repeats the
break-even with a slower black box (seconds per call, e.g. an LLM behind Serve) and the same surrogate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="results/fute_cpu/transferlab.duckdb", help="results store (default: %(default)s)")
    ap.add_argument("--experiment", default="fute-cpu", help="embed experiment name (default: %(default)s)")
    ap.add_argument("--k-p", type=int, default=6, help="prompts to rank (default: %(default)s)")
    ap.add_argument("--k-d", type=int, default=4, help="datasets to rank them for (default: %(default)s)")
    ap.add_argument("--what-if", type=float, nargs="*", default=[0.5, 2.0],
                    help="seconds per black-box call to repeat the break-even with (default: 0.5 2)")
    args = ap.parse_args(argv)

    from analysis.selection.fute_cost import cost_report
    from analysis.store.duck import open_store

    with open_store(args.db) as con:
        rep = cost_report(con, args.experiment, args.k_p, args.k_d, args.what_if)
    print("\n".join(line for line in rep["lines"] if line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
