"""Selection evaluation in the paper's leave-one-out protocol: NDCG and Regret@k per target, per
category and overall, computed in one SQL query for all targets (and all lambdas when tuning).

Definitions, exactly as TaskWeb's taskshop/{roe,llm,taskshop}_evaluate.py and metrics.py compute
Table 2 (checked to 0.01 points against every cell of its RoE, LLM and both TaskShop rows):
  - candidates for target t: every source with a transfer score T(s -> t) in the setup (s != t;
    21 for TaskWeb: squad_v2 included);
  - gold ranking: candidates by T(s -> t) descending; predicted ranking: by selector score
    descending; ties keep the alphabetical order of source names (Python's stable sort over
    TaskWeb's alphabetical task list);
  - NDCG: relevance of a source = n - (its 0-based gold rank), gain 2^rel - 1, discount
    log2(i + 2) at predicted position i, divided by the same sum in gold order;
  - Regret@k: P = mean over seeds of the target metric of the transfer runs (view
    `target_performance`); regret = (mean P of gold top-k - mean P of predicted top-k) / mean P of
    gold top-k; a fraction (the paper prints percent);
  - a category's value is the mean over its targets; `overall` is the mean over all targets
    evaluated (Table 2's "Mean": 20 targets; piqa was TaskWeb's held-out task for lambda).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from analysis import selectors as sel
from analysis.analytics import require_setup
from analysis.db import query_arrow, registered
from analysis.errors import AnalysisError

# Table 2 of paper 000 (TaskWeb's category2task): piqa is the held-out task and not in it.
TASKWEB_CATEGORIES: dict[str, list[str]] = {
    "nli": ["anli_r3", "cb", "qnli", "rte", "snli", "scitail"],
    "paraphrase": ["mrpc", "qqp", "stsb"],
    "commonsense": ["copa", "cosmosqa", "hellaswag", "quartz", "socialiqa", "winogrande"],
    "sentiment": ["imdb", "rotten_tomatoes"],
    "qa": ["boolq"],
    "semantics": ["wic", "wsc"],
}
TASKWEB_HELDOUT = ["piqa"]


def load_categories(path: str | Path) -> dict[str, list[str]]:
    """A category map from a JSON or YAML file: {category: [task, ...]}."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"category map {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # any parse error is the user's file
        raise AnalysisError(f"category map {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(t, str) for t in v) for k, v in data.items()):
        raise AnalysisError(f"category map {p} must map category names to lists of task names")
    return data


@functools.lru_cache(maxsize=1)
def _registry_categories() -> dict[str, str]:
    """Table 1 categories of the task registry (loaded once per process)."""
    try:
        from rayjobs.tasks import TaskRegistry

        reg = TaskRegistry.load()
        return {name: reg.get(name).category or "other" for name in reg.names}
    except Exception:  # no registry: categories are only labels
        return {}


def _registry_category(task: str) -> str:
    return _registry_categories().get(task, "other")


def evaluation_plan(con: duckdb.DuckDBPyConnection, setup: str, targets: list[str] | None = None,
                    categories: dict[str, list[str]] | None = None) -> tuple[list[str], dict[str, str]]:
    """Targets to evaluate and the category of each.

    TaskWeb data (every score of the setup imported from TaskWeb) defaults to Table 2's 20
    targets and categories; other data to all targets of the setup, categorised by the map where
    it lists them, else by the task registry (Table 1 categories), else 'other'.
    """
    require_setup(con, setup)
    have = {r[0] for r in con.execute("SELECT DISTINCT target FROM analysis_transfers WHERE setup = ?",
                                      [setup]).fetchall()}
    provs = [r[0] for r in con.execute(
        "SELECT DISTINCT provenance FROM setup_transfers WHERE setup = ? OR ? = 'mean'", [setup, setup]).fetchall()]
    taskweb = bool(provs) and all(p.startswith("taskweb") for p in provs)
    cmap = categories if categories is not None else TASKWEB_CATEGORIES
    listed = {t: c for c, ts in cmap.items() for t in ts}
    if targets is None:
        if taskweb or categories is not None:
            targets = [t for ts in cmap.values() for t in ts if t in have]
        else:
            targets = sorted(have)
    missing = [t for t in targets if t not in have]
    if missing:
        raise AnalysisError(f"no transfer scores into target(s) {', '.join(missing)} in setup '{setup}'")
    if not targets:
        raise AnalysisError(f"no evaluation targets: none of the category map's tasks has transfer scores in "
                            f"setup '{setup}' (targets there: {', '.join(sorted(have))}); pass --targets")
    return targets, {t: listed.get(t) or _registry_category(t) for t in targets}


def ranking_metrics(con: duckdb.DuckDBPyConnection, preds: pa.Table, setup: str, targets: list[str],
                    k: int = 5) -> list[dict[str, Any]]:
    """NDCG and Regret@k per (variant, target) for predictions (variant, target, source, pred)."""
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")
    with registered(con, "_preds", preds):
        gaps = con.execute("""
            WITH g AS (SELECT source, target FROM analysis_transfers
                       WHERE setup = $setup AND list_contains($targets, target) AND source <> target)
            SELECT v.variant, g.target, count(p.pred) AS n_scored,
                   list(g.source ORDER BY g.source) FILTER (WHERE p.pred IS NULL OR isnan(p.pred)) AS missing
            FROM g CROSS JOIN (SELECT DISTINCT variant FROM _preds) v
            LEFT JOIN _preds p ON p.variant = v.variant AND p.target = g.target AND p.source = g.source
            GROUP BY v.variant, g.target HAVING len(missing) > 0 ORDER BY g.target LIMIT 1""",
                           {"setup": setup, "targets": targets}).fetchall()
        if gaps:
            _, target, n_scored, missing = gaps[0]
            why = " (no few-shot examples for it?)" if n_scored == 0 else ""
            raise AnalysisError(f"the selector has no score for target '{target}' from source(s) "
                                f"{', '.join(missing)}{why}")
        rows = con.execute("""
            WITH g AS (SELECT source, target, score AS gold FROM analysis_transfers
                       WHERE setup = $setup AND list_contains($targets, target) AND source <> target),
                 j AS (SELECT p.variant, g.target, g.source, g.gold, p.pred, tp.perf
                       FROM g JOIN _preds p ON p.target = g.target AND p.source = g.source
                       LEFT JOIN target_performance tp
                              ON tp.setup = $setup AND tp.source = g.source AND tp.target = g.target),
                 r AS (SELECT *, count(*) OVER w AS n,
                              row_number() OVER (PARTITION BY variant, target ORDER BY gold DESC, source) - 1 AS grank,
                              row_number() OVER (PARTITION BY variant, target ORDER BY pred DESC, source) - 1 AS prank
                       FROM j WINDOW w AS (PARTITION BY variant, target))
            SELECT variant, target, any_value(n) AS n_sources,
                   sum((pow(2, n - grank) - 1) / log2(prank + 2)) / sum((pow(2, n - grank) - 1) / log2(grank + 2)) AS ndcg,
                   avg(perf) FILTER (WHERE grank < $k) AS gold_perf,
                   avg(perf) FILTER (WHERE prank < $k) AS pred_perf,
                   count(*) FILTER (WHERE (grank < $k OR prank < $k) AND perf IS NULL) AS perf_missing,
                   CASE WHEN perf_missing = 0 THEN (gold_perf - pred_perf) / gold_perf END AS regret,
                   list(source ORDER BY prank) FILTER (WHERE prank < $k) AS pred_top,
                   list(source ORDER BY grank) FILTER (WHERE grank < $k) AS gold_top
            FROM r GROUP BY variant, target ORDER BY variant, target""",
                           {"setup": setup, "targets": targets, "k": k}).fetchall()
    cols = ["variant", "target", "n_sources", "ndcg", "gold_perf", "pred_perf", "perf_missing", "regret",
            "pred_top", "gold_top"]
    return [dict(zip(cols, r, strict=True)) for r in rows]


def summarise(per_target: list[dict[str, Any]], targets: list[str], category_of: dict[str, str],
              k: int) -> dict[str, Any]:
    """Overall, per-category and per-target values of one variant (fractions)."""
    rk = f"regret_at_{k}"
    by_t = {r["target"]: r for r in per_target}

    def mean(vals: list[float | None]) -> float | None:
        return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)

    order = list(dict.fromkeys(category_of[t] for t in targets))
    by_category = {c: {"ndcg": mean([by_t[t]["ndcg"] for t in targets if category_of[t] == c]),
                       rk: mean([by_t[t]["regret"] for t in targets if category_of[t] == c]),
                       "n_targets": sum(1 for t in targets if category_of[t] == c)} for c in order}
    by_target = {t: {"category": category_of[t], "ndcg": by_t[t]["ndcg"], rk: by_t[t]["regret"],
                     "n_sources": by_t[t]["n_sources"], "predicted_top": list(by_t[t]["pred_top"]),
                     "gold_top": list(by_t[t]["gold_top"])} for t in targets}
    return {"ndcg": mean([by_t[t]["ndcg"] for t in targets]), rk: mean([by_t[t]["regret"] for t in targets]),
            "by_category": by_category, "by_target": by_target}


def evaluate_selection(con: duckdb.DuckDBPyConnection, selector: str, setup: str, lam: float | None = None,
                       k: int = 5, targets: list[str] | None = None, categories: dict[str, list[str]] | None = None,
                       seed: int = 0, norms: tuple[str, str] | None = None) -> dict[str, Any]:
    """Evaluate one selector on one setup: {"ndcg", "regret_at_k", "by_category", "by_target", ...}."""
    targets, category_of = evaluation_plan(con, setup, targets, categories)
    stored = sel.resolve(con, selector, setup=setup, lam=lam, seed=seed, norms=norms)
    preds = query_arrow(con, """SELECT 0 AS variant, target, source, score AS pred FROM selector_pair_scores
                                WHERE selector = $s AND list_contains($targets, target)""",
                        {"s": stored, "targets": targets})
    per_target = ranking_metrics(con, preds, setup, targets, k)
    out = summarise(per_target, targets, category_of, k)
    notes = []
    if out[f"regret_at_{k}"] is None:
        notes.append(f"Regret@{k} needs transfer runs (per-seed target performance) of setup '{setup}'; "
                     "some are missing, so it is null where they are")
    return {"selector": selector, "stored_as": stored, "setup": setup,
            "lambda": (sel.DEFAULT_LAMBDA if lam is None else lam) if selector.startswith("taskshop-") else None,
            "k": k, **out, "notes": notes}


def tune_lambda(con: duckdb.DuckDBPyConnection, f_selector: str, setup: str, heldout: list[str] | None = None,
                grid: list[float] | None = None, metric: str = "ndcg", k: int = 5,
                norms: tuple[str, str] | None = None) -> dict[str, Any]:
    """Pick TaskShop's lambda on held-out targets (TaskWeb held out piqa); all lambdas in one query."""
    heldout = heldout or list(TASKWEB_HELDOUT)
    grid = grid if grid is not None else [round(0.1 * i, 1) for i in range(11)]
    if metric not in ("ndcg", "regret"):
        raise AnalysisError(f"tune metric must be 'ndcg' or 'regret', got '{metric}'")
    if any(not 0.0 <= x <= 1.0 for x in grid):
        raise AnalysisError("lambda grid values must lie in [0, 1]")
    targets, _ = evaluation_plan(con, setup, heldout)
    comp = sel.taskshop_components(con, setup, f_selector, norms, targets)
    with registered(con, "_comp", comp):
        preds = query_arrow(con, """SELECT l AS variant, target, source, l * pivot_term + (1 - l) * direct_term AS pred
                                    FROM _comp CROSS JOIN (SELECT unnest($grid::DOUBLE[]) AS l)""", {"grid": grid})
    rows = ranking_metrics(con, preds, setup, targets, k)
    table = []
    for lam in grid:
        per = [r for r in rows if abs(r["variant"] - lam) < 1e-12]
        ndcgs = [r["ndcg"] for r in per]
        regs = [r["regret"] for r in per]
        table.append({"lambda": lam, "ndcg": sum(ndcgs) / len(ndcgs),
                      f"regret_at_{k}": None if any(v is None for v in regs) else sum(regs) / len(regs)})
    key = "ndcg" if metric == "ndcg" else f"regret_at_{k}"
    valid = [r for r in table if r[key] is not None]
    if not valid:
        raise AnalysisError(f"cannot tune on {metric}: the held-out targets lack transfer runs for Regret@{k}")
    best = max(valid, key=lambda r: r[key]) if metric == "ndcg" else min(valid, key=lambda r: r[key])
    return {"f": f_selector, "setup": setup, "heldout": targets, "metric": key, "best_lambda": best["lambda"],
            "grid": table}
