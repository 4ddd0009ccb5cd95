"""The `budget:` block of a pairwise config (issue 19, point 1), as data.

    budget:
      runs: 0.2            # a fraction (0 < runs <= 1) of the full grid's runs, or an absolute count (> 1)
      policy: racing       # racing | prior-topk | active | random  (analysis.budget.policies)
      priors: [roe, llm]   # stored selectors the policy may use before training anything
      round_size: null     # runs per planned round (null: the policy's natural round)
      k: 5                 # contenders per target (racing) / picks kept in the top (active's P(top-k))
      rank: 0              # low-rank residual of the predictor (0: additive + priors only)
      screen: 1.0          # racing / active: round 0 on each target's top share of sources by the priors

Interface the job layer builds on (the lead wraps it into a dependency-aware Ray Tune Searcher):
  - `BudgetConfig.budget_runs(full_grid_runs)` -> the absolute budget, where `full_grid_runs` counts
    the full grid's source trainings, target-only baselines and transfers over all of its seeds;
  - `BudgetConfig.policy_kwargs()` -> keyword arguments of `analysis.budget.policies.make_policy`
    (besides sources, targets, pairs, seeds, budget and priors, which come from the job's plan and
    the store: priors = {name: {(source, target): score}} from `selector_pair_scores`);
  - the Searcher's `suggest` calls `policy.propose(1)` (None -> wait, FINISHED -> Searcher.FINISHED)
    and turns the (source, target, seed) into a transfer trial whose source and baseline runs the
    dependency-aware Searcher schedules first; `on_trial_complete` calls `policy.observe(run, z)` with
    the per-seed score z = 0.5 (p - b) / b + 0.1 [p > b] - 0.05 (b = the seed's baseline; None when the
    trial failed); `save`/`restore` store `policy.save()` (JSON) and call `policy.load(state)`.
A cheaper setup's grid as a prior (e.g. t5s for t5l) is a stored selector too: `oracle[<setup>]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from analysis.errors import AnalysisError

PolicyName = Literal["racing", "prior-topk", "active", "random"]


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: float = Field(gt=0, description="fraction (<= 1) of the full grid's runs, or an absolute number (> 1)")
    policy: PolicyName = "racing"
    priors: list[str] = Field(default_factory=list, description="stored selector names usable before training")
    round_size: int | None = Field(default=None, ge=1)
    k: int = Field(default=5, ge=1)
    rank: int = Field(default=0, ge=0)
    screen: float = Field(default=1.0, gt=0, le=1)

    @field_validator("runs")
    @classmethod
    def _whole(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"an absolute budget is a whole number of runs, got {v}")
        return v

    def budget_runs(self, full_grid_runs: int) -> int:
        """The budget in runs against a full grid of `full_grid_runs` runs."""
        if full_grid_runs < 1:
            raise AnalysisError("the full grid has no runs")
        n = int(self.runs * full_grid_runs) if self.runs <= 1 else int(self.runs)
        return max(n, 1)

    def policy_kwargs(self) -> dict[str, Any]:
        return {"round_size": self.round_size, "k": self.k, "rank": self.rank, "screen": self.screen,
                "prior": list(self.priors) or None}
