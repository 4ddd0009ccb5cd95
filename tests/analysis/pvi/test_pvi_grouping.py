"""PVI task grouping (paper 003): PVI from stored run pairs against hand-computed logs, the tests against
direct formulas, the grouping rules on hand-written similarity patterns, the MTL comparison (accuracy,
macro-F1, 95% CI) against hand computations and sklearn, and the `groups` CLI end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from sklearn.metrics import f1_score

from analysis.errors import AnalysisError
from analysis.pvi.grouping import (
    PviDistribution,
    PviTest,
    ci_half_width,
    compare_group,
    compare_pair,
    comparison_table,
    dissimilar_pairs,
    group_tasks,
    load_pvi,
    pvi_figures,
    run_tests,
    verdict,
)
from analysis.store.duck import open_store
from analysis.store.results import ResultStore

ROOT = Path(__file__).resolve().parents[3]
SETUP = "full:minilm"


# -- store builders ---------------------------------------------------------------------------------------
def _store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "results")
    store.ensure_writable()
    return store


def add_pvi_pair(store: ResultStore, task: str, seed: int, rows_x: list[tuple[str, int, list[float]]],
                 rows_null: list[tuple[str, int, list[float]]], setup: str = SETUP,
                 null_template: str = "null", extra: list[dict] | None = None) -> tuple[str, str]:
    """One g' ('pvi_x') and one g ('pvi_null') run with their predictions, written as the jobs do;
    `extra` rows go to both runs."""
    slug = setup.replace(":", "_")
    kx, kn = f"pvi-x-{slug}-{task}-{seed}", f"pvi-null-{slug}-{task}-{seed}"
    for key, rows, template in ((kx, rows_x, "input"), (kn, rows_null, null_template)):
        store.write_predictions(key, [{"example_id": e, "template": template, "task": task, "split": "eval",
                                       "gold": g, "probs": pr, "prediction": int(np.argmax(pr))}
                                      for e, g, pr in rows] + [{**r, "template": template} for r in extra or []])
    store.write_result({"run_key": kn, "kind": "pvi_null", "target": task, "setup": setup, "seed": seed,
                        "experiment": "pvi"})
    store.write_result({"run_key": kx, "kind": "pvi_x", "target": task, "setup": setup, "seed": seed,
                        "experiment": "pvi", "baseline_run_key": kn})
    return kx, kn


def add_binary_task(store: ResultStore, task: str, gold_probs_x: list[float], setup: str = SETUP,
                    seed: int = 0) -> None:
    """Null model uniform over two choices (-log2 0.5 = 1 bit), so PVI = 1 + log2 p_x(gold)."""
    ids = [f"{task}-{i}" for i in range(len(gold_probs_x))]
    add_pvi_pair(store, task, seed, [(e, 0, [v, 1 - v]) for e, v in zip(ids, gold_probs_x, strict=True)],
                 [(e, 0, [0.5, 0.5]) for e in ids], setup=setup)


def add_mtl_run(store: ResultStore, key: str, seed: int, preds: dict[str, tuple[list[int], list[int]]],
                experiment: str = "mtl-exp") -> None:
    rows = [{"example_id": f"{task}-{i}", "template": "input", "task": task, "split": "eval", "gold": g,
             "prediction": p, "correct": g == p}
            for task, (gold, pred) in preds.items() for i, (g, p) in enumerate(zip(gold, pred, strict=True))]
    store.write_predictions(key, rows)
    store.write_result({"run_key": key, "kind": "mtl", "sources": sorted(preds), "seed": seed, "setup": SETUP,
                        "experiment": experiment})


# -- PVI -------------------------------------------------------------------------------------------------------
def test_pvi_view_matches_hand_computed_logs(tmp_path):
    store = _store(tmp_path)
    x = [("e1", 0, [0.5, 0.25, 0.25]), ("e2", 1, [0.125, 0.75, 0.125]), ("e3", 2, [0.5, 0.25, 0.25])]
    n = [("e1", 0, [0.25, 0.5, 0.25]), ("e2", 1, [1 / 3, 1 / 3, 1 / 3]), ("e3", 2, [0.25, 0.25, 0.5])]
    train_row = {"example_id": "t1", "template": "input", "task": "cb", "split": "train", "gold": 0,
                 "probs": [0.9, 0.05, 0.05], "prediction": 0}
    kx, kn = add_pvi_pair(store, "cb", 0, x, n, extra=[train_row])
    # second seed: every p_x(gold) divided by sqrt(2), so every PVI is 0.5 bit lower than in seed 0
    r2 = math.sqrt(2)
    x2 = [("e1", 0, [0.5 / r2, 0.4, 1 - 0.5 / r2 - 0.4]), ("e2", 1, [0.2, 0.75 / r2, 0.8 - 0.75 / r2]),
          ("e3", 2, [0.5, 0.5 - 0.25 / r2, 0.25 / r2])]
    add_pvi_pair(store, "cb", 1, x2, n)
    store.ingest()
    hand = {"e1": -math.log2(0.25) + math.log2(0.5),  # = 1
            "e2": -math.log2(1 / 3) + math.log2(0.75),  # = log2(2.25)
            "e3": -math.log2(0.5) + math.log2(0.25)}  # = -1
    with store.connect() as con:
        rows = con.execute("SELECT example_id, pvi, key_x, key_null, split FROM pvi WHERE seed = 0 "
                           "ORDER BY split, example_id").fetchall()
        assert [(r[0], r[2], r[3], r[4]) for r in rows] == [(e, kx, kn, "eval") for e in ("e1", "e2", "e3")] + [
            ("t1", kx, kn, "train")]
        rows = rows[:3]
        assert [r[1] for r in rows] == pytest.approx([hand["e1"], hand["e2"], hand["e3"]], abs=1e-12)
        assert hand["e1"] == 1.0 and hand["e3"] == -1.0
        seeds_mean = {e: v - 0.25 for e, v in hand.items()}  # mean of v and v - 0.5
        n_seeds, n_inst, v_info = con.execute(
            "SELECT n_seeds, n_instances, v_info FROM pvi_tasks WHERE setup = ? AND task = 'cb'", [SETUP]).fetchone()
        assert (n_seeds, n_inst) == (2, 3)  # the train row is not a held-out instance
        assert v_info == pytest.approx(sum(seeds_mean.values()) / 3, abs=1e-12)
        per_instance = load_pvi(con, SETUP)["cb"].values
        assert sorted(per_instance) == pytest.approx(sorted(seeds_mean.values()), abs=1e-12)
        assert sorted(load_pvi(con, SETUP, seed=0)["cb"].values) == pytest.approx(sorted(hand.values()), abs=1e-12)


def test_zero_probability_and_broken_pairs_are_refused(tmp_path):
    store = _store(tmp_path)
    add_binary_task(store, "a", [0.6, 0.7, 0.8])
    add_binary_task(store, "b", [0.6, 0.0, 0.8])  # p_x(gold) = 0 -> PVI = -inf
    store.ingest()
    with store.connect() as con:
        with pytest.raises(AnalysisError, match=r"infinite PVI .* b \(1 instances\)"):
            load_pvi(con, SETUP)
        assert set(load_pvi(con, SETUP, tasks=["a"])) == {"a"}
        with pytest.raises(AnalysisError, match="no PVI rows for setup 'lora:minilm'.*setups with PVI: full:minilm"):
            load_pvi(con, "lora:minilm")
        con.execute("UPDATE runs SET seed = 7 WHERE run_key = 'pvi-null-full_minilm-a-0'")
        with pytest.raises(AnalysisError, match="without a matching 'pvi_null' run.*pvi-x-full_minilm-a-0"):
            load_pvi(con, SETUP)


# -- tests ---------------------------------------------------------------------------------------------------
def _dist(task: str, values, setup: str = SETUP) -> PviDistribution:
    return PviDistribution(setup, task, np.asarray(values, dtype=float))


def test_t_tests_match_the_textbook_formulas():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 200)
    b = rng.normal(0.2, 2.0, 150)
    na, nb = len(a), len(b)
    sp = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    t_student = (a.mean() - b.mean()) / (sp * math.sqrt(1 / na + 1 / nb))
    p_student = 2 * stats.t.sf(abs(t_student), na + nb - 2)
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    t_welch = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df_welch = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    p_welch = 2 * stats.t.sf(abs(t_welch), df_welch)

    s = compare_pair(_dist("a", a), _dist("b", b))
    assert (s.test, s.n, s.effect) == ("student_t", (200, 150), "cohen_d")
    assert s.statistic == pytest.approx(t_student, rel=1e-10) and s.p == pytest.approx(p_student, rel=1e-8)
    assert s.effect_size == pytest.approx((a.mean() - b.mean()) / sp, rel=1e-10)
    w = compare_pair(_dist("a", a), _dist("b", b), welch=True)
    assert w.test == "welch_t" and w.statistic == pytest.approx(t_welch, rel=1e-10)
    assert w.p == pytest.approx(p_welch, rel=1e-8) and w.p != pytest.approx(s.p, rel=1e-3)


def test_identical_distributions_are_similar_shifted_ones_are_not():
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 1.0, 300)
    same = compare_pair(_dist("a", a), _dist("b", a.copy()))
    assert same.statistic == 0.0 and same.p == pytest.approx(1.0) and same.is_similar and same.effect_size == 0.0
    shifted = compare_pair(_dist("a", a), _dist("c", a + 3.0))
    assert shifted.p < 1e-100 and not shifted.is_similar
    assert shifted.effect_size == pytest.approx(-3.0 / a.std(ddof=1), rel=1e-10)  # equal SDs: pooled SD = SD of a
    # the threshold is the boundary: p > threshold is similar
    mid = compare_pair(_dist("a", a), _dist("d", a + 0.15))
    assert compare_pair(_dist("a", a), _dist("d", a + 0.15), threshold=mid.p * 0.999).is_similar
    assert not compare_pair(_dist("a", a), _dist("d", a + 0.15), threshold=mid.p).is_similar
    # why n and effect size are stored: three instances a whole bit apart still "pass"
    tiny = compare_pair(_dist("x", [0.0, 0.5, 1.0]), _dist("y", [1.0, 1.5, 2.0]))
    assert tiny.is_similar and tiny.n == (3, 3) and tiny.effect_size == pytest.approx(-2.0)


def test_anova_matches_sums_of_squares():
    rng = np.random.default_rng(2)
    groups = [rng.normal(m, 1.0, n) for m, n in ((0.0, 40), (0.3, 55), (0.1, 35))]
    allv = np.concatenate(groups)
    ssb = sum(len(g) * (g.mean() - allv.mean()) ** 2 for g in groups)
    ssw = sum(((g - g.mean()) ** 2).sum() for g in groups)
    f = (ssb / 2) / (ssw / (len(allv) - 3))
    res = compare_group([_dist(t, g) for t, g in zip("abc", groups, strict=True)])
    assert (res.test, res.n, res.effect) == ("anova", (40, 55, 35), "eta_squared")
    assert res.statistic == pytest.approx(f, rel=1e-10)
    assert res.p == pytest.approx(stats.f.sf(f, 2, len(allv) - 3), rel=1e-8)
    assert res.effect_size == pytest.approx(ssb / (ssb + ssw), rel=1e-10)
    same = compare_group([_dist(t, groups[0]) for t in "abc"])
    assert same.statistic == pytest.approx(0.0, abs=1e-12) and same.p == pytest.approx(1.0) and same.is_similar
    apart = compare_group([_dist("a", groups[0]), _dist("b", groups[0] + 2), _dist("c", groups[0] + 4)])
    assert apart.p < 1e-30 and not apart.is_similar
    with pytest.raises(AnalysisError, match="three or more"):
        compare_group([_dist("a", groups[0]), _dist("b", groups[1])])


def test_tasks_of_different_setups_are_never_compared():
    a, b = _dist("a", [0.1, 0.2, 0.3]), _dist("b", [0.1, 0.2, 0.4], setup="lora:minilm")
    with pytest.raises(AnalysisError, match="only within one setup.*a from 'full:minilm', b from 'lora:minilm'"):
        compare_pair(a, b)
    with pytest.raises(AnalysisError, match="only within one setup"):
        compare_group([a, b, _dist("c", [0.0, 1.0])])
    with pytest.raises(AnalysisError, match="only within one setup"):
        run_tests([a, b])


def test_run_tests_enumerates_every_pair_and_triple():
    ds = [_dist(t, np.arange(5.0) + i) for i, t in enumerate("dcba")]
    tests = run_tests(ds, seeds="mean")
    assert [t.tasks for t in tests] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"),
                                        ("a", "b", "c"), ("a", "b", "d"), ("a", "c", "d"), ("b", "c", "d")]
    assert [t.test for t in tests] == ["student_t"] * 6 + ["anova"] * 4


# -- grouping rules ---------------------------------------------------------------------------------------------
def _t(tasks: str, p: float, d: float = 0.1, threshold: float = 0.01) -> PviTest:
    return PviTest(SETUP, tuple(tasks), "student_t" if len(tasks) == 2 else "anova", (50,) * len(tasks), 0.0, p,
                   "cohen_d" if len(tasks) == 2 else "eta_squared", d, p > threshold, threshold, "student", "mean")


def test_chain_pattern_greedy_and_cliques():
    # A~B, B~C, A!~C: the triple cannot be a group even though its ANOVA alone says similar
    tests = [_t("AB", 0.5), _t("BC", 0.3), _t("AC", 0.001), _t("ABC", 0.2)]
    assert group_tasks(tests, "greedy") == [["A", "B"]]
    assert group_tasks(tests, "cliques") == [["A", "B"], ["B", "C"]]


def test_triangle_and_pendant_pattern():
    # D, E, F mutually similar and ANOVA similar; G similar to D only (the most similar pair of all)
    tests = [_t("DE", 0.9), _t("DF", 0.8), _t("EF", 0.7), _t("DG", 0.95), _t("EG", 0.001), _t("FG", 0.002),
             _t("DEF", 0.6), _t("DEG", 0.0001), _t("DFG", 0.0002), _t("EFG", 0.0003)]
    assert group_tasks(tests, "greedy", prefer="p") == [["D", "G"], ["E", "F"]]
    assert group_tasks(tests, "greedy", prefer="size") == [["D", "E", "F"]]
    assert group_tasks(tests, "cliques") == [["D", "E", "F"], ["D", "G"]]
    # all pairs similar but the ANOVA not: the three pairs are the maximal sets
    tri = [_t("DE", 0.9), _t("DF", 0.8), _t("EF", 0.7), _t("DEF", 0.005)]
    assert group_tasks(tri, "cliques") == [["D", "E"], ["D", "F"], ["E", "F"]]
    assert group_tasks(tri, "greedy") == [["D", "E"]]
    # equal p: the smaller effect size goes first
    tie = [_t("AB", 0.4, d=0.3), _t("BC", 0.4, d=0.1)]
    assert group_tasks(tie, "greedy") == [["B", "C"]]
    with pytest.raises(AnalysisError, match="unknown grouping rule 'best'"):
        group_tasks(tests, "best")


def test_dissimilar_pairs_take_each_tasks_smallest_p():
    tests = [_t("AB", 0.5), _t("AC", 1e-9, d=2.0), _t("AD", 1e-9, d=3.0), _t("BC", 1e-4), _t("BD", 0.003),
             _t("CD", 0.2)]
    # A: AD (same p as AC, larger |d|); B: BC; C: AC; D: AD
    assert dissimilar_pairs(tests) == [["A", "D"], ["A", "C"], ["B", "C"]]
    assert dissimilar_pairs(tests, per_task=False) == [["A", "D"], ["A", "C"], ["B", "C"], ["B", "D"]]
    assert dissimilar_pairs(tests, k=1) == [["A", "D"]]


# -- MTL comparison ------------------------------------------------------------------------------------------------
def test_ci_half_width_is_the_papers_formula():
    v = [0.80, 0.84, 0.78, 0.90, 0.83]
    s = math.sqrt(sum((x - sum(v) / 5) ** 2 for x in v) / 4)
    assert ci_half_width(v) == pytest.approx(2.776 * s / math.sqrt(5), rel=2e-4)  # t(0.975, 4) = 2.776
    assert math.isnan(ci_half_width([0.5]))


def test_member_scores_and_comparison_by_hand(tmp_path):
    store = _store(tmp_path)
    gold_a = [0, 0, 1, 1]
    preds_a = {0: [0, 1, 0, 1], 1: [0, 0, 1, 0], 2: [0, 0, 1, 1]}  # accuracies 0.5, 0.75, 1.0
    gold_b = [0, 1, 2, 2, 1]
    pred_b = [0, 1, 1, 2, 0]
    for seed in range(3):
        add_mtl_run(store, f"single-a-{seed}", seed, {"a": (gold_a, [0, 1, 1, 1])})  # accuracy 0.75 each seed
        add_mtl_run(store, f"pair-ab-{seed}", seed, {"a": (gold_a, preds_a[seed]), "b": (gold_b, pred_b)})
    store.ingest()
    with store.connect() as con:
        con.executemany("INSERT INTO mtl_groups VALUES ('mtl-exp', ?, ?, ?, ?, ?)",
                        [["single", "a", ["a"], f"single-a-{s}", s] for s in range(3)]
                        + [["pvi", "g1", ["b", "a"], f"pair-ab-{s}", s] for s in range(3)])
        f1_b = con.execute("SELECT accuracy, macro_f1, n_classes FROM mtl_member_scores "
                           "WHERE run_key = 'pair-ab-0' AND task = 'b'").fetchone()
        # b: class 0 tp1 gold1 pred2 -> 2/3; class 1 tp1 gold2 pred2 -> 1/2; class 2 tp1 gold2 pred1 -> 2/3
        assert f1_b[0] == pytest.approx(3 / 5) and f1_b[2] == 3
        assert f1_b[1] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
        assert f1_b[1] == pytest.approx(f1_score(gold_b, pred_b, average="macro"))
        rows = comparison_table(con, "mtl-exp")
        with pytest.raises(AnalysisError, match="no MTL results for experiment 'nope'.*mtl-exp"):
            comparison_table(con, "nope")
    pair_a = next(r for r in rows if r["grouping"] == "pvi" and r["task"] == "a")
    assert pair_a["members"] == ["a", "b"] and pair_a["n_seeds"] == 3
    assert pair_a["accuracy"] == pytest.approx(0.75)
    assert pair_a["ci_accuracy"] == pytest.approx(4.302653 * 0.25 / math.sqrt(3), rel=1e-6)  # s = 0.25, t(.975, 2)
    f1s = [f1_score(gold_a, preds_a[s], average="macro") for s in range(3)]
    assert pair_a["macro_f1"] == pytest.approx(np.mean(f1s))
    assert pair_a["ci_macro_f1"] == pytest.approx(ci_half_width(f1s))
    assert pair_a["single_accuracy"] == pytest.approx(0.75) and pair_a["single_ci_accuracy"] == pytest.approx(0.0)
    assert pair_a["diff_accuracy"] == pytest.approx(0.0)
    assert pair_a["single_macro_f1"] == pytest.approx(f1_score(gold_a, [0, 1, 1, 1], average="macro"))
    pair_b = next(r for r in rows if r["grouping"] == "pvi" and r["task"] == "b")
    assert pair_b["single_accuracy"] is None and pair_b["ci_accuracy"] == pytest.approx(0.0)


def _row(grouping: str, gid: str, members: list[str], task: str, m: float, hm: float, s: float, hs: float) -> dict:
    return {"grouping": grouping, "group_id": gid, "members": members, "task": task, "macro_f1": m,
            "ci_macro_f1": hm, "single_macro_f1": s, "single_ci_macro_f1": hs}


def test_verdict_criterion():
    rows = [_row("pvi", "g1", ["a", "b"], "a", 0.80, 0.02, 0.81, 0.02),  # within the margin: not worse
            _row("pvi", "g1", ["a", "b"], "b", 0.90, 0.01, 0.85, 0.01),
            _row("dissimilar", "d1", ["a", "c"], "a", 0.81, 0.01, 0.81, 0.02),
            _row("dissimilar", "d1", ["a", "c"], "c", 0.60, 0.02, 0.70, 0.03)]  # 0.62 < 0.67: hurt
    v = verdict(rows)
    assert v["holds"] is True and v["pvi_not_worse"] and v["dissimilar_hurt"]
    # by point estimates, a's 0.80 < 0.81 is already worse
    assert verdict(rows, criterion="mean")["pvi_worse_members"] == [("a", ["a", "b"])]
    rows[3] = _row("dissimilar", "d1", ["a", "c"], "c", 0.66, 0.02, 0.70, 0.03)  # 0.68 >= 0.67: overlap
    v = verdict(rows)
    assert v["holds"] is False and v["dissimilar_pairs_unhurt"] == [["a", "c"]]
    assert verdict(rows[:2])["holds"] is None  # no dissimilar controls: undetermined


# -- figures and CLI -----------------------------------------------------------------------------------------------
def _three_task_store(tmp_path: Path) -> ResultStore:
    store = _store(tmp_path)
    rng = np.random.default_rng(3)
    high = list(rng.uniform(0.6, 0.95, 60))
    add_binary_task(store, "p", high)
    add_binary_task(store, "q", high)  # same PVI values as p
    add_binary_task(store, "r", list(rng.uniform(0.05, 0.4, 60)))
    add_binary_task(store, "s", [0.6, 0.7], setup="lora:minilm")  # another setup: never mixed in
    store.ingest()
    return store


def test_groups_cli_end_to_end(tmp_path):
    store = _three_task_store(tmp_path)
    cfg = tmp_path / "mtl" / "groups.yaml"
    cmd = [sys.executable, "-m", "rayjobs.cli", "groups", "--db", str(store.db_path), "--setup", SETUP,
           "--write-config", str(cfg)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    groups = yaml.safe_load(cfg.read_text())["groups"]
    rand = groups.pop("random")
    assert groups == {"pvi": [["p", "q"]], "dissimilar": [["p", "r"], ["q", "r"]], "all": [["p", "q", "r"]],
                      "single": [["p"], ["q"], ["r"]]}
    # the random control: as many groups of the same sizes as the PVI groups, from the same tasks, seeded
    assert [len(g) for g in rand] == [2] and set(rand[0]) <= {"p", "q", "r"} and rand[0] == sorted(set(rand[0]))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and yaml.safe_load(cfg.read_text())["groups"]["random"] == rand
    assert "pvi groups (greedy): p, q" in res.stdout and "p | q | r" in res.stdout
    with open_store(store.db_path) as con:
        stored = con.execute("SELECT tasks, test, n, is_similar, variant FROM pvi_tests ORDER BY test, tasks").fetchall()
    assert stored == [(["p", "q", "r"], "anova", [60, 60, 60], False, "student"),
                      (["p", "q"], "student_t", [60, 60], True, "student"),
                      (["p", "r"], "student_t", [60, 60], False, "student"),
                      (["q", "r"], "student_t", [60, 60], False, "student")]
    bad = subprocess.run(cmd[:-2] + ["--setup", f"{SETUP},lora:minilm"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "transferlab: error: PVI distributions are compared only within one setup (model family); "
        "got 'full:minilm,lora:minilm'"]


def test_pvi_figures_are_written(tmp_path):
    store = _three_task_store(tmp_path)
    with store.connect() as con:
        paths = pvi_figures(con, SETUP, tmp_path / "fig")
    assert [p.name for p in paths] == ["pvi_distributions_full_minilm.png", "pvi_pvalues_full_minilm.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_groups_writes_the_pvi_figures_where_asked(tmp_path):
    store = _three_task_store(tmp_path)
    out = tmp_path / "figs"
    cmd = [sys.executable, "-m", "rayjobs.cli", "groups", "--db", str(store.db_path), "--setup", SETUP,
           "--figures", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["pvi_distributions_full_minilm.png", "pvi_pvalues_full_minilm.png"]
    assert all(f"wrote {out / n}" in res.stdout for n in names)
    (tmp_path / "file").write_text("x")  # a folder that cannot be made: the error names the option
    res = subprocess.run(cmd[:-1] + [str(tmp_path / "file" / "figs")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and f"--figures {tmp_path / 'file' / 'figs'}: cannot create" in res.stderr, res.stderr
