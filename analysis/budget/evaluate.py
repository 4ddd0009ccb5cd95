"""The held-out-seed protocol for budget policies, on replayed grids.

For each of `n_splits` random splits of the setup's 8 seeds into A (`n_seen`, default 4) and the
disjoint B: a policy sees only seeds A (the replay refuses others) and spends a budget that is a
fraction of the full 8-seed grid's runs (transfers + baselines + source trainings); its ranking of
every target's sources (posterior means; untrained pairs predicted) is scored with TaskWeb's NDCG and
Regret@5 against the gold ranking of seeds B (TaskWeb scores over B, P = mean target metric over B).
Next to it, on the same splits: the full grid on A (every pair on every seed of A, no model), the
prior alone (no training), random pairs + completion and prior top-k at the same budget. Everything
is deterministic given `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.budget import metrics as M
from analysis.budget.policies import FINISHED, Policy, make_policy
from analysis.budget.predictor import _standardise
from analysis.budget.replay import Grid, Replay, full_grid_cost
from analysis.errors import AnalysisError

REFERENCES = ("random", "prior-topk")


def seed_splits(seeds: list[int], n_splits: int = 30, n_seen: int = 4, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Distinct random (A, B) splits; A keeps its random order (a policy uses A's seeds in order)."""
    if not 1 <= n_seen < len(seeds):
        raise AnalysisError(f"seeds seen must be between 1 and {len(seeds) - 1}, got {n_seen}")
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(100 * n_splits):
        perm = [seeds[i] for i in rng.permutation(len(seeds))]
        a = perm[:n_seen]
        key = frozenset(a)
        if key not in seen:
            seen.add(key)
            out.append((a, sorted(perm[n_seen:])))
        if len(out) == n_splits:
            break
    return out


def pair_priors(grid: Grid) -> dict[str, dict[tuple[str, str], float]]:
    out = {}
    for name, a in grid.priors.items():
        out[name] = {(grid.sources[i], grid.targets[j]): float(a[i, j])
                     for i, j in zip(*np.nonzero(~np.isnan(a)), strict=True)}
    return out


def run_episode(grid: Grid, policy: str, seen: list[int], budget: int, batch: int = 64, **params: Any
                ) -> tuple[Policy, Replay]:
    """One policy on seeds `seen` until FINISHED; each proposed batch is answered by the replay."""
    replay = Replay(grid, seen)
    pairs = [(grid.sources[i], grid.targets[j]) for i, j in zip(*np.nonzero(grid.pairs), strict=True)]
    pol = make_policy(policy, sources=grid.sources, targets=grid.targets, pairs=pairs, seeds=seen,
                      budget=budget, priors=pair_priors(grid), **params)
    while True:
        runs = pol.propose(batch)
        if runs == FINISHED:
            return pol, replay
        for r in runs or []:
            pol.observe(r, replay.run(*r))


@dataclass
class Row:
    method: str
    fraction: float | None
    spent: list[float]  # per split: all runs / full 8-seed grid
    transfers: list[float]  # per split: transfer runs / full grid's transfers
    ndcg: list[float]
    regret: list[float]

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "fraction": self.fraction, "spent": float(np.mean(self.spent)),
                "transfers": float(np.mean(self.transfers)), "ndcg": float(np.mean(self.ndcg)),
                "ndcg_sd": float(np.std(self.ndcg)), "regret_at_5": float(np.mean(self.regret)),
                "regret_sd": float(np.std(self.regret)), "n_splits": len(self.ndcg)}


def evaluate(grid: Grid, policy: str, fractions: list[float], n_splits: int = 30, n_seen: int = 4,
             seed: int = 0, references: tuple[str, ...] = REFERENCES, prior: list[str] | None = None,
             regret_k: int = 5, keep_runs: bool = False, **params: Any) -> dict[str, Any]:
    """The table rows (per method and fraction, means over splits) and, with keep_runs, every split's
    runs and ranking of `policy` (the `--json` record)."""
    if any(not 0 < f for f in fractions):
        raise AnalysisError(f"budget fractions must be positive, got {fractions}")
    full = full_grid_cost(grid)
    methods = [policy] + [r for r in references if r != policy]
    rows: dict[tuple[str, float | None], Row] = {}
    records = []
    prior_names = prior or list(grid.priors)

    def add(method: str, frac: float | None, pred: np.ndarray, gold: np.ndarray, perf: np.ndarray,
            spent: float, transfers: float) -> None:
        row = rows.setdefault((method, frac), Row(method, frac, [], [], [], []))
        row.ndcg.append(float(M.ndcg(pred, gold, grid.pairs).mean()))
        row.regret.append(float(M.regret(pred, gold, perf, grid.pairs, regret_k).mean()))
        row.spent.append(spent)
        row.transfers.append(transfers)

    for a, b in seed_splits(grid.seeds, n_splits, n_seen, seed):
        mask_a = np.isin(grid.seeds, a)
        mask_b = np.isin(grid.seeds, b)
        gold = grid.score(mask_b)[2]
        perf = grid.perf(mask_b)
        add(f"full grid on A ({len(a)} seeds)", None, grid.score(mask_a)[2], gold, perf,
            full_grid_cost(grid, len(a)).total / full.total, len(a) / len(grid.seeds))
        if prior_names:
            p = np.mean([_standardise(grid.priors[n], grid.pairs) for n in prior_names], 0)
            add(f"prior alone ({'+'.join(prior_names)})", None, p, gold, perf, 0.0, 0.0)
        for frac in fractions:
            budget = int(frac * full.total) if frac <= 1 else int(frac)
            for m in methods:
                pol, rep = run_episode(grid, m, a, budget, prior=prior_names if m != "random" else None, **params)
                post = pol.posterior()
                add(m, frac, post.mean, gold, perf, rep.cost.total / full.total, rep.cost.transfers / full.transfers)
                if keep_runs and m == policy:
                    records.append({"seeds_seen": list(a), "fraction": frac,
                                    "runs": [{"source": s, "target": t, "seed": kk} for s, t, kk in sorted(rep.done)],
                                    "ranking": pol.ranking(),
                                    "spent": {"transfers": rep.cost.transfers, "baselines": rep.cost.baselines,
                                              "sources": rep.cost.sources}})
    return {"setup": grid.setup, "policy": policy, "full_grid_runs": full.total,
            "table": [r.summary() for r in rows.values()], "splits": records}
