"""Budget policies: which (source, target, seed) transfer run to train next, until a budget in runs.

Every policy is a plain class with a Tune-Searcher-like interface (the job layer wraps it into a
Ray Tune `Searcher`; analysis imports nothing of Ray):

    policy.propose(n)   -> up to n runs [(source, target, seed), ...], None while it waits for
                           results before planning its next round, or FINISHED at the budget
    policy.observe(run, score)   the run's per-seed score z (see analysis.budget.replay), None = failed
    policy.save() -> dict        JSON-able state;  Policy.restore(state) / policy.load(state) resumes
    policy.ranking()             {target: [sources, best first]} from the fitted predictor
    policy.posterior()           analysis.budget.predictor.Posterior (mean, sd, P(best)) of every pair

Budget accounting: a run costs 1, plus 1 for the target-only baseline of its (target, seed) and 1
for the source training of its (source, seed) the first time either is needed; `spent` counts them
apart (transfers, baselines, sources) when a run is proposed (a failed run is spent). A plan is cut
so that it never exceeds the budget.

Policies:
  racing      1 seed (the first of `seeds`) on every pair, prior's top first; then rounds that give
              each target's current top-k sources (posterior mean + ucb x sd, ucb default 0) their
              next seed; k widens by `k` when the top k hold every seed.
  prior-topk  each target's top-k sources by the prior on every seed, then one model pick per target
              per round (the untrained source with the highest P(best)), every seed.
  active      round 0 as racing; then rounds of `round_size` (default 2 per target) runs chosen by
              value per cost: value = (P(top-5)(1 - P(top-5)) + P(best)(1 - P(best)) / 2) x the
              share of the pair's variance one more seed removes.
`screen` (racing, active) restricts round 0 to each target's top share of sources by the prior
(default 1: every pair); worth it only with a strong prior such as a cheaper setup's grid.
The predictor (`rank`, `shrink`) is analysis.budget.predictor's; rankings are its posterior means.
  random      pairs in random order, every seed of each (the control: random pairs + completion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from analysis.budget.predictor import Posterior, TransferPredictor, _standardise
from analysis.errors import AnalysisError

FINISHED = "FINISHED"
Run = tuple[str, str, int]


class Policy:
    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Policy]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            Policy.registry[cls.name] = cls

    def __init__(self, sources: Sequence[str], targets: Sequence[str], pairs: Sequence[tuple[str, str]],
                 seeds: Sequence[int], budget: int, priors: dict[str, dict[tuple[str, str], float]] | None = None,
                 round_size: int | None = None, seed: int = 0, k: int = 5, rank: int = 0,
                 prior: Sequence[str] | None = None, shrink: float = 0.0, screen: float = 1.0):
        if budget < 1:
            raise AnalysisError(f"budget must be at least 1 run, got {budget}")
        if not seeds:
            raise AnalysisError("a policy needs at least one seed")
        if not 0 < screen <= 1:
            raise AnalysisError(f"screen must be in (0, 1], got {screen}")
        self.screen = screen
        self.sources, self.targets, self.seeds = list(sources), list(targets), [int(s) for s in seeds]
        self.si = {s: i for i, s in enumerate(self.sources)}
        self.ti = {t: i for i, t in enumerate(self.targets)}
        self.valid = np.zeros((len(self.sources), len(self.targets)), bool)
        for s, t in pairs:
            self.valid[self.si[s], self.ti[t]] = True
        self.budget, self.round_size, self.seed, self.k, self.rank = int(budget), round_size, int(seed), int(k), rank
        priors = priors or {}
        unknown = [p for p in (prior or []) if p not in priors]
        if unknown:
            raise AnalysisError(f"prior(s) {', '.join(unknown)} not given (have: {', '.join(priors) or 'none'})")
        self.prior_arrays = {n: self._array(v) for n, v in priors.items()}
        use = list(prior) if prior else list(self.prior_arrays)
        self.prior_score = (np.mean([_standardise(self.prior_arrays[n], self.valid) for n in use], 0)
                            if use else np.zeros(self.valid.shape))
        self.predictor = TransferPredictor(self.valid, self.prior_arrays, rank=rank, shrink=shrink)
        self._reset()

    def _array(self, scores: dict[tuple[str, str], float]) -> np.ndarray:
        a = np.full(self.valid.shape, np.nan)
        for (s, t), v in scores.items():
            if s in self.si and t in self.ti:
                a[self.si[s], self.ti[t]] = v
        return a

    def _reset(self) -> None:
        S, T = self.valid.shape
        self.total, self.count, self.sumsq = np.zeros((S, T)), np.zeros((S, T)), np.zeros((S, T))
        self.observations: dict[Run, float | None] = {}
        self.pending: set[Run] = set()
        self.queue: list[Run] = []
        self.round = 0
        self.finished = False
        self.spent = {"transfers": 0, "baselines": 0, "sources": 0}
        self.baselines_done: set[tuple[str, int]] = set()
        self.sources_done: set[tuple[str, int]] = set()
        self._post: Posterior | None = None

    # -- budget ------------------------------------------------------------------------------------
    @property
    def spent_total(self) -> int:
        return sum(self.spent.values())

    def marginal_cost(self, run: Run, base: set | None = None, src: set | None = None) -> int:
        s, t, k = run
        return 1 + ((t, k) not in (self.baselines_done if base is None else base)) + \
            ((s, k) not in (self.sources_done if src is None else src))

    def _affordable(self, runs: list[Run]) -> list[Run]:
        """The runs of a plan, in order, while the budget lasts (later cheap runs may still fit)."""
        base, src, left, out = set(self.baselines_done), set(self.sources_done), self.budget - self.spent_total, []
        seen: set[Run] = set()
        for r in runs:
            if r in seen or r in self.observations or r in self.pending:
                continue
            c = self.marginal_cost(r, base, src)
            if c <= left:
                out.append(r)
                seen.add(r)
                left -= c
                base.add((r[1], r[2]))
                src.add((r[0], r[2]))
        return out

    # -- the Searcher-like interface -------------------------------------------------------------
    def propose(self, n: int = 1) -> list[Run] | None | str:
        if self.finished:
            return FINISHED
        if not self.queue:
            if self.pending:
                return None
            plan = self._plan()
            self.round += 1
            if self.round_size:
                plan = plan[: self.round_size] if self.round > 1 else plan
            self.queue = self._affordable(plan)
            if not self.queue:
                self.finished = True
                return FINISHED
        out, self.queue = self.queue[:n], self.queue[n:]
        for run in out:
            self._spend(run)
            self.pending.add(run)
        return out

    def _spend(self, run: Run) -> None:
        """A run costs 1, plus its (target, seed) baseline and (source, seed) training the first time."""
        s, t, k = run
        self.spent["transfers"] += 1
        if (t, k) not in self.baselines_done:
            self.baselines_done.add((t, k))
            self.spent["baselines"] += 1
        if (s, k) not in self.sources_done:
            self.sources_done.add((s, k))
            self.spent["sources"] += 1

    def record(self, run: Run, score: float | None) -> None:
        """A run stored before this policy was built (a re-run of the job): spent and observed, as if
        this policy had proposed it."""
        run = (run[0], run[1], int(run[2]))
        if run in self.observations:
            return
        self._spend(run)
        self.observe(run, score)

    def observe(self, run: Run, score: float | None) -> None:
        run = (run[0], run[1], int(run[2]))
        self.pending.discard(run)
        if run in self.observations:
            return
        self.observations[run] = None if score is None else float(score)
        if score is not None and run[0] in self.si and run[1] in self.ti:
            i, j = self.si[run[0]], self.ti[run[1]]
            self.total[i, j] += score
            self.count[i, j] += 1
            self.sumsq[i, j] += score * score
        self._post = None

    def posterior(self) -> Posterior:
        if self._post is None:
            self._post = self.predictor.fit(self.total, self.count, self.sumsq)
        return self._post

    def ranking(self) -> dict[str, list[str]]:
        mean = np.where(self.valid, self.posterior().mean, -np.inf)
        out = {}
        for j, t in enumerate(self.targets):
            order = np.argsort(-mean[:, j], kind="stable")
            out[t] = [self.sources[i] for i in order if self.valid[i, j]]
        return out

    def save(self) -> dict[str, Any]:
        return {"policy": self.name, "round": self.round, "finished": self.finished, "spent": dict(self.spent),
                "observations": [[s, t, k, v] for (s, t, k), v in self.observations.items()],
                "pending": sorted([list(r) for r in self.pending]), "queue": [list(r) for r in self.queue],
                "baselines_done": sorted([list(x) for x in self.baselines_done]),
                "sources_done": sorted([list(x) for x in self.sources_done])}

    def load(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.name:
            raise AnalysisError(f"state of policy '{state.get('policy')}' cannot resume policy '{self.name}'")
        self._reset()
        for s, t, k, v in state["observations"]:
            self.observe((s, t, k), v)
        self.round, self.finished, self.spent = int(state["round"]), bool(state["finished"]), dict(state["spent"])
        self.pending = {(s, t, int(k)) for s, t, k in state["pending"]}
        self.queue = [(s, t, int(k)) for s, t, k in state["queue"]]
        self.baselines_done = {(t, int(k)) for t, k in state["baselines_done"]}
        self.sources_done = {(s, int(k)) for s, k in state["sources_done"]}

    # -- helpers for plans ---------------------------------------------------------------------------
    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.round])

    def _seeds_of(self, i: int, j: int) -> list[int]:
        """Seeds of the pair not yet run or pending, in `seeds` order."""
        s, t = self.sources[i], self.targets[j]
        return [k for k in self.seeds if (s, t, k) not in self.observations and (s, t, k) not in self.pending]

    def _by_rank(self, score: np.ndarray, mask: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Pairs interleaved over targets: every target's best first, then every target's second, ..."""
        m = self.valid if mask is None else self.valid & mask
        s = np.where(m, score, -np.inf)
        order = np.argsort(-s, axis=0, kind="stable")  # (S, T)
        return [(int(order[r, j]), j) for r in range(order.shape[0]) for j in range(order.shape[1])
                if m[order[r, j], j]]

    def _plan(self) -> list[Run]:
        raise NotImplementedError

    def _one_seed_everywhere(self) -> list[Run]:
        """Round 0 of racing / active: the first seed on each target's top `screen` share of sources
        by the prior (default every pair), every target's favourite first."""
        k0 = self.seeds[0]
        keep = np.ceil(self.screen * self.valid.sum(0)).astype(int)
        rank: dict[int, int] = {}
        out = []
        for i, j in self._by_rank(self.prior_score):
            rank[j] = rank.get(j, 0) + 1
            if rank[j] <= keep[j]:
                out.append((self.sources[i], self.targets[j], k0))
        return out


class Racing(Policy):
    name = "racing"

    def __init__(self, *a: Any, ucb: float = 0.0, **kw: Any):
        super().__init__(*a, **kw)
        self.ucb = ucb  # contenders by mean + ucb * sd (0: by the posterior mean)

    def _plan(self) -> list[Run]:
        if self.round == 0:
            return self._one_seed_everywhere()
        post = self.posterior()
        mean = post.mean + self.ucb * post.sd
        k = self.k
        n_max = int(self.valid.sum(0).max())
        while k <= n_max + self.k:
            top = np.zeros(self.valid.shape, bool)
            order = np.argsort(-np.where(self.valid, mean, -np.inf), axis=0, kind="stable")
            for j in range(len(self.targets)):
                top[order[:k, j], j] = True
            runs = []
            for i, j in self._by_rank(mean, top):
                left = self._seeds_of(i, j)
                if left:
                    runs.append((self.sources[i], self.targets[j], left[0]))
            if runs:
                self.k = k
                return runs
            k += self.k
        return []


class PriorTopK(Policy):
    name = "prior-topk"

    def __init__(self, *a: Any, k0: int = 3, **kw: Any):
        super().__init__(*a, **kw)
        self.k0 = k0

    def _pair_runs(self, pairs: list[tuple[int, int]]) -> list[Run]:
        return [(self.sources[i], self.targets[j], k) for i, j in pairs for k in self._seeds_of(i, j)]

    def _plan(self) -> list[Run]:
        if self.round == 0:
            order = self._by_rank(self.prior_score)
            per_target: dict[int, int] = {}
            first = []
            for i, j in order:
                if per_target.get(j, 0) < self.k0:
                    first.append((i, j))
                    per_target[j] = per_target.get(j, 0) + 1
            return self._pair_runs(first)
        pb = self.posterior().p_best(seed=self.seed + self.round)
        untrained = self.valid & (self.count == 0) & ~self._pending_pairs()
        picks = []
        for j in range(len(self.targets)):
            cand = np.where(untrained[:, j], pb[:, j] + 1e-9 * self.prior_score[:, j], -np.inf)
            if np.isfinite(cand.max()):
                picks.append((int(cand.argmax()), j))
        picks.sort(key=lambda p: -pb[p])
        return self._pair_runs(picks)

    def _pending_pairs(self) -> np.ndarray:
        m = np.zeros(self.valid.shape, bool)
        for s, t, _ in self.pending:
            m[self.si[s], self.ti[t]] = True
        return m


class Active(Policy):
    name = "active"

    def __init__(self, *a: Any, w_best: float = 0.5, **kw: Any):
        super().__init__(*a, **kw)
        self.w_best = w_best  # weight of P(best)'s uncertainty next to P(top-5)'s

    def _plan(self) -> list[Run]:
        if self.round == 0:
            return self._one_seed_everywhere()
        post = self.posterior()
        p_top = post.p_best(k=min(5, self.valid.sum(0).min()), seed=self.seed + self.round)
        p1 = post.p_best(seed=self.seed + self.round + 7919)
        var = post.sd ** 2
        sigma2 = self.predictor.sigma2[None, :]
        value = (p_top * (1 - p_top) + self.w_best * p1 * (1 - p1) + 1e-3) * var / (var + sigma2)
        runs, vals = [], []
        for i, j in zip(*np.nonzero(self.valid), strict=True):
            left = self._seeds_of(i, j)
            if left:
                r = (self.sources[i], self.targets[j], left[0])
                runs.append(r)
                vals.append(value[i, j] / self.marginal_cost(r))
        order = np.argsort(-np.asarray(vals), kind="stable")
        size = self.round_size or max(len(self.targets), 1) * 2
        return [runs[o] for o in order[:size]]


class RandomPairs(Policy):
    name = "random"

    def _plan(self) -> list[Run]:
        if self.round > 0:
            return []
        pairs = list(zip(*np.nonzero(self.valid), strict=True))
        self._rng().shuffle(pairs)
        return [(self.sources[i], self.targets[j], k) for i, j in pairs for k in self.seeds]


def make_policy(name: str, **kw: Any) -> Policy:
    if name not in Policy.registry:
        raise AnalysisError(f"unknown budget policy '{name}' (choose from {', '.join(Policy.registry)})")
    return Policy.registry[name](**kw)
