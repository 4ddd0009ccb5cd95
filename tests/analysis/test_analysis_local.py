"""Locally produced results analyse exactly like published ones.

Fast test: runs written the way the pairwise job writes them (one Parquet file per run through
`ResultStore.write_result`, then `ingest`; source runs, target-only baselines, seed-paired
transfers) give the same matrices, commutativity, transitivity, TaskShop scores, NDCG/Regret and
multi-task sets as the same PC/PM stored as published scores, and as the loop references.

Integration test (marker `integration`, about two minutes on a 2-core laptop): the real
`transferlab run configs/quickstart.yaml --smoke`, then every analysis command on its store.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import loop_reference as ref
import numpy as np
import pytest
from analysis_support import ROOT, TASKWEB, needs_taskweb

from analysis import transfer as an
from analysis.importers.taskweb import import_taskweb
from analysis.ranking.evaluate import evaluate_selection
from analysis.selection import selectors as sel
from analysis.selection.source_sets import select_sources
from analysis.store.duck import open_store
from analysis.store.results import ResultStore

TASKS = ["cb", "copa", "rte", "wic", "wsc"]
SEEDS = [1, 2, 3]
SETUP = "full:minilm"


def _local_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    hp = {"epochs": 2, "learning_rate": 5e-5, "batch_size": 16}
    rows = []
    for seed in SEEDS:
        for t in TASKS:
            rows.append({"run_key": f"src-{t}-{seed}", "kind": "source", "source": t, "seed": seed, "n_train": 400,
                         "score": float(rng.uniform(0.5, 0.9))})
            rows.append({"run_key": f"tgt-{t}-{seed}", "kind": "target", "target": t, "seed": seed,
                         "score": float(rng.uniform(0.5, 0.9))})
    base = {(r["target"], r["seed"]): r["score"] for r in rows if r["kind"] == "target"}
    for seed in SEEDS:
        for s in TASKS:
            for t in TASKS:
                if s != t:
                    p = base[(t, seed)] * (1 + float(rng.normal(0.01, 0.04)))
                    rows.append({"run_key": f"x-{s}-{t}-{seed}", "kind": "transfer", "source": s, "target": t,
                                 "seed": seed, "score": p, "source_run_key": f"src-{s}-{seed}",
                                 "baseline_run_key": f"tgt-{t}-{seed}"})
    for r in rows:
        r.update({"experiment": "local-test", "setup": SETUP, "model": "minilm", "adaptation": "full",
                  "hparams": hp, "metric": "accuracy", "status": "ok"})
    return rows


def _roe_only(tmp: Path) -> Path:
    d = tmp / "roe_only"
    d.mkdir()
    shutil.copy(TASKWEB / "roe_scores_minilm_dot32.csv", d)  # a temp copy, read at run time
    return d


def _everything(con) -> dict:
    return {
        "setups": an.available_setups(con),
        "matrix": an.transfer_matrix(con, SETUP).round(12).to_dict(),
        "comm": an.commutativity(con, SETUP),
        "trans": an.transitivity(con, [0.0, 0.01, 0.02], [SETUP]).to_dict(orient="records"),
        "roe": evaluate_selection(con, "roe", SETUP, k=2),
        "taskshop": evaluate_selection(con, "taskshop-roe", SETUP, lam=0.7, k=2),
        "taskshop_scores": sorted(con.execute("SELECT source, target, round(score, 12) FROM selector_scores "
                                              "WHERE selector = ?", [sel.taskshop_name("roe", SETUP, 0.7)]).fetchall()),
        "oracle_sets": select_sources(con, "rte", "oracle", 2, setup=SETUP, seed=1),
    }


@needs_taskweb
def test_local_runs_analyse_like_published_scores(tmp_path):
    rows = _local_rows()
    # 1. the pairwise job's way: one result file per run, ingested into DuckDB
    local = ResultStore(tmp_path / "local")
    local.ensure_writable()
    for r in rows:
        local.write_result(r)
    local.ingest()
    # 2. the same transfers as published PC / PM (plus the transfer runs for Regret@k, no baselines)
    pc, pm = defaultdict(list), defaultdict(list)
    base = {(r["target"], r["seed"]): r["score"] for r in rows if r["kind"] == "target"}
    for r in rows:
        if r["kind"] == "transfer":
            b = base[(r["target"], r["seed"])]
            pc[(r["source"], r["target"])].append((r["score"] - b) / b)
            pm[(r["source"], r["target"])].append(1.0 if r["score"] > b else 0.0)
    pub = ResultStore(tmp_path / "pub")
    pub.ensure_writable()
    with pub.connect() as con:
        con.executemany("INSERT INTO published_transfer_scores VALUES ('minilm', 'full', ?, ?, ?, ?, 'paper-x')",
                        [(s, t, float(np.mean(pc[(s, t)])), float(np.mean(pm[(s, t)]))) for (s, t) in pc])
        pub.insert_rows([{**r, "baseline_run_key": None, "provenance": "paper-x"} for r in rows
                         if r["kind"] == "transfer"], con)
    results = []
    for store in (local, pub):
        with store.connect() as con:
            import_taskweb(con, _roe_only(store.root))
            results.append(_everything(con))
            provenance = con.execute("SELECT DISTINCT provenance FROM transfer_scores").fetchall()
        assert provenance == ([("local",)] if store is local else [("paper-x",)])
    got_local, got_pub = results
    _assert_same(got_local, got_pub)

    # and both equal the loop references of the formulas
    T = {k: ref.combined(float(np.mean(pc[k])), float(np.mean(pm[k]))) for k in pc}
    n, same = ref.commutativity(T)
    assert (got_local["comm"]["n_pairs"], got_local["comm"]["n_commutative"]) == (n, same) == (10, same)
    want_trans = ref.transitivity(T, [0.0, 0.01, 0.02])
    assert [(r["threshold"], r["n_triples"], r["n_positive"]) for r in got_local["trans"]] == want_trans
    F = ref.load_pairs_csv(TASKWEB / "roe_scores_minilm_dot32.csv")
    perf = {(r["source"], r["target"]): 0.0 for r in rows if r["kind"] == "transfer"}
    for k in perf:
        perf[k] = float(np.mean([r["score"] for r in rows if r["kind"] == "transfer" and (r["source"], r["target"]) == k]))
    want = ref.evaluate(T, F, perf, TASKS, k=2)
    for t in TASKS:
        assert got_local["roe"]["by_target"][t]["ndcg"] == pytest.approx(want[t][0], abs=1e-12)
        assert got_local["roe"]["by_target"][t]["regret_at_2"] == pytest.approx(want[t][1], abs=1e-12)
    # TaskShop scores every (source with transfers, any target F covers), unseen targets included
    got_ts = {(s, t): v for s, t, v in got_local["taskshop_scores"]}
    assert set(got_ts) == {(s, t) for (s, t) in F if s in TASKS and s != t}
    for (s, t), v in got_ts.items():
        assert v == pytest.approx(ref.taskshop(T, F, s, t, 0.7), abs=1e-11)
    # local data: every target of the setup is evaluated, categorised by Table 2's map
    assert {t: v["category"] for t, v in got_local["roe"]["by_target"].items()} == {
        "cb": "nli", "copa": "commonsense", "rte": "nli", "wic": "semantics", "wsc": "semantics"}


@pytest.mark.integration
@needs_taskweb
def test_real_quickstart_store(tmp_path, capsys):
    from rayjobs.cli import main
    from rayjobs.config import load_config

    results = tmp_path / "qs"
    config = ROOT / "configs" / "quickstart.yaml"
    target = load_config(config).tasks.target_list[0]
    assert main(["run", str(config), "--smoke", "--results", str(results)]) == 0
    capsys.readouterr()
    db = str(results / "transferlab.duckdb")
    assert main(["import", "taskweb", str(_roe_only(tmp_path)), "--db", db]) == 0
    assert main(["evaluate-selection", "--selector", "taskshop-roe", "--setup", SETUP, "--k", "1", "--json", "--db", db]) == 0
    assert main(["select", "--target", target, "--selector", "oracle", "--setup", SETUP, "--k", "1", "--json", "--db", db]) == 0
    assert main(["report", "--out", str(tmp_path / "rep"), "--setup", SETUP, "--db", db]) == 0
    out = capsys.readouterr().out
    ev, chosen = _two_json(out)
    with open_store(db) as con:
        rows = con.execute("SELECT source, target, score FROM transfer_scores WHERE setup = ?", [SETUP]).fetchall()
        perf = dict(((s, t), p) for s, t, p in con.execute(
            "SELECT source, target, perf FROM target_performance WHERE setup = ?", [SETUP]).fetchall())
    T = {(s, t): v for s, t, v in rows}
    assert len(T) == 6  # 3 tasks, every ordered pair
    F = ref.load_pairs_csv(TASKWEB / "roe_scores_minilm_dot32.csv")
    TS = {(s, t): ref.taskshop(T, F, s, t, 0.7) for (s, t) in T}
    want = ref.evaluate(T, TS, perf, sorted({t for _, t in T}), k=1)
    for t, (ndcg, regret) in want.items():
        assert ev["by_target"][t]["ndcg"] == pytest.approx(ndcg, abs=1e-12)
        assert ev["by_target"][t]["regret_at_1"] == pytest.approx(regret, abs=1e-12)
    assert chosen["top"] == [ref.rank({s: T[(s, target)] for (s, t) in T if t == target})[0]]
    assert (tmp_path / "rep" / "index.html").is_file()


def _assert_same(a: object, b: object, path: str = "") -> None:
    """Equal structures; floats equal to 1e-12 (SQL and Python sum in different orders), NaN == NaN."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-12), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _two_json(text: str) -> tuple[dict, dict]:
    """The first two JSON objects printed (evaluate-selection, then select)."""
    dec = json.JSONDecoder()
    objs, i = [], 0
    while len(objs) < 2:
        i = text.index("{", i)
        obj, end = dec.raw_decode(text, i)
        objs.append(obj)
        i = end
    return objs[0], objs[1]
