"""Prompt-selection baselines and metrics (paper 004) against hand-computed cases and direct formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.prompts import selection as ps
from analysis.store.results import ResultStore

LN2 = math.log(2.0)


def _entropy(row) -> float:
    """Shannon entropy in nats, written out (the reference of the tests)."""
    return -sum(v * math.log(v) for v in row if v > 0)


# ---------------------------------------------------------------- MI, LocalE, GlobalE

def test_uniform_prompt_has_zero_mi_and_maximal_local_entropy():
    for c in (2, 3, 5):
        p = np.full((7, c), 1.0 / c)
        assert ps.mi(p) == pytest.approx(0.0, abs=1e-12)
        assert ps.local_e(p) == pytest.approx(math.log(c))


def test_confident_balanced_prompt_has_mi_log_c_and_zero_local_entropy():
    p = np.eye(3)[[0, 1, 2, 0, 1, 2]]  # one-hot, every label predicted equally often
    assert ps.mi(p) == pytest.approx(math.log(3))
    assert ps.local_e(p) == pytest.approx(0.0)
    assert ps.global_e(p) == pytest.approx(math.log(3))


def test_mi_and_local_e_match_the_direct_formula_on_a_random_matrix():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=9)
    marginal = [sum(p[i, j] for i in range(9)) / 9 for j in range(4)]
    cond = sum(_entropy(p[i]) for i in range(9)) / 9
    assert ps.mi(p) == pytest.approx(_entropy(marginal) - cond)
    assert ps.local_e(p) == pytest.approx(cond)


def test_global_e_is_zero_for_a_prompt_that_always_predicts_one_label():
    p = np.array([[0.6, 0.4], [0.9, 0.1], [0.51, 0.49]])
    assert ps.global_e(p) == 0.0


def test_global_e_by_hand():
    # predictions 0, 0, 0, 1 -> histogram (3/4, 1/4)
    p = np.array([[0.7, 0.3], [0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    assert ps.global_e(p) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_entropy_scores_point_the_way_the_originals_prescribe():
    """Lu et al. keep the HIGHEST LocalE / GlobalE; Sorensen et al. the highest MI."""
    collapsed = np.array([[0.99, 0.01]] * 4)  # over-confident, one label for everything
    spread = np.array([[0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    for name in ("local_e", "global_e", "mi"):
        o = ps.PromptOutputs(names=["collapsed", "spread"], probs=np.stack([collapsed, spread]),
                             ppl=np.full(2, np.nan))
        scores = ps.BASELINES[name].score(o, 0)
        assert scores[1] > scores[0], name


# ---------------------------------------------------------------- ZPS

def _brute_force_high_cluster(v):
    """Best 2-partition over all subsets (exact k-means, k = 2), as the set of the higher-mean cluster."""
    best, best_sse = None, math.inf
    n = len(v)
    for r in range(1, n):
        for hi in itertools.combinations(range(n), r):
            lo = [i for i in range(n) if i not in hi]
            sse = sum((v[i] - np.mean([v[j] for j in hi])) ** 2 for i in hi) + \
                sum((v[i] - np.mean([v[j] for j in lo])) ** 2 for i in lo)
            if sse < best_sse - 1e-12:
                best, best_sse = (set(hi), set(lo)), sse
    hi, lo = best
    return hi if np.mean([v[i] for i in hi]) > np.mean([v[i] for i in lo]) else lo


def test_two_means_is_the_exact_optimum():
    assert ps.two_means_1d([0.1, 0.8, 0.15, 0.9]).tolist() == [False, True, False, True]
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.random(6).round(3).tolist()
        got = set(np.flatnonzero(ps.two_means_1d(v)).tolist())
        assert got == _brute_force_high_cluster(v), v


def test_two_means_edge_cases_put_every_prompt_in_the_ensemble():
    assert ps.two_means_1d([0.4]).tolist() == [True]
    assert ps.two_means_1d([0.3, 0.3, 0.3]).tolist() == [True, True, True]
    assert ps.two_means_1d([0.2, 0.2, 0.9]).tolist() == [False, False, True]


def test_zps_two_confident_prompts_agree_and_the_noisy_one_ranks_last():
    truth_like = np.array([0, 1, 1, 0, 2, 1, 0, 2])
    a = np.full((8, 3), 0.025)
    a[np.arange(8), truth_like] = 0.95
    b = np.full((8, 3), 0.05)
    b[np.arange(8), truth_like] = 0.90
    noisy_pred = np.array([2, 2, 0, 1, 1, 0, 2, 0])  # disagrees with a and b everywhere
    c = np.full((8, 3), 0.32)
    c[np.arange(8), noisy_pred] = 0.36
    for variant in ps.ZPS_VARIANTS:
        r = ps.zps_details([a, b, c], variant)
        assert r.confident.tolist() == [True, True, False]
        assert r.pseudo_labels.tolist() == truth_like.tolist()
        assert r.margins.tolist() == pytest.approx([0.925, 0.85, 0.04])
        assert r.scores.tolist() == [1.0, 1.0, 0.0]
        assert ps.ranking(r.scores)[-1] == 2


def test_zps_single_prompt_scores_one():
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert ps.zps([p], "log").tolist() == [1.0]


def test_ensemble_variants_by_hand():
    # one input, three prompts: log-sum picks label 1, prob-sum and vote pick label 0
    a = np.array([[0.98, 0.02]])
    c = np.array([[1e-5, 1 - 1e-5]])
    # log: 2 ln .98 + ln 1e-5 = -11.55 < 2 ln .02 + ln(1 - 1e-5) = -7.82
    assert ps.ensemble_labels([a, a, c], "log").tolist() == [1]
    assert ps.ensemble_labels([a, a, c], "prob").tolist() == [0]  # 1.96001 vs 1.03999
    assert ps.ensemble_labels([a, a, c], "vote").tolist() == [0]  # two votes against one
    # a vote tie goes to the lowest label index
    assert ps.ensemble_labels([a, c], "vote").tolist() == [0]


# ---------------------------------------------------------------- SPELL, random

def test_spell_prefers_lower_perplexity():
    assert ps.ranking(ps.spell([10.0, 2.0, 5.0])).tolist() == [1, 2, 0]
    with pytest.raises(AnalysisError, match="perplexity"):
        ps.spell([3.0, float("nan")])


def test_random_is_seeded_and_a_permutation():
    a, b = ps.random_scores(12, seed=5), ps.random_scores(12, seed=5)
    assert a.tolist() == b.tolist()
    assert sorted(a.tolist()) == list(range(12))
    assert ps.random_scores(12, seed=6).tolist() != a.tolist()


def test_every_registered_baseline_is_unlabelled():
    assert set(ps.BASELINES) == {"mi", "local_e", "global_e", "zps_log", "zps_prob", "zps_vote", "spell",
                                 "self_select", "random"}
    assert all(b.uses_labels is False for b in ps.BASELINES.values())


# ---------------------------------------------------------------- metrics

TRUE = [0.5, 0.8, 0.6, 0.7]
SCORES = [0.9, 0.1, 0.5, 0.3]  # ranks the prompts 0, 2, 3, 1: the best one last


def test_performance_rate_and_rank_by_hand():
    assert ps.ranking(SCORES).tolist() == [0, 2, 3, 1]
    assert ps.performance(SCORES, TRUE) == 0.5
    assert ps.rate(SCORES, TRUE) == pytest.approx(0.5 / 0.8)
    assert ps.rank_of_true_best(SCORES, TRUE) == 4
    assert ps.rank_of_true_best(TRUE, TRUE) == 1
    assert ps.rate(TRUE, TRUE) == 1.0


def test_ndcg_by_hand():
    # method order of relevances (percent): 50, 60, 70, 80; ideal: 80, 70, 60, 50
    lin = (50 + 60 / math.log2(3) + 70 / 2 + 80 / math.log2(5)) / (80 + 70 / math.log2(3) + 60 / 2 + 50 / math.log2(5))
    assert ps.ndcg(SCORES, TRUE, gain="linear") == pytest.approx(lin)
    g = [2.0 ** 50 - 1, 2.0 ** 60 - 1, 2.0 ** 70 - 1, 2.0 ** 80 - 1]
    exp = (g[0] + g[1] / math.log2(3) + g[2] / 2 + g[3] / math.log2(5)) / \
        (g[3] + g[2] / math.log2(3) + g[1] / 2 + g[0] / math.log2(5))
    assert ps.ndcg(SCORES, TRUE) == pytest.approx(exp)
    assert ps.ndcg(TRUE, TRUE) == pytest.approx(1.0)
    # not inverted: the reversed ranking scores worse than the true one
    assert ps.ndcg([-t for t in TRUE], TRUE) < ps.ndcg(TRUE, TRUE)


def test_ties_keep_prompt_order_and_nan_ranks_last():
    assert ps.ranking([0.2, 0.5, 0.5, float("nan"), 0.1]).tolist() == [1, 2, 0, 4, 3]
    # two prompts share the best true score: the better placed one counts
    assert ps.rank_of_true_best([0.1, 0.9, 0.5], [0.8, 0.3, 0.8]) == 2


def test_rho_is_the_mean_rank_of_the_true_best():
    assert ps.rho([(SCORES, TRUE), (TRUE, TRUE)]) == 2.5


# ---------------------------------------------------------------- the store

def _store(tmp_path, prompts, task="sst2", model="llm-a", split="eval", extra=None):
    """A results store holding one scoring key per prompt: {template: (probs, gold, ppl, ids)}."""
    store = ResultStore(tmp_path)
    store.ensure_writable()
    keys = {}
    for template, (probs, gold, ppl, ids) in {**prompts, **(extra or {})}.items():
        key = f"score-{model}-{template}"
        keys[template] = key
        rows = [{"example_id": ex, "template": template, "task": task, "split": split,
                 "gold": None if g is None else int(g), "probs": list(map(float, p)),
                 "logprobs": np.log(p).tolist(), "prediction": int(np.argmax(p)),
                 "correct": None if g is None else bool(np.argmax(p) == g), "prompt_ppl": ppl}
                for ex, p, g in zip(ids, probs, gold, strict=True)]
        store.write_predictions(key, rows)
        store.write_result({"run_key": key, "experiment": "promptsel", "kind": "score", "model": model,
                            "target": task, "status": "ok"})
    store.ingest()
    return store, keys


def _prompts():
    gold = np.array([0, 1, 1, 0, 1, 0])
    ids = [f"ex{i}" for i in range(6)]
    good = np.where(np.eye(2)[gold] == 1, 0.9, 0.1)  # always right
    bad = np.where(np.eye(2)[gold] == 1, 0.4, 0.6)  # always wrong, unsure
    flat = np.full((6, 2), 0.5)
    return {"good": (good, gold, 4.0, ids), "bad": (bad, gold, 2.0, ids), "flat": (flat, gold, 9.0, ids)}, gold


def test_prompt_table_returns_what_was_written(tmp_path):
    prompts, gold = _prompts()
    # a fourth prompt scored only examples ex0..ex3 (plus one nobody else has): alignment drops the rest
    partial = np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    extra = {"partial": (partial, [0, 1, 1, 0, 1], None, ["ex0", "ex1", "ex2", "ex3", "zz"])}
    store, keys = _store(tmp_path, prompts, extra=extra)
    with store.connect() as con:
        t = ps.prompt_table(con, keys=list(keys.values()))
        assert t.task == "sst2"
        assert t.names == ["bad", "flat", "good", "partial"]
        assert t.keys == [keys[n] for n in t.names]
        assert t.example_ids == ["ex0", "ex1", "ex2", "ex3"]
        for i, n in enumerate(t.names[:3]):
            np.testing.assert_allclose(t.probs[i], prompts[n][0][:4])
        np.testing.assert_allclose(t.probs[3], partial[:4])
        # accuracy on the aligned examples: good 4/4, flat predicts 0 -> right on ex0, ex3; partial: ex1, ex3
        np.testing.assert_allclose(t.accuracy, [0.0, 0.5, 1.0, 0.5])
        assert t.ppl[:3].tolist() == [2.0, 9.0, 4.0] and np.isnan(t.ppl[3])

        # the same three prompts by model and task
        by_model = ps.prompt_table(con, model="llm-a", task="sst2")
        assert by_model.names == t.names
        with pytest.raises(AnalysisError, match="no predictions"):
            ps.prompt_table(con, model="other-llm", task="sst2")


def test_evaluate_prompt_selection_on_a_store(tmp_path):
    prompts, gold = _prompts()
    store, keys = _store(tmp_path, prompts)
    with store.connect() as con:
        res = ps.evaluate_prompt_selection(con, "sst2", list(keys.values()), seed=0,
                                           external_scores={"fute": {"good": 0.9, "bad": 0.1, "flat": 0.5}})
    assert res["prompts"] == ["bad", "flat", "good"] and res["best"] == "good"
    assert res["n_examples"] == 6
    acc = res["true_scores"]
    assert acc["good"] == 1.0 and acc["flat"] == 0.5  # flat predicts label 0: right on the 3 zeros
    m = res["methods"]
    # spell: perplexities bad 2 < good 4 < flat 9
    assert m["spell"]["ranking"] == ["bad", "good", "flat"]
    assert acc["bad"] == 0.0 and m["spell"]["performance"] == 0.0 and m["spell"]["rate"] == 0.0
    assert m["spell"]["rank_of_best"] == 2
    # LocalE keeps the most uncertain prompt (flat, entropy ln 2); MI the confident, balanced one
    assert m["local_e"]["selected"] == "flat" and m["local_e"]["scores"]["flat"] == pytest.approx(LN2)
    assert m["mi"]["selected"] == "good" and m["mi"]["rank_of_best"] == 1 and m["mi"]["ndcg"] == pytest.approx(1.0)
    # ZPS: margins good .8, bad .2, flat 0 -> the ensemble is {good}, whose predictions are the gold labels
    assert m["zps_log"]["ranking"] == ["good", "flat", "bad"] and m["zps_log"]["ndcg"] == pytest.approx(1.0)
    # GlobalE: good and bad both predict a balanced histogram (ln 2), flat one label (0); the tie
    # keeps the name order, so bad is selected
    assert m["global_e"]["scores"] == pytest.approx({"bad": LN2, "flat": 0.0, "good": LN2})
    assert m["global_e"]["selected"] == "bad" and m["global_e"]["rank_of_best"] == 2
    assert m["fute"]["uses_labels"] is True and m["fute"]["rate"] == 1.0
    assert all(m[b]["uses_labels"] is False for b in ps.BASELINES if b != "self_select")
    assert "self_select" not in m and "meta-prompt" in res["not_applicable"]["self_select"]  # no rows stored
    summary = ps.summarise([res, res])
    assert summary["mi"]["rho"] == 1.0 and summary["spell"]["rho"] == 2.0


def test_a_new_baseline_is_one_function_and_a_name(tmp_path):
    prompts, _ = _prompts()
    store, keys = _store(tmp_path, prompts)

    @ps.register_baseline("longest_name_test", "template names only")
    def _longest(o: ps.PromptOutputs, seed: int) -> np.ndarray:
        return np.array([len(n) for n in o.names], dtype=float)

    try:
        with store.connect() as con:
            res = ps.evaluate_prompt_selection(con, "sst2", list(keys.values()), methods=["longest_name_test"])
        assert res["methods"]["longest_name_test"]["ranking"] == ["flat", "good", "bad"]
    finally:
        del ps.BASELINES["longest_name_test"]


def test_bad_requests_are_clear_errors(tmp_path):
    prompts, gold = _prompts()
    ids = [f"ex{i}" for i in range(6)]
    extra = {"c3": (np.full((6, 3), 1 / 3), gold, None, ids), "noppl": (np.full((6, 2), 0.5), gold, None, ids)}
    store, keys = _store(tmp_path, prompts, extra=extra)
    with store.connect() as con:
        with pytest.raises(AnalysisError, match="unknown prompt-selection method"):
            ps.evaluate_prompt_selection(con, "sst2", [keys["good"]], methods=["nosuch"])
        with pytest.raises(AnalysisError, match="self_select needs the meta-prompt"):
            ps.evaluate_prompt_selection(con, "sst2", [keys["good"]], methods=["self_select"])
        with pytest.raises(AnalysisError, match="number of choices"):
            ps.prompt_table(con, keys=list(keys.values()))
        with pytest.raises(AnalysisError, match="spell needs prompt_ppl"):
            ps.evaluate_prompt_selection(con, "sst2", [keys["good"], keys["noppl"]], methods=["spell"])
    with pytest.raises(AnalysisError, match="shape"):
        ps.zps([np.full((3, 2), 0.5), np.full((4, 2), 0.5)])


def test_ambiguous_selections_are_refused(tmp_path):
    prompts, gold = _prompts()
    ids = [f"ex{i}" for i in range(6)]
    store, keys = _store(tmp_path / "a", {"good": prompts["good"]}, task="sst2")
    _store(tmp_path / "a", {"bad": prompts["bad"]}, task="imdb")
    _store(tmp_path / "a", {"good": prompts["good"]}, model="llm-b")  # same template, second key
    _store(tmp_path / "a", {"flat": prompts["flat"]}, model="llm-c", split="pool")
    unl = {"unl": (np.full((6, 2), 0.5), [None] * 6, None, ids)}
    _store(tmp_path / "a", unl, model="llm-d")
    with store.connect() as con:
        with pytest.raises(AnalysisError, match="several tasks"):
            ps.prompt_table(con, keys=["score-llm-a-good", "score-llm-a-bad"])
        assert ps.prompt_table(con, keys=["score-llm-a-good", "score-llm-a-bad"], task="imdb").names == ["bad"]
        with pytest.raises(AnalysisError, match="good .score-llm-a-good, score-llm-b-good"):
            ps.prompt_table(con, keys=["score-llm-a-good", "score-llm-b-good"])
        with pytest.raises(AnalysisError, match="several splits"):
            ps.prompt_table(con, keys=["score-llm-a-good", "score-llm-c-flat"])
        assert ps.prompt_table(con, keys=["score-llm-a-good", "score-llm-c-flat"], split="pool").names == ["flat"]
        with pytest.raises(AnalysisError, match="no labelled examples"):
            ps.evaluate_prompt_selection(con, "sst2", model="llm-d")
