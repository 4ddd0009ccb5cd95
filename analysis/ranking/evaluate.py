"""Selection evaluation in the leave-one-out protocol: NDCG and Regret@k per target, per category
and overall, computed in one SQL query for all targets (and all lambdas when tuning).

The metrics themselves come from a named family of `analysis.ranking.families` (default `taskweb`,
which reproduces TaskWeb's Table 2 to 0.01 points in every cell of its RoE, LLM and both TaskShop
rows; `lin` is Lin et al.'s nDCG and Regret@k on seed-averaged absolute target scores, `lin-per-seed`
its per-seed variant, `vu` the rho and NDCG FUTE takes from Vu et al.). k defaults to the family's
paper's own (taskweb 5, lin 1). The protocol around them:
  - targets: TaskWeb data defaults to Table 2's 20 targets (piqa was TaskWeb's held-out task for
    lambda), other data to every target of the setup (`evaluation_plan`);
  - candidates: the family's (sources with transfers into the target, s != t), restricted to a
    named pool of `source_pools` with `pool=` (Lin et al.'s Table 3 evaluates source pools);
  - a category's value is the mean over its targets; `overall` the mean over all targets evaluated.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import yaml

from analysis.errors import AnalysisError
from analysis.ranking.families import get_family, taskweb_metrics
from analysis.selection import selectors as sel
from analysis.store.duck import query_arrow, registered
from analysis.transfer import require_setup

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
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # any parse error is the user's file
        raise AnalysisError(f"category map {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(t, str) for t in v) for k, v in data.items()):
        raise AnalysisError(f"category map {p} must map category names to lists of task names")
    return data


#: where task categories come from when no category map names a task; the `transferlab` CLI (which
#: composes analysis with the job layer) points it at the task registry. analysis itself knows no registry.
CATEGORY_SOURCE: list[Callable[[], dict[str, str]]] = []


def set_category_source(source: Callable[[], dict[str, str]]) -> None:
    CATEGORY_SOURCE[:] = [source]
    _registry_categories.cache_clear()


@functools.lru_cache(maxsize=1)
def _registry_categories() -> dict[str, str]:
    """Task -> category from the configured source (loaded once per process); empty without one."""
    try:
        return CATEGORY_SOURCE[0]() if CATEGORY_SOURCE else {}
    except Exception:  # a broken registry file: categories are only labels
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


def pool_sources(con: duckdb.DuckDBPyConnection, pool: str) -> list[str]:
    """The sources of a named pool (table `source_pools`, filled by imports such as `import its`)."""
    rows = [r[0] for r in con.execute("SELECT source FROM source_pools WHERE pool = ? ORDER BY source",
                                      [pool]).fetchall()]
    if not rows:
        known = [r[0] for r in con.execute("SELECT DISTINCT pool FROM source_pools ORDER BY pool").fetchall()]
        raise AnalysisError(f"unknown source pool '{pool}' (pools: {', '.join(known) or 'none; `import its` adds some'})")
    return rows


def summarise(per_target: list[dict[str, Any]], targets: list[str], category_of: dict[str, str],
              k: int) -> dict[str, Any]:
    """Overall, per-category and per-target values of one variant (fractions; rho a rank)."""
    rk = f"regret_at_{k}"
    by_t = {r["target"]: r for r in per_target}

    def mean(vals: list[float | None]) -> float | None:
        return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)

    def means(ts: list[str]) -> dict[str, Any]:
        return {"ndcg": mean([by_t[t]["ndcg"] for t in ts]), rk: mean([by_t[t]["regret"] for t in ts]),
                "rho": mean([by_t[t]["rank_of_best"] for t in ts])}

    order = list(dict.fromkeys(category_of[t] for t in targets))
    by_category = {c: {**means([t for t in targets if category_of[t] == c]),
                       "n_targets": sum(1 for t in targets if category_of[t] == c)} for c in order}
    by_target = {t: {"category": category_of[t], "ndcg": by_t[t]["ndcg"], rk: by_t[t]["regret"],
                     "rank_of_best": by_t[t]["rank_of_best"],
                     "n_sources": by_t[t]["n_sources"], "predicted_top": list(by_t[t]["pred_top"]),
                     "gold_top": list(by_t[t]["gold_top"]),
                     **({"n_seeds": by_t[t]["n_seeds"]} if by_t[t].get("n_seeds") is not None else {}),
                     **({"by_seed": by_t[t]["by_seed"]} if by_t[t].get("by_seed") is not None else {})}
                for t in targets}
    return {**means(targets), "by_category": by_category, "by_target": by_target}


def evaluate_selection(con: duckdb.DuckDBPyConnection, selector: str, setup: str, lam: float | None = None,
                       k: int | None = None, targets: list[str] | None = None, categories: dict[str, list[str]] | None = None,
                       seed: int = 0, norms: tuple[str, str] | None = None, metrics: str = "taskweb",
                       pool: str | None = None) -> dict[str, Any]:
    """Evaluate one selector on one setup with one metric family, optionally on a named source pool:
    {"metric_family", "pool", "k", "ndcg", "regret_at_k", "rho", "by_category", "by_target", ...}.
    k: the family's paper's k unless given (taskweb 5, lin 1)."""
    family = get_family(metrics)
    k = family.default_k if k is None else k
    targets, category_of = evaluation_plan(con, setup, targets, categories)
    sources = pool_sources(con, pool) if pool is not None else None
    stored = sel.resolve(con, selector, setup=setup, lam=lam, seed=seed, norms=norms)
    preds = query_arrow(con, """SELECT 0 AS variant, target, source, score AS pred FROM selector_pair_scores
                                WHERE selector = $s AND list_contains($targets, target)""",
                        {"s": stored, "targets": targets})
    per_target = family.compute(con, preds, setup, targets, k, sources)
    empty = sorted(set(targets) - {r["target"] for r in per_target})
    if empty:
        raise AnalysisError(f"pool '{pool}' holds no candidate source for target(s) {', '.join(empty)} "
                            f"in setup '{setup}'")
    out = summarise(per_target, targets, category_of, k)
    notes = []
    if not family.regret:
        notes.append(f"the {family.name} family defines no Regret@k (its paper reports rho and NDCG)")
    elif out[f"regret_at_{k}"] is None:
        notes.append(f"Regret@{k} needs transfer runs (per-seed target performance) of setup '{setup}'; "
                     "some are missing, so it is null where they are" if family.name == "taskweb" else
                     f"Regret@{k} is null for targets whose best transfer score is not positive")
    return {"selector": selector, "stored_as": stored, "setup": setup, "metric_family": family.name,
            "pool": pool, "pool_sources": sources,
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
    rows = taskweb_metrics(con, preds, setup, targets, k)
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
