"""Evaluating FUTE's selections (paper 004) next to the baselines, on one table per use.

Source / model selection: a selector's scores F(s -> t) rank the candidate sources of every target; the
ranking is scored against a transfer matrix in the store (the measured local one, or the published
TaskWeb one) in the leave-one-out protocol of `analysis.ranking.evaluate`, with the metrics FUTE reports (Sec. 4.1.1:
"we follow (Vu et al., 2020; Zhou et al., 2022)"): the `vu` metric family of `analysis.ranking.families`,
  rho   the mean over targets of the 1-based position, in the predicted ranking (score descending, ties by
        source name), of the candidate with the highest transfer gain, i.e. the highest seed-averaged
        target score (several equally best: the best placed). Lower is better; 1 is perfect;
  NDCG  relevance = the seed-averaged target score in percent, gain 2^rel - 1, discount log2(i + 1) at the
        1-based predicted position i, over the whole ranking, divided by the same sum in the true order.
Where FUTE is compared with TaskShop on TaskWeb's Table 2 setups, TaskWeb's own metrics (`taskweb`: NDCG
over gold ranks of T(s -> t), Regret@5) stand next to them, as Table 2 reports them. The random baseline
is the mean over `random_seeds` seeded random rankings. Every row says whether the method uses labelled
target data: FUTE's DTE is trained on the target's labelled examples (the few-shot ones for TaskShop's F);
RoE and LLM-similarity read target examples with their answer choices.

Prompt selection: per task, one model's prompts ranked by FUTE (cos(MTE(model + prompt), DTE(task))) and by
the unlabelled baselines of `analysis.prompts.selection` (MI, LocalE, GlobalE, ZPS log/prob/vote, SPELL,
random), scored against each prompt's measured accuracy with Performance, Rate, NDCG and the rank of the
best prompt. SPELL needs the rendered prompt's perplexity under the black box; it is reported as not
applicable where the black box has none (a sentence-embedding scorer).

Note on FUTE's released code: its NDCG helper assigns the gold relevances to the wrong positions (it
sorts by gold, then scatters the sorted gold values by the predicted order's indices), so it does not
compute NDCG as defined; the definitions above and in `analysis.prompts.selection.ndcg` are the papers'.
"""

from __future__ import annotations

from typing import Any

import duckdb
import numpy as np

from analysis.errors import AnalysisError
from analysis.prompts.selection import evaluate_prompt_selection
from analysis.prompts.selection import summarise as summarise_prompts
from analysis.ranking.evaluate import evaluate_selection, tune_lambda
from analysis.selection import selectors as sel
from analysis.selection.fute import cosine, embedding_rows, rank_prompts, resolve_space, store_fute

#: what each method reads of the target, for every comparison table
TARGET_DATA = {
    "fute": "labelled target examples (its DTE)",
    "roe": "target examples with their answer choices (no labels)",
    "llm": "task descriptions / examples (no labels)",
    "random": "nothing",
}


#: FUTE's own metrics (Sec. 4.1.1, after Vu et al. 2020), and TaskWeb's next to them against TaskShop
FUTE_FAMILY = "vu"
TASKSHOP_FAMILIES = ("vu", "taskweb")


def evaluate_method(con: duckdb.DuckDBPyConnection, selector: str, setup: str, k: int | None = None,
                    targets: list[str] | None = None, pool: str | None = None, lam: float | None = None,
                    metrics: str = FUTE_FAMILY) -> dict[str, Any]:
    """NDCG, Regret@k (null where the family defines none) and rho of one selector on one setup under one
    metric family (fractions; rho a rank); k: the family's paper's unless given."""
    res = evaluate_selection(con, selector, setup, lam=lam, k=k, targets=targets, pool=pool, metrics=metrics)
    k = res["k"]
    return {"selector": selector, "stored_as": res["stored_as"], "setup": setup, "metric_family": metrics, "k": k,
            "ndcg": res["ndcg"], "regret": res[f"regret_at_{k}"], "rho": res["rho"],
            "n_targets": len(res["by_target"]),
            "n_candidates": float(np.mean([v["n_sources"] for v in res["by_target"].values()])),
            "by_target": res["by_target"], "lambda": res["lambda"]}


def evaluate_random(con: duckdb.DuckDBPyConnection, setup: str, k: int | None = None,
                    targets: list[str] | None = None, pool: str | None = None, seeds: int = 10,
                    metrics: str = FUTE_FAMILY) -> dict[str, Any]:
    """The mean of `seeds` seeded random rankings (each `random[seed=i]`)."""
    runs = [evaluate_method(con, "random", setup, k, targets, pool, metrics=metrics) if i == 0 else
            _random_seed(con, i, setup, k, targets, pool, metrics) for i in range(seeds)]
    regrets = [r["regret"] for r in runs]
    return {"selector": f"random (mean of {seeds} seeds)", "setup": setup, "metric_family": metrics,
            "k": runs[0]["k"], "ndcg": float(np.mean([r["ndcg"] for r in runs])),
            "regret": None if any(v is None for v in regrets) else float(np.mean(regrets)),
            "rho": float(np.mean([r["rho"] for r in runs])), "n_targets": runs[0]["n_targets"],
            "n_candidates": runs[0]["n_candidates"], "lambda": None}


def _random_seed(con: duckdb.DuckDBPyConnection, seed: int, setup: str, k: int | None, targets: list[str] | None,
                 pool: str | None, metrics: str) -> dict[str, Any]:
    sel.compute_random(con, seed)
    return evaluate_method(con, f"random[seed={seed}]", setup, k, targets, pool, metrics=metrics)


def _evaluate(con: duckdb.DuckDBPyConnection, selector: str, setup: str, k: int | None, targets: list[str] | None,
              pool: str | None, random_seeds: int, metrics: str, lam: float | None = None) -> dict[str, Any]:
    if selector == "random":
        return evaluate_random(con, setup, k, targets, pool, random_seeds, metrics)
    return evaluate_method(con, selector, setup, k, targets, pool, lam, metrics)


def _one_row(con: duckdb.DuckDBPyConnection, label: str, selector: str, reads: str, setup: str, k: int | None,
             targets: list[str] | None, pool: str | None, random_seeds: int, families: tuple[str, ...],
             lam: float | None = None) -> dict[str, Any]:
    """The row of one method: the first family's values at the top level, every other family's under its
    name; an error (no scores for its tasks) as the row's `error`."""
    try:
        first, *rest = [_evaluate(con, selector, setup, k, targets, pool, random_seeds, f, lam) for f in families]
    except AnalysisError as e:
        return {"method": label, "reads_of_target": reads, "setup": setup, "selector": selector, "error": str(e)}
    return {"method": label, "reads_of_target": reads, **first,
            **{f: {m: r[m] for m in ("ndcg", "regret", "rho", "k")} for f, r in zip(families[1:], rest, strict=True)}}


def source_selection_table(con: duckdb.DuckDBPyConnection, methods: list[tuple[str, str, str]], setups: list[str],
                           k: int | None = None, targets: list[str] | None = None, pool: str | None = None,
                           random_seeds: int = 10, families: tuple[str, ...] = (FUTE_FAMILY,)
                           ) -> list[dict[str, Any]]:
    """One row per (method, setup): `methods` are (label, selector name, what it reads of the target);
    the selector 'random' is averaged over seeds. A method that cannot be evaluated on a setup (no scores for
    its tasks, no transfer runs for `vu`'s target scores) gets a row with its error."""
    return [_one_row(con, label, selector, reads, setup, k, targets, pool, random_seeds, families)
            for setup in setups for label, selector, reads in methods]


def ensure_pool(con: duckdb.DuckDBPyConnection, name: str, sources: list[str]) -> str:
    """Store a named candidate-source pool (table `source_pools`), replacing one of the same name."""
    if not sources:
        raise AnalysisError(f"source pool '{name}' would be empty")
    con.execute("DELETE FROM source_pools WHERE pool = ?", [name])
    con.executemany("INSERT INTO source_pools VALUES (?, ?, 'fute')", [[name, s] for s in sorted(set(sources))])
    return name


def taskshop_with_fute(con: duckdb.DuckDBPyConnection, space: str, setups: list[str], k: int | None = None,
                       data: str | None = None, tune_on: list[str] | None = None,
                       random_seeds: int = 10) -> dict[str, Any]:
    """FUTE's DTE cosine as TaskShop's few-shot estimate F, on the published TaskWeb setups, next to RoE,
    LLM-similarity, their TaskShops and random (TaskWeb's Table 2 protocol: leave-one-out, 20 targets), each
    row with FUTE's metrics (`vu`: NDCG, rho) and TaskWeb's (`taskweb`: NDCG, Regret@5) beside them.

    TaskShop-FUTE is reported with TaskWeb's lambda = 0.7 (tuned for RoE on piqa) and with lambda tuned for
    FUTE on the held-out piqa the same way (`analysis.ranking.evaluate.tune_lambda`: TaskWeb's NDCG, first setup)."""
    f = store_fute(con, space, "dte", data)
    tuned = tune_lambda(con, f, setups[0], heldout=tune_on, metric="ndcg")["best_lambda"]
    rows = source_selection_table(con, [
        ("FUTE (DTE cosine)", f, TARGET_DATA["fute"] + ", 32 few-shot"),
        ("TaskShop-FUTE (lambda 0.7)", f"taskshop-{f}", TARGET_DATA["fute"] + ", 32 few-shot"),
        ("RoE", "roe", TARGET_DATA["roe"]), ("TaskShop-RoE", "taskshop-roe", TARGET_DATA["roe"]),
        ("LLM-similarity", "llm", TARGET_DATA["llm"]), ("TaskShop-LLM", "taskshop-llm", TARGET_DATA["llm"]),
        ("random", "random", TARGET_DATA["random"])], setups, k, random_seeds=random_seeds,
        families=TASKSHOP_FAMILIES)
    rows += [_one_row(con, f"TaskShop-FUTE (lambda {tuned:g}, tuned on piqa)", f"taskshop-{f}",
                      TARGET_DATA["fute"] + ", 32 few-shot", setup, k, None, None, random_seeds, TASKSHOP_FAMILIES,
                      lam=tuned) for setup in setups]
    return {"space": resolve_space(con, space), "fute_selector": f, "tuned_lambda": tuned, "rows": rows,
            "families": list(TASKSHOP_FAMILIES)}


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
    """Per method the means over tasks (performance, rate, NDCG, rho) as `analysis.prompts.selection.summarise`."""
    return summarise_prompts(results)
