"""`predicted_transfer_scores`: a fitted predictor's mean and sd for every pair of a setup.

Rows (setup, source, target, observed, seeds_run, mean, sd, p_best, provenance) for every source !=
target of the setup's tasks: `observed` pairs have runs (`seeds_run` of them), the others are
predicted. The view `setup_transfers` also lists them as setup '<setup>@predicted' (score = mean),
so TaskShop, `select` and `evaluate-selection` take the completed grid as their T with
`--setup <setup>@predicted`; that name flags every score it shows as (partly) predicted.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from analysis.budget.predictor import TransferPredictor
from analysis.budget.replay import load_grid
from analysis.errors import AnalysisError
from analysis.store.duck import registered

PREDICTED_SUFFIX = "@predicted"


def predict_setup(con: duckdb.DuckDBPyConnection, setup: str, seeds: list[int] | None = None,
                  priors: list[str] | None = None, rank: int = 0, tasks: list[str] | None = None) -> pa.Table:
    """Fit the predictor on the setup's stored runs (only `seeds` if given) and return the rows; the
    pairs are those of the tasks with transfer runs, plus every pair among `tasks` (a budgeted grid's
    tasks: its untrained sources have no run to find them by)."""
    if setup.endswith(PREDICTED_SUFFIX):
        raise AnalysisError(f"setup '{setup}' is already a predicted grid; name the setup of the runs")
    grid = load_grid(con, setup, priors=priors, tasks=tasks)
    mask = np.ones(len(grid.seeds), bool) if seeds is None else np.isin(grid.seeds, seeds)
    if seeds is not None and not mask.any():
        raise AnalysisError(f"none of seeds {seeds} has runs in setup '{setup}' (seeds: {grid.seeds})")
    tasks_s, tasks_t = np.array(grid.sources), np.array(grid.targets)
    valid = tasks_s[:, None] != tasks_t[None, :]
    m = grid.ran & mask[None, None, :] & ~np.isnan(grid.x)
    z = np.where(m, np.nan_to_num(grid.z()), 0.0)
    pred = TransferPredictor(valid, grid.priors, rank=rank)
    post = pred.fit(z.sum(2), m.sum(2), (z ** 2).sum(2))
    pb = post.p_best()
    i, j = np.nonzero(valid)
    n = (grid.ran & mask[None, None, :]).sum(2)
    return pa.table({"setup": [setup] * len(i), "source": tasks_s[i].tolist(), "target": tasks_t[j].tolist(),
                     "observed": (n[i, j] > 0).tolist(), "seeds_run": n[i, j].astype(int).tolist(),
                     "mean": post.mean[i, j].tolist(), "sd": post.sd[i, j].tolist(), "p_best": pb[i, j].tolist(),
                     "provenance": [f"budget:predictor(rank={rank})"] * len(i)})


def write_predictions(con: duckdb.DuckDBPyConnection, table: pa.Table) -> int:
    """Replace the setup's rows of `predicted_transfer_scores` (one transaction)."""
    setups = set(table.column("setup").to_pylist())
    con.execute("BEGIN TRANSACTION")
    try:
        for s in setups:
            con.execute("DELETE FROM predicted_transfer_scores WHERE setup = ?", [s])
        with registered(con, "_pred", table):
            cols = ", ".join(table.column_names)
            con.execute(f"INSERT INTO predicted_transfer_scores ({cols}) SELECT {cols} FROM _pred")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return table.num_rows
