"""Families of ranking metrics for source selection: how a predicted ranking of sources is scored
against the transfers that were measured. Families are never mixed: every evaluation names the one
it used (`metric_family`), and each family computes its NDCG and Regret@k its own way.

  taskweb   Kim et al. (paper 000) as TaskWeb's scripts compute Table 2 (`taskweb_metrics`).
  lin       Lin et al. (paper 001, App. A.2, Eqs. 5-7) on absolute target scores, one ranking per
            (target, seed), averaged over seeds (`lin_metrics`).
  lin-mean  Lin et al. with the relevance averaged over seeds first (App. A.2 calls the relevance
            "the averaged target performance"); equals `lin` where there is one score per pair.

Every family is a function `(con, preds, setup, targets, k, sources) -> rows`, one row per
(variant, target) with n_sources, ndcg, regret, pred_top and gold_top; `preds` holds (variant,
target, source, pred), `sources` (a pool) restricts the candidates. Values are fractions (the
papers print percent: x100). Adding a family is one function registered with `@metric_family(NAME)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from analysis.db import registered
from analysis.errors import AnalysisError

Rows = list[dict[str, Any]]
Compute = Callable[..., Rows]  # (con, preds, setup, targets, k, sources) -> rows
_COLS = ["variant", "target", "n_sources", "n_seeds", "ndcg", "regret", "pred_top", "gold_top"]


@dataclass(frozen=True)
class MetricFamily:
    name: str
    compute: Compute
    doc: str


FAMILIES: dict[str, MetricFamily] = {}


def metric_family(name: str) -> Callable[[Compute], Compute]:
    """Register `fn` as metric family `name` (help: the first line of its docstring)."""
    def register(fn: Compute) -> Compute:
        if name in FAMILIES:
            raise ValueError(f"metric family '{name}' is registered twice")
        FAMILIES[name] = MetricFamily(name, fn, (inspect.getdoc(fn) or "").split("\n")[0])
        return fn
    return register


def get_family(name: str) -> MetricFamily:
    if name not in FAMILIES:
        raise AnalysisError(f"unknown metric family '{name}' (choose from {', '.join(FAMILIES)})")
    return FAMILIES[name]


def _check_k(k: int) -> None:
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")


def _check_coverage(con: duckdb.DuckDBPyConnection, candidates: str, params: dict[str, Any]) -> None:
    """Every candidate (relation of source, target) needs a prediction of every variant in `_preds`."""
    gaps = con.execute(f"""
        WITH g AS ({candidates})
        SELECT v.variant, g.target, count(p.pred) AS n_scored,
               list(g.source ORDER BY g.source) FILTER (WHERE p.pred IS NULL OR isnan(p.pred)) AS missing
        FROM g CROSS JOIN (SELECT DISTINCT variant FROM _preds) v
        LEFT JOIN _preds p ON p.variant = v.variant AND p.target = g.target AND p.source = g.source
        GROUP BY v.variant, g.target HAVING len(missing) > 0 ORDER BY g.target LIMIT 1""", params).fetchall()
    if gaps:
        _, target, n_scored, missing = gaps[0]
        why = " (no few-shot examples for it?)" if n_scored == 0 else ""
        raise AnalysisError(f"the selector has no score for target '{target}' from source(s) "
                            f"{', '.join(missing)}{why}")


# -- TaskWeb (paper 000) ------------------------------------------------------------------------------------
@metric_family("taskweb")
def taskweb_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str],
                    k: int = 5, sources: list[str] | None = None) -> Rows:
    """TaskWeb (Kim et al.): NDCG over gold ranks and Regret@k on mean target performance.

    Exactly as TaskWeb's taskshop/{roe,llm,taskshop}_evaluate.py and metrics.py compute Table 2:
      - candidates for target t: every source with a transfer score T(s -> t) in the setup (s != t),
        restricted to `sources` when given;
      - gold ranking: candidates by T(s -> t) descending; predicted: by selector score descending;
        ties keep the alphabetical order of source names;
      - NDCG: relevance of a source = n - (its 0-based gold rank), gain 2^rel - 1, discount
        log2(i + 2) at predicted position i, divided by the same sum in gold order;
      - Regret@k: P = mean over seeds of the target metric of the transfer runs (view
        `target_performance`); (mean P of gold top-k - mean P of predicted top-k) / mean P of gold
        top-k; null where a P is missing.
    """
    _check_k(k)
    params = {"setup": setup, "targets": targets, "sources": sources}
    cand = """SELECT source, target, score AS gold FROM analysis_transfers
              WHERE setup = $setup AND list_contains($targets, target) AND source <> target
                AND (CAST($sources AS VARCHAR[]) IS NULL OR list_contains($sources, source))"""
    with registered(con, "_preds", preds):
        _check_coverage(con, cand, params)
        rows = con.execute(f"""
            WITH g AS ({cand}),
                 j AS (SELECT p.variant, g.target, g.source, g.gold, p.pred, tp.perf
                       FROM g JOIN _preds p ON p.target = g.target AND p.source = g.source
                       LEFT JOIN target_performance tp
                              ON tp.setup = $setup AND tp.source = g.source AND tp.target = g.target),
                 r AS (SELECT *, count(*) OVER w AS n,
                              row_number() OVER (PARTITION BY variant, target ORDER BY gold DESC, source) - 1 AS grank,
                              row_number() OVER (PARTITION BY variant, target ORDER BY pred DESC, source) - 1 AS prank
                       FROM j WINDOW w AS (PARTITION BY variant, target))
            SELECT variant, target, any_value(n) AS n_sources, NULL AS n_seeds,
                   sum((pow(2, n - grank) - 1) / log2(prank + 2)) / sum((pow(2, n - grank) - 1) / log2(grank + 2)) AS ndcg,
                   avg(perf) FILTER (WHERE grank < $k) AS gold_perf,
                   avg(perf) FILTER (WHERE prank < $k) AS pred_perf,
                   count(*) FILTER (WHERE (grank < $k OR prank < $k) AND perf IS NULL) AS perf_missing,
                   CASE WHEN perf_missing = 0 THEN (gold_perf - pred_perf) / gold_perf END AS regret,
                   list(source ORDER BY prank) FILTER (WHERE prank < $k) AS pred_top,
                   list(source ORDER BY grank) FILTER (WHERE grank < $k) AS gold_top
            FROM r GROUP BY variant, target ORDER BY variant, target""", {**params, "k": k}).fetchall()
    cols = ["variant", "target", "n_sources", "n_seeds", "ndcg", "gold_perf", "pred_perf", "perf_missing",
            "regret", "pred_top", "gold_top"]
    return [dict(zip(cols, r, strict=True)) for r in rows]


# -- Lin et al. (paper 001) ---------------------------------------------------------------------------------
@metric_family("lin")
def lin_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str], k: int = 1,
                sources: list[str] | None = None, per_seed: bool = True) -> Rows:
    """Lin et al. (paper 001, App. A.2): nDCG and Regret@k on absolute target scores.

    Definitions:
      - scores: the target metric of the setup's transfer runs (view `transfer_runs`, the config of
        `canonical_hparams`), in percent: rel = 100 x score (the store keeps fractions). Published
        means without seeds (Lin et al.'s Table 7, `import its`) are one "seed";
      - one ranking per (target, seed): candidates = sources with a run into the target at that seed
        (restricted to `sources` when given); gold order by score descending, predicted order by
        selector score descending, ties by source name; with `per_seed=False` the score of a pair is
        first averaged over seeds and there is one ranking per target;
      - nDCG (Eqs. 5-6): DCG = sum_i (2^rel_i - 1) / log2(i + 2) over predicted positions i = 0..n-1,
        divided by the DCG of the gold order; a score below 0 (e.g. a negative Matthews correlation,
        outside the paper's rel in [0, 100]) has gain 0;
      - Regret@k (Eq. 7): (best score - best score among the predicted top k) / best score, a
        fraction (x100 = the paper's percent); null when the best score is not positive;
      - a target's nDCG and Regret@k are the means over its seeds' rankings.
    """
    _check_k(k)
    params = {"setup": setup, "targets": targets, "sources": sources}
    runs = """SELECT r.target, r.source, r.seed, 100 * avg(r.score) AS rel
              FROM transfer_runs r
              JOIN canonical_hparams h ON h.setup = r.setup AND h.target = r.target AND h.hparams = r.hparams
              WHERE r.setup = $setup AND list_contains($targets, r.target) AND r.source <> r.target
                AND (CAST($sources AS VARCHAR[]) IS NULL OR list_contains($sources, r.source))
              GROUP BY r.target, r.source, r.seed"""
    scores = runs if per_seed else f"SELECT target, source, NULL AS seed, avg(rel) AS rel FROM ({runs}) GROUP BY ALL"
    have = {r[0] for r in con.execute(f"SELECT DISTINCT target FROM ({runs})", params).fetchall()}
    lacking = [t for t in targets if t not in have]
    if lacking:
        raise AnalysisError(f"no transfer runs into target(s) {', '.join(lacking)} in setup '{setup}'"
                            f"{' from the pool' if sources is not None else ''}: the lin metrics rank the "
                            "absolute target scores of transfer runs")
    with registered(con, "_preds", preds):
        _check_coverage(con, f"SELECT DISTINCT source, target FROM ({scores})", params)
        rows = con.execute(f"""
            WITH c AS ({scores}),
                 j AS (SELECT p.variant, c.target, c.seed, c.source, c.rel, greatest(c.rel, 0) AS g_rel, p.pred
                       FROM c JOIN _preds p ON p.target = c.target AND p.source = c.source),
                 r AS (SELECT *,
                              row_number() OVER (PARTITION BY variant, target, seed ORDER BY rel DESC, source) - 1 AS grank,
                              row_number() OVER (PARTITION BY variant, target, seed ORDER BY pred DESC, source) - 1 AS prank
                       FROM j),
                 per_seed AS (
                       SELECT variant, target, seed, count(*) AS n,
                              sum((pow(2, g_rel) - 1) / log2(prank + 2))
                                / nullif(sum((pow(2, g_rel) - 1) / log2(grank + 2)), 0) AS ndcg,
                              CASE WHEN max(rel) > 0
                                   THEN (max(rel) - max(rel) FILTER (WHERE prank < $k)) / max(rel) END AS regret
                       FROM r GROUP BY variant, target, seed),
                 tops AS (SELECT variant, target,
                                 list(source ORDER BY pred DESC, source)[1:$k] AS pred_top,
                                 list(source ORDER BY rel DESC, source)[1:$k] AS gold_top
                          FROM (SELECT variant, target, source, avg(rel) AS rel, any_value(pred) AS pred
                                FROM j GROUP BY ALL) GROUP BY variant, target)
            SELECT s.variant, s.target, max(s.n) AS n_sources, count(*) AS n_seeds,
                   avg(s.ndcg) AS ndcg, avg(s.regret) AS regret,
                   any_value(t.pred_top) AS pred_top, any_value(t.gold_top) AS gold_top
            FROM per_seed s JOIN tops t USING (variant, target)
            GROUP BY s.variant, s.target ORDER BY s.variant, s.target""", {**params, "k": k}).fetchall()
    return [dict(zip(_COLS, r, strict=True)) for r in rows]


@metric_family("lin-mean")
def lin_mean_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str], k: int = 1,
                     sources: list[str] | None = None) -> Rows:
    """Lin et al. with each pair's score averaged over seeds before ranking (one ranking per target)."""
    return lin_metrics(con, preds, setup, targets, k, sources, per_seed=False)
