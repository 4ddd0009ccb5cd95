"""Transfer analytics over the store (paper 000, sections 3.2-3.3): matrices, commutativity,
transitivity, setup similarity.

Why SQL: each analysis is one query over the views of `analysis.store.views`, so it runs in
milliseconds on TaskWeb-sized data and stays linear in the number of runs; Python only shapes
the answer. Definitions (transfer score T = 0.5*PC + 0.5*(0.2*PM - 0.1), per setup):
  - setup 'mean': T averaged over the real setups (the published 'all:all' average excluded);
  - commutativity: an unordered pair {A, B} with both directions known is commutative when
    A->B and B->A are both positive or both not positive (T > 0 is "positive");
  - transitivity at threshold h: among triples (A, B, C), A != C, with T(A->B) > h and T(B->C) > h
    and A->C known, the fraction with T(A->C) > 0;
  - setup similarity: sum(x*y) / sqrt(sum(x^2) * sum(y^2)) over the pairs both setups share.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

from analysis.errors import AnalysisError

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)
MEAN = "mean"


def available_setups(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Setups with transfer scores, in name order (the 'mean' pseudo-setup not included)."""
    return [r[0] for r in con.execute("SELECT DISTINCT setup FROM setup_transfers ORDER BY setup").fetchall()]


def require_data(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The setups, or a clear error when the store holds no transfer scores at all."""
    rows = con.execute("""SELECT setup, count(*) > count(DISTINCT (source, target)),
                                 list(DISTINCT provenance ORDER BY provenance)
                          FROM setup_transfers GROUP BY setup ORDER BY setup""").fetchall()
    if not rows:
        raise AnalysisError("the store holds no transfer scores: import the published TaskWeb with "
                            "`transferlab import taskweb DIR` or run `transferlab run CONFIG` first")
    for setup, dup, provs in rows:
        if dup:
            raise AnalysisError(f"setup '{setup}' has transfer scores from several sources ({', '.join(provs)}); "
                                "delete one of them (see the `imports` table) before analysing it")
    return [r[0] for r in rows]


def require_setup(con: duckdb.DuckDBPyConnection, setup: str, allow_mean: bool = True,
                  setups: list[str] | None = None) -> str:
    """Validate a setup name ('ADAPTATION:MODEL', or 'mean'); error lists the ones with data."""
    setups = setups if setups is not None else require_data(con)
    if setup == MEAN and allow_mean:
        return setup
    if setup not in setups:
        hint = " (or 'mean', the average over setups, which equals a published 'all:all')" if allow_mean else ""
        raise AnalysisError(f"no transfer scores for setup '{setup}'; setups with data: {', '.join(setups)}{hint}")
    return setup


def transfer_matrix(con: duckdb.DuckDBPyConnection, setup: str = MEAN) -> pd.DataFrame:
    """Source x target matrix of transfer scores (NaN where a pair is unknown)."""
    require_setup(con, setup)
    long = con.execute("SELECT source, target, score FROM analysis_transfers WHERE setup = ?", [setup]).df()
    return long.pivot(index="source", columns="target", values="score").sort_index().sort_index(axis=1)


def commutativity(con: duckdb.DuckDBPyConnection, setup: str = MEAN) -> dict[str, Any]:
    """Counts and the list of unordered pairs, each with both scores and whether signs agree."""
    require_setup(con, setup)
    rows = con.execute("""SELECT task_a, task_b, score_ab, score_ba, commutative FROM commutativity
                          WHERE setup = ? ORDER BY task_a, task_b""", [setup]).fetchall()
    pairs = [{"task_a": a, "task_b": b, "score_ab": x, "score_ba": y, "commutative": c} for a, b, x, y, c in rows]
    n_comm = sum(1 for p in pairs if p["commutative"])
    return {"setup": setup, "n_pairs": len(pairs), "n_commutative": n_comm,
            "n_non_commutative": len(pairs) - n_comm,
            "fraction": n_comm / len(pairs) if pairs else None, "pairs": pairs}


def commutativity_counts(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per setup (and 'mean'): unordered pairs with both directions, and how many share a sign."""
    require_data(con)
    return con.execute("""SELECT setup, count(*) AS n_pairs, count(*) FILTER (WHERE commutative) AS n_commutative
                          FROM commutativity GROUP BY setup ORDER BY setup""").df()


def transitivity(con: duckdb.DuckDBPyConnection, thresholds: tuple[float, ...] | list[float] = DEFAULT_THRESHOLDS,
                 setups: list[str] | None = None) -> pd.DataFrame:
    """Per setup (and 'mean') and threshold: n_triples, n_positive and their fraction, one query."""
    if not thresholds:
        raise AnalysisError("transitivity needs at least one threshold")
    all_setups = require_data(con)
    chosen = setups if setups is not None else [*all_setups, MEAN]
    for s in chosen:
        require_setup(con, s, setups=all_setups)
    return con.execute("""
        WITH th AS (SELECT unnest(?::DOUBLE[]) AS threshold),
             tr AS (SELECT setup, least(score_ab, score_bc) AS weakest, score_ac > 0 AS positive
                    FROM transitive_triples WHERE list_contains(?::VARCHAR[], setup))
        SELECT tr.setup, th.threshold,
               count(*) FILTER (WHERE weakest > threshold) AS n_triples,
               count(*) FILTER (WHERE weakest > threshold AND positive) AS n_positive,
               n_positive / nullif(n_triples, 0) AS fraction
        FROM tr CROSS JOIN th
        GROUP BY tr.setup, th.threshold ORDER BY tr.setup, th.threshold""",
                       [list(map(float, thresholds)), chosen]).df()


def setup_similarity(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Square matrix of normalised dot products between the setups' transfer matrices."""
    require_data(con)
    long = con.execute("SELECT setup_a, setup_b, similarity FROM setup_similarity").df()
    return long.pivot(index="setup_a", columns="setup_b", values="similarity").sort_index().sort_index(axis=1)
