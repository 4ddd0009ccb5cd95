"""Transfer analytics: hand-computed small cases, the paper's quoted values, and loop references."""

from __future__ import annotations

import math

import loop_reference as ref
import pytest
from analysis_support import TASKWEB, needs_taskweb, taskweb_db

from analysis import transfer as an
from analysis.errors import AnalysisError
from analysis.store.duck import open_store


def _publish(con, setup: str, scores: dict[tuple[str, str], float]) -> None:
    """Store transfer scores T as published rows (pm = 0.5 makes T = 0.5 * pc exactly)."""
    adaptation, model = setup.split(":")
    con.executemany("INSERT INTO published_transfer_scores VALUES (?, ?, ?, ?, ?, 0.5, 'test')",
                    [(model, adaptation, s, t, 2 * v) for (s, t), v in scores.items()])


# A 3-task web, every direction known (scores T):
#   a->b +0.04  b->a -0.01  a->c +0.03  c->a +0.02  b->c +0.05  c->b -0.02
SMALL = {("a", "b"): 0.04, ("b", "a"): -0.01, ("a", "c"): 0.03, ("c", "a"): 0.02, ("b", "c"): 0.05, ("c", "b"): -0.02}


@pytest.fixture
def small(tmp_path):
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        _publish(con, "ft:m1", SMALL)
        _publish(con, "ft:m2", {k: -v for k, v in SMALL.items()})
        yield con


def test_commutativity_hand_computed(small):
    c = an.commutativity(small, "ft:m1")
    # {a,b}: +,- no; {a,c}: +,+ yes; {b,c}: +,- no
    assert (c["n_pairs"], c["n_commutative"]) == (3, 1)
    assert [(p["task_a"], p["task_b"], p["commutative"]) for p in c["pairs"]] == [
        ("a", "b", False), ("a", "c", True), ("b", "c", False)]


def test_transitivity_hand_computed(small):
    t = an.transitivity(small, [0.0, 0.03], ["ft:m1"]).set_index("threshold")
    # positive edges a->b .04, a->c .03, c->a .02, b->c .05; triples A->B->C, A != C:
    #   a->b->c: a->c = +0.03 positive;  c->a->b: c->b = -0.02 negative;  b->c->a: b->a = -0.01 negative
    #   (a->c->a and c->a->c have A == C)
    assert (t.loc[0.0, "n_triples"], t.loc[0.0, "n_positive"]) == (3, 1)
    # above 0.03 only a->b->c survives (a->c = 0.03 and c->a = 0.02 are not above it)
    assert (t.loc[0.03, "n_triples"], t.loc[0.03, "n_positive"], t.loc[0.03, "fraction"]) == (1, 1, 1.0)


def test_mean_setup_and_similarity_hand_computed(small):
    # m2 = -m1: the mean is 0 everywhere, the similarity -1
    m = an.transfer_matrix(small, "mean")
    assert m.loc["a", "b"] == pytest.approx(0.0, abs=1e-15)
    sim = an.setup_similarity(small)
    assert sim.loc["ft:m1", "ft:m2"] == pytest.approx(-1.0)
    assert sim.loc["ft:m1", "ft:m1"] == pytest.approx(1.0)


def test_errors_name_the_problem(small, tmp_path):
    with pytest.raises(AnalysisError, match="no transfer scores for setup 'ft:nope'; setups with data: ft:m1, ft:m2"):
        an.commutativity(small, "ft:nope")
    with open_store(tmp_path / "empty.duckdb", create=True) as con:
        with pytest.raises(AnalysisError, match="the store holds no transfer scores"):
            an.transitivity(con)
    with pytest.raises(AnalysisError, match="no results database at"):
        with open_store(tmp_path / "missing.duckdb"):
            pass


@needs_taskweb
def test_paper_quoted_transfers():
    """Section 3.2 quotes three averaged transfers: CosmosQA->SocialIQA +0.15, QQP->CosmosQA -0.12, SocialIQA->RTE +0.10."""
    with open_store(taskweb_db()) as con:
        m = an.transfer_matrix(con, "mean")
    assert round(m.loc["cosmosqa", "socialiqa"], 2) == 0.15
    assert round(m.loc["qqp", "cosmosqa"], 2) == -0.12
    assert round(m.loc["socialiqa", "rte"], 2) == 0.10
    assert m.shape == (22, 21) and math.isnan(m.loc["cb", "cb"])


@needs_taskweb
def test_taskweb_analytics_match_loop_reference():
    setups = ref.load_transfer_csv(TASKWEB / "transfer_scores.csv")
    setups["mean"] = ref.mean_setup(setups)
    th = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]
    with open_store(taskweb_db()) as con:
        trans = an.transitivity(con, th)
        sim = an.setup_similarity(con)
        for name in [s for s in setups if s != "all:all"]:
            n, same = ref.commutativity(setups[name])
            c = an.commutativity(con, name)
            assert (c["n_pairs"], c["n_commutative"]) == (n, same) and n == 210
            got = trans[trans.setup == name].sort_values("threshold")
            want = ref.transitivity(setups[name], th)
            assert list(zip(got.threshold, got.n_triples, got.n_positive, strict=True)) == want
    real = [s for s in setups if s not in ("all:all", "mean")]
    assert sorted(sim.index) == sorted(real)
    for a in real:
        for b in real:
            assert sim.loc[a, b] == pytest.approx(ref.similarity(setups[a], setups[b]), abs=1e-12)


@needs_taskweb
def test_taskweb_transitivity_rises_with_threshold():
    """The paper's finding (Fig. 3): stricter A->B, B->C thresholds make A->C more often positive."""
    with open_store(taskweb_db()) as con:
        t = an.transitivity(con, setups=["mean"])
    assert list(t.fraction) == sorted(t.fraction)
    assert t.fraction.iloc[0] > 0.75 and t.fraction.iloc[-1] > 0.95
