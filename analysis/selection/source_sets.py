"""Multi-task source sets for a target (paper 000, sections 4.2 and 5.2-5.3): the top-k, bottom-k
and a random k sources by any selector, or by the stored transfers themselves (`oracle`, the
paper's TaskWeb rows of Tables 3-5). The multi-task sweep job consumes the returned lists.

Ranking ties keep the alphabetical order of source names, as in the evaluation. The random set is
drawn without replacement from the candidates *in name order* with numpy's generator seeded by
`seed`, so it depends only on which sources are candidates, not on the selector's scores: the
paper's "Random" row (Table 5) is one baseline, not one per selector.
"""

from __future__ import annotations

from typing import Any

import duckdb
import numpy as np

from analysis.errors import AnalysisError
from analysis.selection import selectors as sel


def select_sources(con: duckdb.DuckDBPyConnection, target: str, selector: str, k: int = 5,
                   setup: str | None = None, lam: float | None = None, seed: int = 0,
                   exclude: list[str] | None = None) -> dict[str, Any]:
    """{"target", "selector", "k", "top", "bottom", "random", "ranking"} for one target."""
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")
    stored = sel.resolve(con, selector, setup=setup, lam=lam, seed=seed)
    rows = con.execute("""SELECT source, score FROM selector_pair_scores
                          WHERE selector = ? AND target = ? AND source <> target AND NOT isnan(score)
                          ORDER BY score DESC, source""", [stored, target]).fetchall()
    if exclude:
        rows = [r for r in rows if r[0] not in set(exclude)]
    if not rows:
        raise AnalysisError(f"selector '{selector}' has no scores for target '{target}' "
                            f"(no few-shot examples, or no transfers into it in the setup?)")
    if k > len(rows):
        raise AnalysisError(f"k={k} but target '{target}' has only {len(rows)} candidate sources")
    ranked = [r[0] for r in rows]
    by_name = sorted(ranked)
    rng = np.random.default_rng(seed)
    random_k = [by_name[i] for i in rng.choice(len(by_name), size=k, replace=False)]
    return {"target": target, "selector": selector, "stored_as": stored, "setup": setup, "k": k, "seed": seed,
            "top": ranked[:k], "bottom": ranked[::-1][:k], "random": random_k,
            "ranking": [{"source": s, "score": v} for s, v in rows]}
