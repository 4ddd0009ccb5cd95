"""Evaluating FUTE (paper 004) over hand-made stores: rho and the TaskWeb metrics by hand; prompt selection
next to the unlabelled baselines on a constructed example with known answers; the cost model and its
break-even by hand; FUTE as TaskShop's F on the TaskWeb release against the loop reference of Eq. 1."""

from __future__ import annotations

import math
from pathlib import Path

import loop_reference as ref
import numpy as np
import pyarrow as pa
import pytest
from analysis_support import TASKWEB, copy_db, needs_taskweb, taskweb_db

from analysis.selection import fute as te
from analysis.selection import fute_cost as fc
from analysis.selection import fute_eval as fe
from analysis.selection import selectors as sel
from analysis.store.duck import open_store
from analysis.store.results import ResultStore
from tests.analysis.selection.test_fute_embeddings import cos, put


def _matrix_store(tmp_path: Path) -> ResultStore:
    """Published-style transfers of one setup: T = 0.5 pc + 0.5 (0.2 pm - 0.1) with pm = 0.5, i.e. T = pc / 2."""
    st = ResultStore(tmp_path / "m")
    st.ensure_writable()
    T = {("a", "t1"): 0.6, ("b", "t1"): 0.4, ("c", "t1"): 0.2, ("a", "t2"): -0.2, ("b", "t2"): 0.2, ("c", "t2"): 0.0}
    with st.connect() as con:
        con.executemany("INSERT INTO published_transfer_scores VALUES ('x', 'finetune', ?, ?, ?, 0.5, 'taskweb:test')",
                        [[s, t, pc] for (s, t), pc in T.items()])
        pred = {("a", "t1"): 0.5, ("b", "t1"): 0.9, ("c", "t1"): 0.1, ("a", "t2"): 0.3, ("b", "t2"): 0.2,
                ("c", "t2"): 0.1}
        sel.store_scores(con, "hand", "hand", {}, pa.table({"source": [k[0] for k in pred], "target": [k[1] for k in pred],
                                                          "score": list(pred.values())}))
    return st


def test_rho_and_ndcg_of_a_selector_by_hand(tmp_path: Path) -> None:
    """t1: gold a > b > c, predicted b > a > c: the best (a) is 2nd; NDCG = (3 + 7/log2 3 + 1/2) / (7 + 3/log2 3 + 1/2).
    t2: gold b > c > a, predicted a > b > c: the best (b) is 2nd; NDCG = (1 + 7/log2 3 + 3/2) / (7 + 3/log2 3 + 1/2)."""
    st = _matrix_store(tmp_path)
    with open_store(st.db_path) as con:
        res = fe.evaluate_method(con, "hand", "finetune:x", k=1, targets=["t1", "t2"], metrics="taskweb")
    ideal = 7 + 3 / math.log2(3) + 1 / 2
    want = {"t1": (3 + 7 / math.log2(3) + 0.5) / ideal, "t2": (1 + 7 / math.log2(3) + 1.5) / ideal}
    assert res["by_target"]["t1"]["ndcg"] == pytest.approx(want["t1"])
    assert res["by_target"]["t2"]["ndcg"] == pytest.approx(want["t2"])
    assert res["ndcg"] == pytest.approx((want["t1"] + want["t2"]) / 2)
    assert res["rho"] == 2.0 and {t: v["rank_of_best"] for t, v in res["by_target"].items()} == {"t1": 2, "t2": 2}
    assert res["regret"] is None  # no per-seed runs behind published transfers


def _prompt_store(tmp_path: Path) -> ResultStore:
    """Task 'cb' (3 labels), 4 eval examples with gold 0, 1, 2, 0; four prompts of model 'zs':
    good      always right, p = 0.8 on the gold                         accuracy 1
    good-copy the same outputs                                          accuracy 1
    bad-const always [0.9, 0.05, 0.05]                                  accuracy 1/2 (gold 0 twice)
    bad-swap  0.8 on (gold + 1) mod 3                                   accuracy 0
    FUTE vectors: cos with the DTE 1, 1, 0.6, 0 (good, copy, const, swap)."""
    st = ResultStore(tmp_path / "p")
    st.ensure_writable()
    gold = [0, 1, 2, 0]

    def peaked(c: int) -> list[float]:
        return [0.8 if j == c else 0.1 for j in range(3)]

    outs = {"good": [peaked(g) for g in gold], "good-copy": [peaked(g) for g in gold],
            "bad-const": [[0.9, 0.05, 0.05]] * 4, "bad-swap": [peaked((g + 1) % 3) for g in gold]}
    for p, probs in outs.items():
        key = f"score-{p}"
        rows = [{"example_id": f"x{i}", "template": p, "task": "cb", "split": "eval", "gold": g, "probs": pr,
                 "choices": ["e", "n", "c"], "prediction": int(np.argmax(pr)), "correct": int(np.argmax(pr)) == g}
                for i, (g, pr) in enumerate(zip(gold, probs, strict=True))]
        st.write_predictions(key, rows)
        st.write_result({"run_key": key, "experiment": "e", "kind": "score", "model": "zs", "target": "cb",
                         "n_eval": 4, "wall_time_s": 2.0, "metrics": {"template": p, "split": "eval"}})
    put(st, "dte-cb", "SP", "DTE", "cb", [1.0, 0.0])
    for p, v in (("good", [1.0, 0.0]), ("good-copy", [1.0, 0.0]), ("bad-const", [0.6, 0.8]), ("bad-swap", [0.0, 1.0])):
        put(st, f"mte-{p}", "SP", "MTE", "cb", v, model="zs", prompt=p)
    st.ingest()
    return st


def test_prompt_selection_puts_fute_next_to_the_unlabelled_baselines_with_known_answers(tmp_path: Path) -> None:
    st = _prompt_store(tmp_path)
    with open_store(st.db_path) as con:
        res = fe.prompt_selection(con, "SP", "zs", "cb")
    assert res["true_scores"] == {"bad-const": 0.5, "bad-swap": 0.0, "good": 1.0, "good-copy": 1.0}
    m = res["methods"]
    assert m["fute"]["ranking"] == ["good", "good-copy", "bad-const", "bad-swap"] and m["fute"]["uses_labels"]
    assert m["fute"]["scores"]["bad-const"] == pytest.approx(0.6)
    assert res["bad_positions"]["fute"] == [3, 4]
    assert res["duplicates"] == [{"prompt": "good", "copy": "good-copy", "mte_cosine": pytest.approx(1.0),
                                  "positions": [1, 2]}]
    # MI and GlobalE of a prompt that answers the same for every input are 0; its LocalE is its row entropy
    assert m["mi"]["scores"]["bad-const"] == pytest.approx(0.0, abs=1e-12)
    assert m["global_e"]["scores"]["bad-const"] == pytest.approx(0.0, abs=1e-12)
    h = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))
    assert m["local_e"]["scores"]["bad-const"] == pytest.approx(h)
    # ZPS: mean top-1 minus top-2 margins 0.85 (bad-const) and 0.7 (the others); 2-means leaves bad-const alone
    # in the confident cluster, so every pseudo-label is label 0 and a prompt scores its share of 0-predictions
    assert m["zps_vote"]["scores"] == {"bad-const": 1.0, "bad-swap": 0.25, "good": 0.5, "good-copy": 0.5}
    assert m["zps_vote"]["selected"] == "bad-const" and m["zps_vote"]["performance"] == 0.5
    assert m["fute"]["performance"] == 1.0 and m["fute"]["rate"] == 1.0 and m["fute"]["rank_of_best"] == 1
    assert not any(v["uses_labels"] for k, v in m.items() if k != "fute")
    assert "spell" in res["not_applicable"] and "spell" not in m


def test_cost_model_and_break_even_by_hand(tmp_path: Path) -> None:
    """k_p = 3, k_D = 4, m = 100, n = 50, c_call = 0.1 s, c_mte = 20 s, c_dte = 10 s:
    FUTE 300 calls, 3 (10 + 20) + 4 x 10 = 130 s; baselines 600 calls, 3 x 4 x 50 x 0.1 = 60 s;
    calls break even at k_D = 100 / 50 = 2; seconds at k_D = 3 x 30 / (15 - 10) = 18; symmetric k = 40 / 5 = 8."""
    assert fc.cost_model(3, 4, 100, 50, 0.1, 20, 10) == pytest.approx(
        {"fute_calls": 300, "baseline_calls": 600, "fute_seconds": 130, "baseline_seconds": 60})
    assert fc.break_even(100, 50, 0.1, 20, 10, k_p=3) == pytest.approx(
        {"k_d_calls": 2, "k_d_seconds": 18, "k_symmetric_seconds": 8})
    assert fc.break_even(100, 50, 0.1, 20, 10, k_p=1)["k_d_seconds"] == math.inf  # 1 x 50 x 0.1 <= c_dte
    st = _prompt_store(tmp_path)
    st.write_result({"run_key": "probe1", "experiment": "e", "kind": "probe", "wall_time_s": 30.0,
                     "metrics": {"calls": 100}})
    st.write_result({"run_key": "probe2", "experiment": "e", "kind": "probe", "wall_time_s": 10.0,
                     "metrics": {"calls": 100}})
    st.ingest()
    with open_store(st.db_path) as con:
        u = fc.measured_units(con, "e")
        rep = fc.cost_report(con, "e", k_p=4, k_d=2)
    assert (u["m"], u["c_call"], u["n"], u["c_call_eval"], u["c_mte"], u["c_dte"]) == (100, 0.2, 4, 0.5, 1.0, 1.0)
    assert rep["at"] == {"fute_calls": 400, "baseline_calls": 32, "fute_seconds": pytest.approx(4 * 21 + 2),
                         "baseline_seconds": pytest.approx(6.4)}


@needs_taskweb
def test_fute_as_taskshops_f_on_the_taskweb_release(tmp_path: Path) -> None:
    """DTE vectors for every TaskWeb task (seeded, so cosines are known by numpy); FUTE's stored F and
    TaskShop over it equal Eq. 1 computed by the loop reference, and the pure FUTE ranking's NDCG equals
    TaskWeb's NDCG computed by the loop reference."""
    db = copy_db(taskweb_db(), tmp_path)
    st = ResultStore(tmp_path, db_path=db)
    lines = (TASKWEB / "transfer_scores.csv").read_text().splitlines()[1:]
    tasks = sorted({x.split(",")[0] for x in lines} | {x.split(",")[1] for x in lines})
    rng = np.random.default_rng(7)
    vecs = {t: rng.normal(size=16).astype(np.float32).astype(np.float64) for t in tasks}  # stored as float32
    for t in tasks:
        put(st, f"d-{t}", "TW0001", "DTE", t, vecs[t].tolist(), data="prompted:32")
    st.ingest()
    F = {(s, t): cos(vecs[s], vecs[t]) for s in tasks for t in tasks if s != t}
    T = ref.load_transfer_csv(TASKWEB / "transfer_scores.csv")["finetune:t5l"]
    with open_store(db) as con:
        f = te.store_fute(con, "TW0001", "dte")
        ts = sel.compute_taskshop(con, "finetune:t5l", f, 0.7)
        got = {(s, t): v for s, t, v in con.execute("SELECT source, target, score FROM selector_scores WHERE selector = ?",
                                                    [ts]).fetchall()}
        res = fe.evaluate_method(con, f, "finetune:t5l", metrics="taskweb")
    for (s, t), v in list(got.items())[:60]:
        assert v == pytest.approx(ref.taskshop(T, F, s, t, 0.7), abs=1e-9)
    want = ref.evaluate(T, F, {k: 1.0 for k in T}, list(res["by_target"]), 5)
    for t, row in res["by_target"].items():
        assert row["ndcg"] == pytest.approx(want[t][0], abs=1e-9)
    assert res["n_targets"] == 20 and 1 <= res["rho"] <= 21


def test_report_writes_the_numbers_and_figures_it_computes(tmp_path: Path) -> None:
    from analysis.reports.fute import write_fute_report

    st = _prompt_store(tmp_path)
    with open_store(st.db_path) as con:
        numbers = write_fute_report(con, tmp_path / "rep", "SP", "zs", ["cb"], local_setup=None)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Space `space-SP` (id `SP`" in text
    assert "FUTE's ranking in space-SP: good, good-copy, bad-const, bad-swap." in text
    assert "| fute [space-SP] | 100.00 | 100.00 |" in text and "spell: no prompt perplexity stored" in text
    assert "| fute [space-SP] | 3, 4 | good | 100.00 |" in text
    assert "Duplicate `good-copy` of `good`: cos(MTE, MTE) = 1.000000, FUTE positions 1 and 2." in text
    for fig in ("retrieval.png", "projection.png", "prompts.png"):
        assert (tmp_path / "rep" / fig).stat().st_size > 1000
    assert numbers["prompt_summary"]["fute [space-SP]"]["rho"] == 1.0
