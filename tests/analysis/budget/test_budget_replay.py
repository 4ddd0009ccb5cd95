"""Replay of the TaskWeb release: derived baselines reproduce the published PC / PM, the numpy
metrics equal the SQL family, and episodes are deterministic."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from analysis_support import TASKWEB, needs_taskweb

from analysis.errors import AnalysisError

pytestmark = needs_taskweb


@functools.lru_cache(maxsize=1)
def _con():
    from analysis.budget.replay import taskweb_store

    return taskweb_store(TASKWEB)


@functools.cache
def _grid(setup: str):
    from analysis.budget.replay import load_grid

    return load_grid(_con(), setup)


EXACT = ["bitfit:t5b", "finetune:gpt2m", "finetune:roberta", "finetune:t5b", "finetune:t5l", "finetune:t5s",
         "pfeiffer:t5b"]


@pytest.mark.parametrize("setup", EXACT)
def test_derived_baselines_reproduce_published_pc_and_pm(setup):
    g = _grid(setup)
    pc, pm, score = g.score(np.ones(len(g.seeds), bool))
    have = ~np.isnan(g.published["pc"])
    assert have.sum() == 441 and g.exact.all()
    assert np.abs(pc - g.published["pc"])[have].max() < 1e-12
    assert np.array_equal(pm[have], g.published["pm"][have])  # exactly: ties and failed runs as the release
    # the TaskWeb score of the release, recomputed by hand for one pair
    i, j = g.sources.index("anli_r3"), g.targets.index("rte")
    b = g.base[j]
    x = g.x[i, j]
    assert score[i, j] == pytest.approx(0.5 * np.mean((x - b) / b) + 0.5 * (0.2 * np.mean(x > b) - 0.1))


def test_cb_pc_uses_accuracy_and_regret_keeps_the_task_metric():
    g = _grid("finetune:t5l")
    assert g.metric_of == {"cb": "accuracy"}
    j = g.targets.index("cb")
    assert not np.allclose(g.x[:, j], g.p[:, j], equal_nan=True)  # P stays the store's acc+F1 mean


def test_setups_without_published_pc_get_estimated_baselines():
    from analysis.budget.replay import load_grid  # noqa: F401

    assert not _grid("lora:t5b").exact.any() and not np.isnan(_grid("lora:t5b").base).any()
    # the estimator (median transfer per target and seed) against the exact baselines of t5l
    g = _grid("finetune:t5l")
    med = np.nanmedian(np.where(g.ran, g.x, np.nan), axis=0)
    err = np.abs(med - g.base) / g.base
    assert 0 < err.mean() < 0.06


def test_numpy_metrics_equal_the_sql_family():
    from analysis.budget import metrics as M
    from analysis.ranking.families import taskweb_metrics

    g = _grid("finetune:t5l")
    all8 = np.ones(8, bool)
    gold, perf = g.score(all8)[2], g.perf(all8)
    roe = g.priors["roe"]
    s, t = np.nonzero(g.pairs)
    preds = pa.table({"variant": [0] * len(s), "target": [g.targets[j] for j in t],
                      "source": [g.sources[i] for i in s], "pred": roe[s, t]})
    rows = {r["target"]: r for r in taskweb_metrics(_con(), preds, "finetune:t5l", g.targets, 5)}
    nd, rg = M.ndcg(roe, gold, g.pairs), M.regret(roe, gold, perf, g.pairs, 5)
    for j, name in enumerate(g.targets):
        assert nd[j] == pytest.approx(rows[name]["ndcg"], abs=1e-12)
        assert rg[j] == pytest.approx(rows[name]["regret"], abs=1e-12)
    # Table 2 of TaskWeb: RoE's NDCG over the 20 targets without piqa is 64.5
    assert round(100 * np.mean([nd[j] for j, n in enumerate(g.targets) if n != "piqa"]), 1) == 64.5


def test_replay_is_deterministic_and_refuses_unseen_seeds():
    from analysis.budget.evaluate import evaluate, run_episode
    from analysis.budget.replay import Replay

    g = _grid("finetune:t5s")
    a = [25, 10, 40, 35]
    p1, r1 = run_episode(g, "active", a, 700)
    p2, r2 = run_episode(g, "active", a, 700)
    assert r1.done == r2.done and p1.ranking() == p2.ranking() and r1.cost == r2.cost
    assert {k for _, _, k in r1.done} <= set(a) and r1.cost.total <= 700
    e1 = evaluate(g, "racing", [0.15], n_splits=2, keep_runs=True)
    e2 = evaluate(g, "racing", [0.15], n_splits=2, keep_runs=True)
    assert e1 == e2 and len(e1["splits"]) == 2
    rep = Replay(g, a)
    with pytest.raises(AnalysisError, match="seed 15 is not among"):
        rep.run("boolq", "rte", 15)
    assert rep.run("boolq", "rte", 10) == pytest.approx(g.z()[g.sources.index("boolq"), g.targets.index("rte"), 0])
    rep.run("cb", "rte", 10)
    assert (rep.cost.transfers, rep.cost.baselines, rep.cost.sources) == (2, 1, 2)


def test_local_store_uses_its_baseline_runs_and_predicts_untrained_pairs():
    import duckdb

    from analysis.budget.replay import load_grid
    from analysis.budget.store import predict_setup, write_predictions
    from analysis.store.results import SCHEMA_SQL
    from analysis.store.views import ANALYSIS_SQL

    con = duckdb.connect()
    con.execute(SCHEMA_SQL)
    con.execute(ANALYSIS_SQL)
    rows = [("target", None, "x", 1, 0.50), ("target", None, "x", 2, 0.60), ("target", None, "y", 1, 0.80),
            ("target", None, "y", 2, 0.70), ("transfer", "y", "x", 1, 0.55), ("transfer", "y", "x", 2, 0.54),
            ("transfer", "z", "x", 1, 0.40), ("transfer", "x", "y", 1, 0.88)]
    for n, (kind, s, t, k, v) in enumerate(rows):
        con.execute("INSERT INTO runs (run_key, kind, setup, source, target, seed, score, status, hparams) "
                    "VALUES (?, ?, 'full:tiny', ?, ?, ?, ?, 'ok', '{}')", [f"k{n}", kind, s, t, k, v])
    g = load_grid(con, "full:tiny", priors=[])
    assert g.sources == ["x", "y", "z"] and g.targets == ["x", "y"] and g.seeds == [1, 2] and g.exact.all()
    assert np.allclose(g.base, [[0.5, 0.6], [0.8, 0.7]])
    z = g.z()
    assert z[1, 0, 1] == pytest.approx(0.5 * (0.54 - 0.6) / 0.6 + 0.0 - 0.05)  # y -> x at seed 2: negative
    assert z[0, 1, 0] == pytest.approx(0.5 * 0.1 + 0.1 - 0.05)  # x -> y at seed 1: +10%, positive
    table = predict_setup(con, "full:tiny")
    got = {(s, t): (o, n) for s, t, o, n in zip(*(table.column(c).to_pylist() for c in
                                                  ("source", "target", "observed", "seeds_run")), strict=True)}
    assert got == {("y", "x"): (True, 2), ("z", "x"): (True, 1), ("x", "y"): (True, 1), ("z", "y"): (False, 0)}
    write_predictions(con, table)
    assert con.execute("SELECT count(*) FROM analysis_transfers WHERE setup = 'full:tiny@predicted'").fetchone()[0] == 4
    # a budgeted grid's plan names tasks nothing was trained from (w) or into (z): every pair among them
    table = predict_setup(con, "full:tiny", tasks=["w", "x", "y", "z"])
    pairs = set(zip(table.column("source").to_pylist(), table.column("target").to_pylist(), strict=True))
    assert pairs == {(s, t) for s in "wxyz" for t in "wxyz" if s != t}
    observed = {(s, t) for s, t, o in zip(*(table.column(c).to_pylist() for c in ("source", "target", "observed")),
                                           strict=True) if o}
    assert observed == {("y", "x"), ("z", "x"), ("x", "y")}
    with pytest.raises(AnalysisError, match="no transfer runs for setup 'full:nope'"):
        load_grid(con, "full:nope")
