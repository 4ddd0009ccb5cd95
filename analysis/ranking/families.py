"""Families of ranking metrics for source selection: how a predicted ranking of sources is scored
against the transfers that were measured. Families are never mixed: every evaluation names the one
it used (`metric_family`), and each family computes its NDCG and Regret@k its own way.

  taskweb       Kim et al. (paper 000) as TaskWeb's scripts compute Table 2 (`taskweb_metrics`); k = 5.
  lin           Lin et al. (paper 001, App. A.2, Eqs. 5-7): relevance = the seed-averaged target score in
                percent, one ranking per target (`lin_metrics`); k = 1 (their R@1).
  lin-per-seed  Lin et al.'s formulas with one ranking per (target, seed), the values averaged over seeds
                (a variant, not the paper's); equals `lin` where there is one score per pair; k = 1.
  vu            Vu et al. (2020) as FUTE (paper 004, Sec. 4.1.1) follows them: NDCG with relevance = the
                (seed-averaged) target performance and rho = the mean rank of the true best source; Vu et
                al. define no Regret@k (`vu_metrics`).

Every family also gives rho per target (`rank_of_best`: the 1-based predicted position of the candidate
its gold ordering puts first; several equally best: the best placed), so rho is always read against the
family's own gold. Every family is a function `(con, preds, setup, targets, k, sources) -> rows`, one row
per (variant, target) with n_sources, ndcg, regret, rank_of_best, pred_top and gold_top; `preds` holds
(variant, target, source, pred), `sources` (a pool) restricts the candidates. Values are fractions (the
papers print percent: x100). Adding a family is one function registered with `@metric_family(NAME, k)`,
where k is the paper's own k of Regret@k (the default when none is asked for).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.registry import Registry
from analysis.store.duck import registered

Rows = list[dict[str, Any]]
Compute = Callable[..., Rows]  # (con, preds, setup, targets, k, sources) -> rows
_COLS = ["variant", "target", "n_sources", "n_seeds", "ndcg", "regret", "rank_of_best", "pred_top", "gold_top"]


@dataclass(frozen=True)
class MetricFamily:
    name: str
    compute: Compute
    doc: str
    default_k: int  # the paper's k of Regret@k (with regret=False: the length of the top lists only)
    regret: bool  # whether the paper defines Regret@k (False: rows carry regret None)


FAMILIES: Registry[MetricFamily] = Registry("metric family")
#: names of earlier releases, with what they are now (an old script gets told, not silently changed)
RENAMED = {"lin-mean": "the seed-averaged form is now 'lin' (Lin et al.'s own); the per-seed ranking is "
                       "'lin-per-seed'"}


def metric_family(name: str, default_k: int, regret: bool = True) -> Callable[[Compute], Compute]:
    """Register `fn` as metric family `name` (help: the first line of its docstring) with its paper's k."""
    return FAMILIES.decorator(name, lambda fn: MetricFamily(
        name, fn, (inspect.getdoc(fn) or "").split("\n")[0], default_k, regret))


def get_family(name: str) -> MetricFamily:
    return FAMILIES.require(name, f": {RENAMED[name]}" if name in RENAMED else "")


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
@metric_family("taskweb", default_k=5)
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
        top-k; null where a P is missing;
      - rho (`rank_of_best`): the predicted position of the source with the highest T(s -> t).
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
                 r AS (SELECT *, count(*) OVER w AS n, max(gold) OVER w AS best,
                              row_number() OVER (PARTITION BY variant, target ORDER BY gold DESC, source) - 1 AS grank,
                              row_number() OVER (PARTITION BY variant, target ORDER BY pred DESC, source) - 1 AS prank
                       FROM j WINDOW w AS (PARTITION BY variant, target))
            SELECT variant, target, any_value(n) AS n_sources, NULL AS n_seeds,
                   sum((pow(2, n - grank) - 1) / log2(prank + 2)) / sum((pow(2, n - grank) - 1) / log2(grank + 2)) AS ndcg,
                   avg(perf) FILTER (WHERE grank < $k) AS gold_perf,
                   avg(perf) FILTER (WHERE prank < $k) AS pred_perf,
                   count(*) FILTER (WHERE (grank < $k OR prank < $k) AND perf IS NULL) AS perf_missing,
                   CASE WHEN perf_missing = 0 THEN (gold_perf - pred_perf) / gold_perf END AS regret,
                   min(prank) FILTER (WHERE gold >= best - 1e-12) + 1 AS rank_of_best,  -- float-noise ties
                   list(source ORDER BY prank) FILTER (WHERE prank < $k) AS pred_top,
                   list(source ORDER BY grank) FILTER (WHERE grank < $k) AS gold_top
            FROM r GROUP BY variant, target ORDER BY variant, target""", {**params, "k": k}).fetchall()
    cols = ["variant", "target", "n_sources", "n_seeds", "ndcg", "gold_perf", "pred_perf", "perf_missing",
            "regret", "rank_of_best", "pred_top", "gold_top"]
    return [dict(zip(cols, r, strict=True)) for r in rows]


# -- absolute target scores: Lin et al. (paper 001) and Vu et al. (2020, as FUTE follows them) ----------------
def _absolute_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str], k: int,
                      sources: list[str] | None, per_seed: bool, family: str) -> Rows:
    """nDCG, Regret@k and rho on absolute target scores (the definitions of `lin_metrics`); one ranking per
    target on the seed-averaged scores, or with `per_seed` one per (target, seed), averaged over seeds."""
    _check_k(k)
    params = {"setup": setup, "targets": targets, "sources": sources}
    # rounded to 1e-9 points: a float sum's order (DuckDB aggregates in parallel) must not break exact ties
    runs = """SELECT r.target, r.source, r.seed, round(100 * avg(r.score), 9) AS rel
              FROM transfer_runs r
              JOIN canonical_hparams h ON h.setup = r.setup AND h.target = r.target AND h.hparams = r.hparams
              WHERE r.setup = $setup AND list_contains($targets, r.target) AND r.source <> r.target
                AND (CAST($sources AS VARCHAR[]) IS NULL OR list_contains($sources, r.source))
                AND EXISTS (SELECT 1 FROM analysis_transfers a  -- the candidates of every family
                            WHERE a.setup = $setup AND a.source = r.source AND a.target = r.target)
              GROUP BY r.target, r.source, r.seed"""
    scores = runs if per_seed else f"SELECT target, source, NULL AS seed, round(avg(rel), 9) AS rel FROM ({runs}) GROUP BY ALL"
    have = {r[0] for r in con.execute(f"SELECT DISTINCT target FROM ({runs})", params).fetchall()}
    lacking = [t for t in targets if t not in have]
    if lacking:
        raise AnalysisError(f"no transfer runs into target(s) {', '.join(lacking)} in setup '{setup}'"
                            f"{' from the pool' if sources is not None else ''}: the {family} metrics rank the "
                            "absolute target scores of transfer runs")
    with registered(con, "_preds", preds):
        _check_coverage(con, f"SELECT DISTINCT source, target FROM ({scores})", params)
        rows = con.execute(f"""
            WITH c AS ({scores}),
                 j AS (SELECT p.variant, c.target, c.seed, c.source, c.rel, greatest(c.rel, 0) AS g_rel, p.pred
                       FROM c JOIN _preds p ON p.target = c.target AND p.source = c.source),
                 r AS (SELECT *, max(rel) OVER (PARTITION BY variant, target, seed) AS best,
                              row_number() OVER (PARTITION BY variant, target, seed ORDER BY rel DESC, source) - 1 AS grank,
                              row_number() OVER (PARTITION BY variant, target, seed ORDER BY pred DESC, source) - 1 AS prank
                       FROM j),
                 per_seed AS (
                       SELECT variant, target, seed, count(*) AS n,
                              sum((pow(2, g_rel) - 1) / log2(prank + 2))
                                / nullif(sum((pow(2, g_rel) - 1) / log2(grank + 2)), 0) AS ndcg,
                              CASE WHEN max(rel) > 0
                                   THEN (max(rel) - max(rel) FILTER (WHERE prank < $k)) / max(rel) END AS regret,
                              min(prank) FILTER (WHERE rel = best) + 1 AS rank_of_best
                       FROM r GROUP BY variant, target, seed),
                 tops AS (SELECT variant, target,
                                 list(source ORDER BY pred DESC, source)[1:$k] AS pred_top,
                                 list(source ORDER BY rel DESC, source)[1:$k] AS gold_top
                          FROM (SELECT variant, target, source, avg(rel) AS rel, any_value(pred) AS pred
                                FROM j GROUP BY ALL) GROUP BY variant, target)
            SELECT s.variant, s.target, max(s.n) AS n_sources, count(*) AS n_seeds,
                   avg(s.ndcg) AS ndcg, avg(s.regret) AS regret, avg(s.rank_of_best) AS rank_of_best,
                   any_value(t.pred_top) AS pred_top, any_value(t.gold_top) AS gold_top,
                   list(struct_pack(seed := s.seed, ndcg := s.ndcg, regret := s.regret,
                                    rank_of_best := s.rank_of_best) ORDER BY s.seed) AS by_seed
            FROM per_seed s JOIN tops t USING (variant, target)
            GROUP BY s.variant, s.target ORDER BY s.variant, s.target""", {**params, "k": k}).fetchall()
    out = [dict(zip([*_COLS, "by_seed"], r, strict=True)) for r in rows]
    for row in out:
        if not per_seed:  # one ranking of the seed means: no seeds to spread over
            row["n_seeds"], row["by_seed"] = None, None
    return out


@metric_family("lin", default_k=1)
def lin_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str], k: int = 1,
                sources: list[str] | None = None) -> Rows:
    """Lin et al. (paper 001, App. A.2): nDCG and Regret@k on the seed-averaged absolute target scores.

    Definitions (the paper's Eqs. 5-7; `../shared/DESIGN.md` says the same):
      - scores: the target metric of the setup's transfer runs (view `transfer_runs`, the config of
        `canonical_hparams`), in percent: rel = 100 x score (the store keeps fractions), averaged over
        seeds first ("the relevance rel_i ... is set to the averaged target performance", Eq. 7's
        E[T(s, t)]). Published means without seeds (Lin et al.'s Table 7, `import its`) are that mean;
      - one ranking per target: candidates = sources with a transfer score T(s -> t) in the setup (the
        candidates of `taskweb` too) and a run into the target, restricted to `sources` when given (TaskWeb's
        runs.csv holds roberta runs from sst2, which has no transfer score: not a candidate); gold order by mean score descending, predicted order by selector score descending,
        ties by source name;
      - nDCG (Eqs. 5-6): DCG = sum_i (2^rel_i - 1) / log2(i + 2) over predicted positions i = 0..n-1,
        divided by the DCG of the gold order; a score below 0 (e.g. a negative Matthews correlation,
        outside the paper's rel in [0, 100]) has gain 0;
      - Regret@k (Eq. 7): (best mean score - best mean score among the predicted top k) / best mean score,
        a fraction (x100 = the paper's percent); null when the best score is not positive. The paper
        reports k = 1 (R@1), the default;
      - rho: the predicted position of the source with the best mean score.
    """
    return _absolute_metrics(con, preds, setup, targets, k, sources, per_seed=False, family="lin")


@metric_family("lin-per-seed", default_k=1)
def lin_per_seed_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str],
                         k: int = 1, sources: list[str] | None = None) -> Rows:
    """Lin et al.'s formulas ranked per (target, seed), then averaged over seeds (a variant, not the paper's).

    As `lin_metrics`, but each seed's scores make their own gold ranking: nDCG, Regret@k and rho are
    computed per (target, seed) and averaged over the target's seeds; `by_seed` keeps each seed's values
    (their spread). With one score per pair it equals `lin`.
    """
    return _absolute_metrics(con, preds, setup, targets, k, sources, per_seed=True, family="lin-per-seed")


@metric_family("vu", default_k=1, regret=False)
def vu_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str], k: int = 1,
               sources: list[str] | None = None) -> Rows:
    """Vu et al. (2020) as FUTE (paper 004, Sec. 4.1.1) uses them: rho and NDCG on target performance.

    FUTE: "We follow (Vu et al., 2020; Zhou et al., 2022) and employ two metrics: (1) the average rank rho
    of the candidate source model that yields the highest transfer gain; (2) the NDCG (Jarvelin and
    Kekalainen, 2002), which assesses the overall quality of the entire ranking." Vu et al.'s NDCG is
    DCG(R) = sum_{i=1..p} (2^rel_i - 1) / log2(i + 1) over the whole ranking, rel_i the target performance
    of the source ranked i, divided by the DCG of the true ranking (Vu et al.'s text is not among
    ../shared/papers; Lin et al.'s App. A.2 Eq. 5, which is, writes the same formula with the same symbols):
      - relevance: the seed-averaged target score of the transfer in percent (as `lin`; gain 0 below 0);
      - rho (`rank_of_best`): the 1-based predicted position of the source with the highest transfer gain,
        i.e. the highest mean target score (the target's baseline is common to all its sources); the mean
        over targets is the reported rho (lower is better, 1 is perfect);
      - no Regret@k (Vu et al. and FUTE report none): `regret` is null; k only sets the top lists' length.
    Numerically the NDCG equals `lin`'s; the families differ in what they report beside it (rho, not R@1).
    """
    rows = _absolute_metrics(con, preds, setup, targets, k, sources, per_seed=False, family="vu")
    for row in rows:
        row["regret"] = None
    return rows
