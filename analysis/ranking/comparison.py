"""Every selector on one setup under every metric family asked for, in one table.

Why: a selector is only as good as its standing next to the others on the same measured matrix
(Lin et al.'s CPU experiment, the `taskweb` column being TaskWeb's Table 2). A selector that cannot
be evaluated here (no prompt checkpoints, no embedding space, no sizes) gets its reason instead of
numbers, so the table always says what was tried. Families are never mixed: each column names its
family; the winner is stated per family (highest NDCG), with the margin over the runner-up and, for
families that rank per seed (`lin-per-seed`), the spread of the winner's NDCG over seeds. Each family's
Regret@k uses its paper's k (taskweb 5, lin 1) unless one k is asked for.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.ranking.evaluate import evaluate_selection
from analysis.ranking.families import get_family
from analysis.reports.textout import pct as _pct
from analysis.selection import selectors as sel
from analysis.transfer import require_setup

#: computed from the setup's own checkpoints or embeddings, tried on every setup
SETUP_SELECTORS = ("feature", "feature-l2", "unigram", "max", "max-reverse", "fute")
#: scores that are not a selector of their own (derived, baselines listed separately)
_DERIVED = ("taskshop", "random", "oracle", "size", "feature", "feature-l2", "unigram", "max", "max-reverse", "fute")


def comparison_selectors(con: duckdb.DuckDBPyConnection) -> list[str]:
    """random, size, each stored base selector (roe, llm, semb, ...), the setup selectors, then TaskShop
    over every base and setup selector (F), then the oracle (the gold ranking: the ceiling)."""
    own = [*sel.base_selectors(con, _DERIVED), *SETUP_SELECTORS]
    return ["random", "size", *own, *[f"taskshop-{f}" for f in own], "oracle"]


def _setup_scores(con: duckdb.DuckDBPyConnection, setup: str, seed: int) -> Any:
    """Each setup selector materialised once (reading checkpoints or vectors), its stored name or its error:
    the plain row, TaskShop over it and every family then read the same stored scores."""
    done: dict[str, str | AnalysisError] = {}

    def stored(name: str) -> str:
        if name not in done:
            try:
                done[name] = sel.resolve(con, name, setup=setup, seed=seed)
            except AnalysisError as e:
                done[name] = e
        if isinstance(done[name], AnalysisError):
            raise done[name]
        return str(done[name])
    return stored


def _seed_means(res: dict[str, Any]) -> dict[Any, float]:
    """Per seed, the mean NDCG over the targets that every seed ranked (families ranking per seed)."""
    per_target = [v.get("by_seed") for v in res["by_target"].values()]
    if not per_target or any(not s for s in per_target):
        return {}
    seeds = set.intersection(*({r["seed"] for r in s} for s in per_target))
    return {seed: statistics.fmean(next(r["ndcg"] for r in s if r["seed"] == seed) for s in per_target)
            for seed in sorted(seeds, key=str)}


def compare_all(con: duckdb.DuckDBPyConnection, setup: str, families: list[str], k: int | None = None, seed: int = 0,
                selectors: list[str] | None = None, pool: str | None = None) -> dict[str, Any]:
    """{"setup", "k": {family: k}, "families", "rows": [{"selector", <family>: {...} | {"error"}}], "winners"}.

    Each family's k is `k` if given, else its paper's; it shrinks to the fewest candidate sources of any
    target when that is smaller."""
    fams = {f: get_family(f) for f in families}
    fewest = con.execute("""SELECT min(n) FROM (SELECT count(*) AS n FROM analysis_transfers
                            WHERE setup = ? AND source <> target GROUP BY target)""", [setup]).fetchone()[0]
    if fewest is None:
        require_setup(con, setup)
        raise AnalysisError(f"setup '{setup}' has no transfer between distinct tasks to rank")
    ks = {f: min(fam.default_k if k is None else k, fewest) for f, fam in fams.items()}
    stored = _setup_scores(con, setup, seed)
    rows: list[dict[str, Any]] = []
    for name in selectors or comparison_selectors(con):
        row: dict[str, Any] = {"selector": name}
        f = name[len("taskshop-"):] if name.startswith("taskshop-") else None
        for fam in families:
            try:
                used = (stored(name) if name in SETUP_SELECTORS
                        else f"taskshop-{stored(f)}" if f in SETUP_SELECTORS else name)
                res = evaluate_selection(con, used, setup, k=ks[fam], seed=seed, metrics=fam, pool=pool)
            except AnalysisError as e:
                row[fam] = {"error": str(e)}
                continue
            seeds = _seed_means(res)
            row[fam] = {"ndcg": res["ndcg"], "regret": res[f"regret_at_{ks[fam]}"], "rho": res["rho"],
                        "n_targets": len(res["by_target"]),
                        "stored_as": res["stored_as"], "seed_ndcg": seeds}
        rows.append(row)
    return {"setup": setup, "k": ks, "families": families, "pool": pool, "rows": rows,
            "winners": {f: winner(rows, f) for f in families}}


def winner(rows: list[dict[str, Any]], family: str) -> dict[str, Any] | None:
    """The selector with the highest NDCG under `family` (the oracle, the ceiling, excluded), the margin
    over the best selector scoring lower (ties are listed), and the spread of its NDCG over seeds where the
    family ranks per seed."""
    ok = [(r["selector"], r[family]) for r in rows
          if r["selector"] != "oracle" and "ndcg" in r.get(family, {}) and r[family]["ndcg"] is not None
          and not math.isnan(r[family]["ndcg"])]
    if not ok:
        return None
    ok.sort(key=lambda x: (-x[1]["ndcg"], x[0]))
    name, best = ok[0]
    ties = [n for n, v in ok[1:] if v["ndcg"] == best["ndcg"]]
    runner = next((x for x in ok[1:] if x[1]["ndcg"] < best["ndcg"]), None)  # the best that scores lower
    seeds = list(best["seed_ndcg"].values())
    return {"selector": name, "ndcg": best["ndcg"], "regret": best["regret"], "rho": best.get("rho"),
            "runner_up": runner[0] if runner else None,
            "margin": best["ndcg"] - runner[1]["ndcg"] if runner else None,
            "ties": ties,
            "seed_min": min(seeds) if seeds else None, "seed_max": max(seeds) if seeds else None,
            "seed_sd": statistics.pstdev(seeds) if len(seeds) > 1 else None, "n_seeds": len(seeds)}




def _rank(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def winner_sentences(res: dict[str, Any]) -> list[str]:
    """What the table says, in words: per family, who wins and by how much."""
    out = []
    for fam, w in res["winners"].items():
        if w is None:
            out.append(f"{fam}: no selector could be evaluated")
            continue
        text = f"{fam}: {w['selector']} ranks best, NDCG {_pct(w['ndcg'])}%, " + (
            f"Regret@{res['k'][fam]} {_pct(w['regret'])}%" if get_family(fam).regret else f"rho {_rank(w['rho'])}")
        if w["runner_up"] is not None:
            text += f", {_pct(w['margin'])} NDCG points above {w['runner_up']}"
        if w["ties"]:
            text += f" (tied with {', '.join(w['ties'])})"
        if w["n_seeds"] > 1:
            text += (f"; over {w['n_seeds']} seeds its NDCG ranges {_pct(w['seed_min'])}-{_pct(w['seed_max'])}% "
                     f"(sd {_pct(w['seed_sd'])})")
        out.append(text)
    return out


def table_rows(res: dict[str, Any]) -> tuple[list[str], list[tuple], list[str]]:
    """(columns, rows, reasons): per family NDCG % and its second measure (Regret@k %, or rho where the
    family defines no Regret@k) for each selector; a selector that could not be evaluated shows n/a, and
    its reason (once) is in `reasons`."""
    fams = res["families"]
    second = {f: f"Regret@{res['k'][f]} %" if get_family(f).regret else "rho" for f in fams}
    cols = ["selector", *[f"{f} {m}" for f in fams for m in ("NDCG %", second[f])]]
    rows, reasons = [], []
    for r in res["rows"]:
        cells = [r["selector"]]
        for f in fams:
            v = r[f]
            if "error" in v:
                cells += ["n/a", "n/a"]
                if f"{r['selector']}: {v['error']}" not in reasons:
                    reasons.append(f"{r['selector']}: {v['error']}")
            else:
                cells += [_pct(v["ndcg"]), _pct(v["regret"]) if get_family(f).regret else _rank(v["rho"])]
        rows.append(tuple(cells))
    return cols, rows, reasons
