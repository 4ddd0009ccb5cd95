"""Evaluating FUTE's selections (paper 004) next to the baselines, on one table per use.

Source / model selection: a selector's scores F(s -> t) rank the candidate sources of every target; the
ranking is scored against a transfer matrix in the store (the measured local one, or the published
TaskWeb one) with the `taskweb` metric family (`analysis.metric_families`: NDCG over gold ranks with gain
2^rel - 1 and discount log2(i + 2); Regret@k = relative drop of the mean target performance of the
predicted top-k vs the gold top-k), in the leave-one-out protocol of `analysis.ranking`, plus
  rho  (FUTE Sec. 4.1.1, from Vu et al. 2020): the mean over targets of the 1-based position, in the
       predicted ranking (score descending, ties by source name), of the candidate with the highest transfer
       score T(s -> t) (several equally best: the best placed). Lower is better; 1 is perfect.
The random baseline is the mean over `random_seeds` seeded random rankings. Every row says whether the
method uses labelled target data: FUTE's DTE is trained on the target's labelled examples (the few-shot
ones for TaskShop's F); RoE and LLM-similarity read target examples with their answer choices.

Prompt selection: per task, one model's prompts ranked by FUTE (cos(MTE(model + prompt), DTE(task))) and by
the unlabelled baselines of `analysis.prompt_selection` (MI, LocalE, GlobalE, ZPS log/prob/vote, SPELL,
random), scored against each prompt's measured accuracy with Performance, Rate, NDCG and the rank of the
best prompt. SPELL needs the rendered prompt's perplexity under the black box; it is reported as not
applicable where the black box has none (a sentence-embedding scorer).

Note on FUTE's released code: its NDCG helper assigns the gold relevances to the wrong positions (it
sorts by gold, then scatters the sorted gold values by the predicted order's indices), so it does not
compute NDCG as defined; the definitions above and in `analysis.prompt_selection.ndcg` are the papers'.
"""

from __future__ import annotations

from typing import Any

import duckdb
import numpy as np

from analysis import selectors as sel
from analysis.errors import AnalysisError
from analysis.prompt_selection import evaluate_prompt_selection
from analysis.prompt_selection import summarise as summarise_prompts
from analysis.ranking import evaluate_selection
from analysis.task_embeddings import embedding_rows, rank_prompts, resolve_space, store_fute

#: what each method reads of the target, for every comparison table
TARGET_DATA = {
    "fute": "labelled target examples (its DTE)",
    "roe": "target examples with their answer choices (no labels)",
    "llm": "task descriptions / examples (no labels)",
    "random": "nothing",
}


def rank_of_best(con: duckdb.DuckDBPyConnection, stored: str, setup: str, targets: list[str],
                 sources: list[str] | None = None) -> dict[str, int]:
    """Per target: the 1-based predicted position of the source with the highest T(s -> t) (see module doc)."""
    rows = con.execute("""
        WITH g AS (SELECT source, target, score AS gold FROM analysis_transfers
                   WHERE setup = $setup AND list_contains($targets, target) AND source <> target
                     AND (CAST($sources AS VARCHAR[]) IS NULL OR list_contains($sources, source))),
             j AS (SELECT g.*, p.score AS pred FROM g
                   JOIN selector_pair_scores p ON p.selector = $s AND p.source = g.source AND p.target = g.target),
             r AS (SELECT *, row_number() OVER (PARTITION BY target ORDER BY pred DESC, source) AS prank,
                          max(gold) OVER (PARTITION BY target) AS best FROM j)
        SELECT target, min(prank) FILTER (WHERE gold = best) FROM r GROUP BY target ORDER BY target""",
                       {"setup": setup, "targets": targets, "sources": sources, "s": stored}).fetchall()
    return {t: int(k) for t, k in rows}


def evaluate_method(con: duckdb.DuckDBPyConnection, selector: str, setup: str, k: int = 5,
                    targets: list[str] | None = None, pool: str | None = None, lam: float | None = None
                    ) -> dict[str, Any]:
    """NDCG, Regret@k and rho of one selector on one setup (fractions; rho a rank)."""
    res = evaluate_selection(con, selector, setup, lam=lam, k=k, targets=targets, pool=pool)
    evaluated = list(res["by_target"])
    ranks = rank_of_best(con, res["stored_as"], setup, evaluated, res["pool_sources"])
    return {"selector": selector, "stored_as": res["stored_as"], "setup": setup, "k": k, "ndcg": res["ndcg"],
            "regret": res[f"regret_at_{k}"], "rho": float(np.mean([ranks[t] for t in evaluated])),
            "n_targets": len(evaluated), "n_candidates": float(np.mean([v["n_sources"] for v in res["by_target"].values()])),
            "by_target": {t: {**v, "rank_of_best": ranks[t]} for t, v in res["by_target"].items()},
            "lambda": res["lambda"]}


def evaluate_random(con: duckdb.DuckDBPyConnection, setup: str, k: int = 5, targets: list[str] | None = None,
                    pool: str | None = None, seeds: int = 10) -> dict[str, Any]:
    """The mean of `seeds` seeded random rankings (each `random[seed=i]`)."""
    runs = [evaluate_method(con, "random", setup, k, targets, pool) if i == 0 else
            _random_seed(con, i, setup, k, targets, pool) for i in range(seeds)]
    regrets = [r["regret"] for r in runs]
    return {"selector": f"random (mean of {seeds} seeds)", "setup": setup, "k": k,
            "ndcg": float(np.mean([r["ndcg"] for r in runs])),
            "regret": None if any(v is None for v in regrets) else float(np.mean(regrets)),
            "rho": float(np.mean([r["rho"] for r in runs])), "n_targets": runs[0]["n_targets"],
            "n_candidates": runs[0]["n_candidates"], "lambda": None}


def _random_seed(con: duckdb.DuckDBPyConnection, seed: int, setup: str, k: int, targets: list[str] | None,
                 pool: str | None) -> dict[str, Any]:
    sel.compute_random(con, seed)
    return evaluate_method(con, f"random[seed={seed}]", setup, k, targets, pool)


def source_selection_table(con: duckdb.DuckDBPyConnection, methods: list[tuple[str, str, str]], setups: list[str],
                           k: int = 5, targets: list[str] | None = None, pool: str | None = None,
                           random_seeds: int = 10) -> list[dict[str, Any]]:
    """One row per (method, setup): `methods` are (label, selector name, what it reads of the target);
    the selector 'random' is averaged over seeds. A method that cannot be evaluated on a setup (no scores for
    its tasks) gets a row with its error."""
    out = []
    for setup in setups:
        for label, selector, reads in methods:
            try:
                if selector == "random":
                    res = evaluate_random(con, setup, k, targets, pool, random_seeds)
                else:
                    res = evaluate_method(con, selector, setup, k, targets, pool)
                out.append({"method": label, "reads_of_target": reads, **res})
            except AnalysisError as e:
                out.append({"method": label, "reads_of_target": reads, "setup": setup, "selector": selector,
                            "error": str(e)})
    return out


def ensure_pool(con: duckdb.DuckDBPyConnection, name: str, sources: list[str]) -> str:
    """Store a named candidate-source pool (table `source_pools`), replacing one of the same name."""
    if not sources:
        raise AnalysisError(f"source pool '{name}' would be empty")
    con.execute("DELETE FROM source_pools WHERE pool = ?", [name])
    con.executemany("INSERT INTO source_pools VALUES (?, ?, 'fute')", [[name, s] for s in sorted(set(sources))])
    return name


def taskshop_with_fute(con: duckdb.DuckDBPyConnection, space: str, setups: list[str], k: int = 5,
                       data: str | None = None, tune_on: list[str] | None = None,
                       random_seeds: int = 10) -> dict[str, Any]:
    """FUTE's DTE cosine as TaskShop's few-shot estimate F, on the published TaskWeb setups, next to RoE,
    LLM-similarity, their TaskShops and random (TaskWeb's Table 2 protocol: leave-one-out, 20 targets).

    TaskShop-FUTE is reported with TaskWeb's lambda = 0.7 (tuned for RoE on piqa) and with lambda tuned for
    FUTE on the held-out piqa the same way (`analysis.ranking.tune_lambda`, by NDCG on the first setup)."""
    from analysis.ranking import tune_lambda

    f = store_fute(con, space, "dte", data)
    tuned = tune_lambda(con, f, setups[0], heldout=tune_on, metric="ndcg", k=k)["best_lambda"]
    rows = source_selection_table(con, [
        ("FUTE (DTE cosine)", f, TARGET_DATA["fute"] + ", 32 few-shot"),
        ("TaskShop-FUTE (lambda 0.7)", f"taskshop-{f}", TARGET_DATA["fute"] + ", 32 few-shot"),
        ("RoE", "roe", TARGET_DATA["roe"]), ("TaskShop-RoE", "taskshop-roe", TARGET_DATA["roe"]),
        ("LLM-similarity", "llm", TARGET_DATA["llm"]), ("TaskShop-LLM", "taskshop-llm", TARGET_DATA["llm"]),
        ("random", "random", TARGET_DATA["random"])], setups, k, random_seeds=random_seeds)
    for setup in setups:
        try:
            res = evaluate_method(con, f"taskshop-{f}", setup, k, lam=tuned)
            rows.append({"method": f"TaskShop-FUTE (lambda {tuned:g}, tuned on piqa)",
                         "reads_of_target": TARGET_DATA["fute"] + ", 32 few-shot", **res})
        except AnalysisError as e:
            rows.append({"method": "TaskShop-FUTE (tuned)", "setup": setup, "error": str(e)})
    return {"space": resolve_space(con, space), "fute_selector": f, "tuned_lambda": tuned, "rows": rows}


# -- prompt selection -----------------------------------------------------------------------------------------
def eval_score_keys(con: duckdb.DuckDBPyConnection, model: str, task: str, prompts: list[str]) -> list[str]:
    """The eval-split scoring run of each prompt (template) of `model` on `task` (the score job's rows)."""
    rows = con.execute("""SELECT json_extract_string(metrics, '$.template') AS template, max(run_key)
                          FROM runs WHERE kind = 'score' AND status = 'ok' AND model = ? AND target = ?
                            AND json_extract_string(metrics, '$.split') = 'eval'
                          GROUP BY template""", [model, task]).fetchall()
    have = dict(rows)
    missing = [p for p in prompts if p not in have]
    if missing:
        raise AnalysisError(f"no eval-split scoring of model '{model}' on '{task}' for prompt(s) {', '.join(missing)} "
                            "(run the embed job with mte.score_eval: true)")
    return [have[p] for p in prompts]


def prompt_selection(con: duckdb.DuckDBPyConnection, space: str, model: str, task: str, seed: int = 0,
                     data: str | None = None) -> dict[str, Any]:
    """FUTE next to every applicable unlabelled baseline on one task (see `evaluate_prompt_selection`), plus
    where each method puts the prompts named 'bad-*' and the cosine between duplicated prompts' MTEs."""
    ranked = rank_prompts(con, space, task, model, data)
    fute = {x["prompt"]: x["cosine"] for x in ranked["ranking"]}
    keys = eval_score_keys(con, model, task, sorted(fute))
    res = evaluate_prompt_selection(con, task, keys=keys, seed=seed, split="eval",  # every applicable baseline
                                    external_scores={"fute": fute}, external_uses_labels=True)
    n = len(res["prompts"])
    res["bad_positions"] = {m: sorted(v["ranking"].index(p) + 1 for p in res["prompts"] if p.startswith("bad"))
                            for m, v in res["methods"].items()}
    res["n_prompts"] = n
    res["space"] = ranked["space"]
    res["duplicates"] = _duplicates(con, ranked["space"], model, task, res)
    return res


def _duplicates(con: duckdb.DuckDBPyConnection, space: str, model: str, task: str,
                res: dict[str, Any]) -> list[dict[str, Any]]:
    """Prompts named '<p>-copy': the cosine of their MTE with p's, and their positions in FUTE's ranking."""
    from analysis.task_embeddings import cosine

    by_prompt = {r["prompt"]: r["run_key"] for r in embedding_rows(con, space=space, kind="MTE", task=task)
                 if r["model"] == model}
    out = []
    order = res["methods"]["fute"]["ranking"]
    for p in res["prompts"]:
        if p.endswith("-copy") and p[:-5] in by_prompt:
            out.append({"prompt": p[:-5], "copy": p, "mte_cosine": cosine(con, by_prompt[p[:-5]], by_prompt[p]),
                        "positions": [order.index(p[:-5]) + 1, order.index(p) + 1]})
    return out


def prompt_selection_summary(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method the means over tasks (performance, rate, NDCG, rho) as `analysis.prompt_selection.summarise`."""
    return summarise_prompts(results)
