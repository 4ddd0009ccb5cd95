"""`transferlab select-prompts`: the zero-shot prompt-selection comparison of FUTE (paper 004, Table 3) on a store.

Per task, one model's prompts (its eval-split scoring runs) ranked by every baseline of
`analysis.prompts.selection` the stored rows allow (MI, LocalE, GlobalE, ZPS log/prob/vote, SPELL, Self-Select,
random) and, with `--space`, by FUTE (cos(MTE(model + prompt), DTE(task)) in that embedding space); each
ranking scored against the prompts' measured accuracy (Performance, Rate, NDCG, rank of the best prompt),
then averaged over the tasks as the paper does. Reads only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from analysis.cli.common import add_command, dump, json_flag, names, pct, table
from analysis.errors import AnalysisError

ORDER = ["mi", "local_e", "global_e", "zps_log", "zps_prob", "zps_vote", "spell", "self_select", "fute", "random"]


def _tasks_of(con: Any, model: str) -> list[str]:
    rows = con.execute("""SELECT DISTINCT p.task FROM predictions p JOIN runs r ON r.run_key = p.key
                          WHERE r.kind = 'score' AND r.status = 'ok' AND r.model = ? AND p.split = 'eval'
                          ORDER BY 1""", [model]).fetchall()
    if not rows:
        have = [r[0] for r in con.execute("SELECT DISTINCT model FROM runs WHERE kind = 'score' ORDER BY 1").fetchall()]
        raise AnalysisError(f"no eval-split scoring runs of model '{model}'; scored models: "
                            f"{', '.join(have) if have else 'none (run a score or embed job first)'}")
    return [r[0] for r in rows]


def compare_prompts(con: Any, model: str, tasks: list[str] | None = None, space: str | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Per task the comparison (see the module docstring), and the means over tasks per method."""
    from analysis.prompts.selection import (  # lazy: duckdb only when a store is opened
        evaluate_prompt_selection,
        summarise,
    )
    from analysis.selection.fute_eval import prompt_selection  # lazy: duckdb only when a store is opened

    results = []
    for task in tasks or _tasks_of(con, model):
        if space:
            results.append(prompt_selection(con, space, model, task, seed=seed))
        else:
            res = evaluate_prompt_selection(con, task, model=model, split="eval", seed=seed)
            res["not_applicable"] = {**res["not_applicable"], "fute": "no --space given (FUTE needs an embedding space)"}
            results.append(res)
    return {"model": model, "space": space, "tasks": results, "summary": summarise(results)}


def _ordered(methods: dict[str, Any]) -> list[str]:
    return sorted(methods, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def _cmd(args: argparse.Namespace) -> int:
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    with read_store(args.db) as con:
        out = compare_prompts(con, args.model, args.tasks, args.space, args.seed)
    if args.json:
        dump(out)
        return 0
    for res in out["tasks"]:
        print(f"task {res['task']}: {len(res['prompts'])} prompts on {res['n_examples']} examples; "
              f"best {res['best']} ({pct(res['true_scores'][res['best']])}%)")
        table(["method", "selected", "performance", "rate", "ndcg", "rank of best", "uses labels"],
              [(m, v["selected"], pct(v["performance"]), pct(v["rate"]), pct(v["ndcg"]), v["rank_of_best"],
                v["uses_labels"]) for m, v in ((m, res["methods"][m]) for m in _ordered(res["methods"]))])
        for m, why in res.get("not_applicable", {}).items():
            print(f"  {m}: not applicable ({why})")
    s = out["summary"]
    print(f"mean over {len(out['tasks'])} task(s) (FUTE Table 3: performance, rate and NDCG in %):")
    table(["method", "performance", "rate", "ndcg", "rho (mean rank of best)"],
          [(m, pct(s[m]["performance"]), pct(s[m]["rate"]), pct(s[m]["ndcg"]), f"{s[m]['rho']:.2f}")
           for m in _ordered(s)])
    return 0


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `select-prompts`."""
    p = add_command(sub, default_db, "select-prompts",
                    "zero-shot prompt selection: MI, LocalE, GlobalE, ZPS, SPELL, Self-Select, FUTE, random", _cmd,
                    "FUTE's Table 3 on this store: per task one model's prompts ranked by each method and scored "
                    "against their measured accuracy, then the means over tasks. A method the stored rows do not "
                    "allow (SPELL without perplexities, Self-Select without meta-prompt rows, FUTE without --space) "
                    "is listed with why. Reads the store without changing it.")
    p.add_argument("--model", required=True, help="black-box name of the scoring runs (runs.model) (required)")
    p.add_argument("--tasks", type=names, help="tasks, comma-separated (default: every task the model scored)")
    p.add_argument("--space", help="FUTE embedding space (name or id) to rank by cos(MTE, DTE) (default: no FUTE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    json_flag(p)
