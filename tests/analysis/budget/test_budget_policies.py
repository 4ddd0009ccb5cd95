"""Budget policies on hand-made matrices where the right next run is known; budget accounting;
save / restore; the `budget:` config block."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from analysis.budget.config import BudgetConfig
from analysis.budget.policies import FINISHED, make_policy
from analysis.errors import AnalysisError

SOURCES = ["a", "b", "c", "d"]
TARGETS = ["x", "y"]
PAIRS = [(s, t) for s in SOURCES for t in TARGETS]
# true per-seed scores: a is best for x, c for y; b close behind a on x
TRUE = {("a", "x"): 0.30, ("b", "x"): 0.25, ("c", "x"): 0.0, ("d", "x"): -0.2,
        ("a", "y"): -0.1, ("b", "y"): 0.0, ("c", "y"): 0.40, ("d", "y"): 0.1}
PRIOR = {"roe": {("d", "x"): 3.0, ("a", "x"): 2.0, ("b", "x"): 1.0, ("c", "x"): 0.0,
                 ("c", "y"): 3.0, ("b", "y"): 2.0, ("d", "y"): 1.0, ("a", "y"): 0.0}}


def _policy(name: str, budget: int = 1000, seeds=(1, 2, 3), **kw):
    return make_policy(name, sources=SOURCES, targets=TARGETS, pairs=PAIRS, seeds=list(seeds), budget=budget,
                       priors=PRIOR, **kw)


def _answer(pol, runs):
    for s, t, k in runs:
        pol.observe((s, t, k), TRUE[(s, t)] + 0.01 * (k - 2))


def test_racing_first_one_seed_on_every_pair_then_the_contenders():
    pol = _policy("racing", k=1)
    first = pol.propose(100)
    assert sorted(first) == sorted((s, t, 1) for s, t in PAIRS)
    assert first[:2] == [("d", "x", 1), ("c", "y", 1)]  # each target's prior favourite first
    assert pol.propose(1) is None  # waiting for results before it plans round 2
    _answer(pol, first)
    assert sorted(pol.propose(100)) == [("a", "x", 2), ("c", "y", 2)]  # each target's leader gets seed 2


def test_prior_topk_trains_the_priors_top_then_the_model_pick():
    pol = _policy("prior-topk", k0=1, seeds=(1, 2))
    first = pol.propose(100)
    assert first == [("d", "x", 1), ("d", "x", 2), ("c", "y", 1), ("c", "y", 2)]
    _answer(pol, first)
    second = pol.propose(100)
    assert {(s, t) for s, t, _ in second} <= set(PAIRS) - {("d", "x"), ("c", "y")}
    assert len({t for _, t, _ in second}) == 2 and len(second) == 4  # one pick per target, every seed


def test_active_spends_on_the_undecided_target():
    pol = _policy("active", round_size=1)
    first = pol.propose(100)
    _answer(pol, first)
    # x: a (0.29) and b (0.24) are close; y: c (0.39) is far ahead. The next run decides x.
    nxt = pol.propose(1)
    assert nxt[0][1] == "x" and nxt[0][0] in ("a", "b")


def test_budget_accounting_counts_baselines_and_sources_and_stops():
    pol = _policy("racing", budget=5)
    runs = pol.propose(100)
    # (d, x, 1): transfer + baseline (x, 1) + source (d, 1) = 3; (c, y, 1): + baseline (y, 1) + source (c, 1) = 3 > 2
    # left; (a, x, 1) = transfer + source (a, 1) = 2 -> 5 in all
    assert runs == [("d", "x", 1), ("a", "x", 1)]
    assert pol.spent == {"transfers": 2, "baselines": 1, "sources": 2} and pol.spent_total == 5
    _answer(pol, runs)
    assert pol.propose(1) == FINISHED and pol.propose(1) == FINISHED


def test_budget_fraction_against_the_full_grid():
    from analysis.budget.replay import Cost

    full = Cost(transfers=3528, baselines=168, sources=176).total
    assert full == 3872
    assert BudgetConfig(runs=0.2).budget_runs(full) == 774
    assert BudgetConfig(runs=500, policy="active").budget_runs(full) == 500
    with pytest.raises(ValidationError, match="whole number"):
        BudgetConfig(runs=1.5)
    with pytest.raises(ValidationError):
        BudgetConfig(runs=0.2, policy="greedy")
    with pytest.raises(ValidationError):
        BudgetConfig(runs=0.2, rounds=3)
    kw = BudgetConfig(runs=0.2, priors=["roe"], round_size=8).policy_kwargs()
    pol = make_policy("active", sources=SOURCES, targets=TARGETS, pairs=PAIRS, seeds=[1], budget=10,
                      priors=PRIOR, **kw)
    assert pol.round_size == 8


def test_save_restore_resumes_exactly():
    ref = _policy("active", budget=30)
    first = ref.propose(100)
    _answer(ref, first)
    state = json.loads(json.dumps(ref.save()))
    cont = _policy("active", budget=30)
    cont.load(state)
    assert cont.spent == ref.spent
    for pol in (ref, cont):
        out = []
        while (runs := pol.propose(3)) != FINISHED:
            _answer(pol, runs)
            out += runs
        pol.out = out
    assert ref.out == cont.out and ref.ranking() == cont.ranking()
    assert ref.spent_total <= 30
    with pytest.raises(AnalysisError, match="cannot resume"):
        _policy("racing").load(state)


def test_ranking_and_errors():
    pol = _policy("random", seeds=(1,))
    while (runs := pol.propose(4)) != FINISHED:
        _answer(pol, runs)
    assert pol.ranking() == {"x": ["a", "b", "c", "d"], "y": ["c", "d", "b", "a"]}
    post = pol.posterior()
    assert np.all(post.sd > 0) and post.p_best()[SOURCES.index("c"), TARGETS.index("y")] > 0.5
    with pytest.raises(AnalysisError, match="unknown budget policy"):
        make_policy("greedy", sources=SOURCES, targets=TARGETS, pairs=PAIRS, seeds=[1], budget=5)
    with pytest.raises(AnalysisError, match="prior"):
        _policy("racing", prior=["semb"])
    with pytest.raises(AnalysisError, match="at least 1 run"):
        _policy("racing", budget=0)


def test_screen_limits_round_zero_to_the_priors_top_share():
    pol = _policy("active", screen=0.5)
    assert pol.propose(100) == [("d", "x", 1), ("c", "y", 1), ("a", "x", 1), ("b", "y", 1)]
    with pytest.raises(AnalysisError, match="screen"):
        _policy("racing", screen=0.0)
    with pytest.raises(ValidationError):
        BudgetConfig(runs=0.2, screen=1.5)
