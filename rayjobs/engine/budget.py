"""A budgeted pairwise grid: the dependency searcher runs only what a budget policy proposes.

With `budget:` in a pairwise config (`analysis.budget.config.BudgetConfig`), the plan is still the
full grid (so run keys and resume are unchanged), but the Tune searcher admits a transfer only when the
policy (`analysis.budget.policies`: racing, prior-topk, active, random) proposes its (source, target,
seed), together with the source training and the target-only baseline it needs; the policy learns each
transfer's per-seed score as Tune reports it, and the run ends (Searcher.FINISHED) at the budget. Runs
never proposed are not missing: the closing lines count them as skipped by the budget, and
`transferlab predict-transfers` fills the matrix for them (`predicted_transfer_scores`).

A re-run replays the stored transfers into a fresh policy (spent and observed), so it resumes where
the last run stopped; the budget counts runs against the full grid's source x target x seed runs,
baselines and source trainings included.
"""

from __future__ import annotations

from typing import Any

from analysis.budget.policies import make_policy
from rayjobs.plan import TrialSpec


def transfer_z(score: float, baseline: float) -> float:
    """One seed's transfer score, the unit TaskWeb's score averages: 0.5 PC + 0.5 (0.2 PM - 0.1)."""
    rel = (score - baseline) / baseline if baseline else 0.0
    return 0.5 * rel + 0.1 * float(score > baseline) - 0.05


class BudgetGate:
    """What the dependency searcher may release: the runs of proposed transfers (see module doc)."""

    FINISHED = "FINISHED"

    def __init__(self, policy: Any, trials: list[TrialSpec], stored: dict[str, float]):
        self.policy = policy
        self.specs = {t.run_key: t for t in trials}
        self.transfers = {(t.source, t.target, t.seed): t for t in trials if t.kind == "transfer"}
        self.scores: dict[str, float] = dict(stored)  # run key -> score of stored/finished runs
        self.admitted: set[str] = set()
        self.finished = False
        for run, t in self.transfers.items():  # a re-run: what is stored was spent and observed
            if t.run_key in stored and t.baseline_run_key in stored:
                self.admitted |= {t.run_key, t.source_run_key or "", t.baseline_run_key or ""}
                policy.record(run, transfer_z(stored[t.run_key], stored[t.baseline_run_key]))

    def extra_deps(self, key: str) -> list[str]:
        """A transfer also waits for its baseline: the policy learns from the pair's score."""
        t = self.specs.get(key)
        return [t.baseline_run_key] if t is not None and t.kind == "transfer" and t.baseline_run_key else []

    def admit(self) -> bool | str | None:
        """Ask the policy for its next run: True (admitted), None (it waits for results), FINISHED."""
        if self.finished:
            return self.FINISHED
        out = self.policy.propose(1)
        if out == self.FINISHED:
            self.finished = True
            return self.FINISHED
        if not out:
            return None
        for run in out:
            t = self.transfers.get((run[0], run[1], int(run[2])))
            if t is None:  # the policy only proposes pairs of the plan
                raise RuntimeError(f"budget policy proposed {run}, which the plan does not hold")
            self.admitted |= {t.run_key, *(k for k in (t.source_run_key, t.baseline_run_key) if k)}
        return True

    def complete(self, key: str, result: dict[str, Any] | None, ok: bool) -> None:
        t = self.specs.get(key)
        if t is None:
            return
        if ok and result and result.get("score") is not None:
            self.scores[key] = float(result["score"])
        if t.kind == "transfer":
            b = self.scores.get(t.baseline_run_key or "")
            z = transfer_z(self.scores[key], b) if ok and key in self.scores and b is not None else None
            self.policy.observe((t.source, t.target, t.seed), z)

    def spent(self) -> dict[str, int]:
        return dict(self.policy.spent)


def budget_gate(cfg: Any, trials: list[TrialSpec], store: Any) -> BudgetGate | None:
    """The gate of a config's `budget:` block (None without one): the policy over the plan's grid, its
    priors from the store's selectors, the stored runs replayed."""
    if getattr(cfg, "budget", None) is None:
        return None

    b = cfg.budget
    transfers = [t for t in trials if t.kind == "transfer"]
    if len({t.setup.key for t in trials}) != 1:
        raise ValueError("a budgeted grid has one setup (the policy ranks sources per target of one setup)")
    sources = list(dict.fromkeys(t.source for t in transfers))
    targets = list(dict.fromkeys(t.target for t in transfers))
    pairs = list(dict.fromkeys((t.source, t.target) for t in transfers))
    seeds = list(dict.fromkeys(t.seed for t in transfers))
    priors = _priors(store, b.priors, transfers[0].setup.key) if b.priors else None
    policy = make_policy(b.policy, sources=sources, targets=targets, pairs=pairs, seeds=seeds,
                         budget=b.budget_runs(len(trials)), priors=priors, **b.policy_kwargs())
    stored = {}
    runs = store.read_runs(["run_key", "status", "score"]).to_pylist()
    keys = {t.run_key for t in trials}
    for r in runs:
        if r["run_key"] in keys and r["status"] == "ok" and r["score"] is not None:
            stored[r["run_key"]] = float(r["score"])
    return BudgetGate(policy, trials, stored)


def _priors(store: Any, names: list[str], setup: str) -> dict[str, dict[tuple[str, str], float]]:
    """{selector: {(source, target): score}} from the store's `selector_scores` (e.g. roe, llm)."""
    with store.connect(read_only=True) as con:
        rows = con.execute("SELECT selector, source, target, score FROM selector_scores "
                           "WHERE list_contains($n, selector)", {"n": names}).fetchall()
    out: dict[str, dict[tuple[str, str], float]] = {n: {} for n in names}
    for sel, s, t, v in rows:
        out[sel][(s, t)] = float(v)
    missing = [n for n in names if not out[n]]
    if missing:
        raise ValueError(f"budget.priors: no stored scores for {', '.join(missing)} (import or compute them "
                         f"first, e.g. `transferlab compute-selector roe`; setup {setup})")
    return out
