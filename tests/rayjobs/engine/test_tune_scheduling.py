"""Ray Tune as the scheduler: the dependency searcher's contract (Tune's Searcher API, no cluster needed),
one Tune experiment per run that Tune's own tools open, logger callbacks, early stopping with ASHA
stored as `stopped` runs, and `Tuner.restore` of a driver killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from analysis.store.results import ResultStore
from rayjobs.config import PairwiseConfig
from rayjobs.plan import expand_pairwise
from rayjobs.tasks.registry import TaskRegistry
from tests.conftest import DATA, REPO, cli, needs_data, tiny_grid


def grid_trials(tmp: Path) -> list[Any]:
    import yaml

    cfg = PairwiseConfig.model_validate(yaml.safe_load(tiny_grid("s")))
    return expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp))


@needs_data
def test_searcher_releases_each_trial_when_its_dependencies_are_stored(tmp_path: Path) -> None:
    from ray.tune.search import Searcher

    from rayjobs.engine.tuning import make_searcher

    trials = grid_trials(tmp_path)  # 2 sources, 2 baselines, 2 transfers (each from one source)
    by = {(t.kind, t.source or t.target): t for t in trials}
    s = make_searcher(trials, set(), "broker-x", own_pool=False)
    handed = {}
    for i in range(4):  # the four trials with no dependency, in plan order; then nothing is ready
        cfg = s.suggest(f"t{i}")
        handed[f"t{i}"] = cfg["run_key"]
    assert [trials[i].run_key for i in range(4)] == list(handed.values())
    assert s.suggest("t4") is None  # both transfers wait for their sources (no FINISHED: work is in flight)
    src_snli = next(tid for tid, k in handed.items() if k == by["source", "snli"].run_key)
    s.on_trial_complete(src_snli, {"final": True, "status": "ok"})
    cfg = s.suggest("t5")  # snli's transfer only (its source is stored), not mrpc's
    assert cfg["run_key"] == next(t.run_key for t in trials if t.kind == "transfer" and t.source == "snli")
    assert cfg["trial"]["run_key"] == cfg["run_key"] and cfg["broker"] == "broker-x"
    assert s.suggest("t6") is None
    src_mrpc = next(tid for tid, k in handed.items() if k == by["source", "mrpc"].run_key)
    s.on_trial_complete(src_mrpc, None, error=True)  # mrpc's source failed for good: its transfer is blocked
    mrpc_transfer = next(t.run_key for t in trials if t.kind == "transfer" and t.source == "mrpc")
    assert s.blocked == [mrpc_transfer]
    state = tmp_path / "searcher.json"
    s.save(str(state))
    for tid in ("t2", "t3", "t5"):
        s.on_trial_complete(tid, {"final": True, "status": "ok"})
    assert s.suggest("t7") is Searcher.FINISHED

    # a restored searcher resumes: the trials in flight at save time are Tune's to resume, nothing is re-handed
    r = make_searcher(trials, set(), "broker-x", own_pool=False)
    r.restore(str(state))
    assert r.suggest("t8") is None and set(r.live.values()) == {handed["t2"], handed["t3"], cfg["run_key"]}
    for tid in ("t2", "t3", "t5"):
        r.on_trial_complete(tid, {"final": True, "status": "ok"})
    assert r.suggest("t9") is Searcher.FINISHED and r.blocked == [mrpc_transfer]


@needs_data
def test_searcher_blocks_dependents_of_a_stopped_run_and_never_suggests_a_stored_one(tmp_path: Path) -> None:
    from rayjobs.engine.tuning import make_searcher

    trials = grid_trials(tmp_path)
    stored = {t.run_key for t in trials if t.kind == "target"}
    s = make_searcher([t for t in trials if t.run_key not in stored], stored, "b", own_pool=False)
    first, second = s.suggest("a"), s.suggest("b")
    assert {first["run_key"], second["run_key"]} == {t.run_key for t in trials if t.kind == "source"}
    s.on_trial_complete("a", {"final": False, "validation_score": 0.1})  # ASHA stopped it: no final result
    assert first["run_key"] in s.stopped and len(s.blocked) == 1
    s.on_trial_complete("b", {"final": True, "status": "ok"})
    third = s.suggest("c")
    assert third["trial"]["source_run_key"] == second["run_key"]


def experiment_dir(results: Path) -> Path:
    runs = sorted((results / "tune").iterdir())
    assert runs, "no Tune experiment folder"
    return runs[-1]


@needs_data
@pytest.mark.integration
def test_a_run_is_one_tune_experiment_that_tune_opens_with_its_logger_files(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(tiny_grid("tuned") + "\n")
    r = cli("run", str(cfg), "run.callbacks=[csv,json,tensorboard]", "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = experiment_dir(tmp_path / "res")
    assert f"ray.tune.ExperimentAnalysis('{exp}')" in r.stdout and f"rayjobs.engine.tuning restore {exp}" in r.stdout
    code = ("import json, sys; from ray.tune import ExperimentAnalysis; a = ExperimentAnalysis(sys.argv[1]); "
            "print(json.dumps({t.config['run_key']: t.last_result.get('status') for t in a.trials}))")
    out = subprocess.run([sys.executable, "-c", code, str(exp)], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    by_tune = json.loads(out.stdout.strip().splitlines()[-1])
    con = duckdb.connect(str(tmp_path / "res" / "transferlab.duckdb"), read_only=True)
    stored = dict(con.execute("SELECT run_key, status FROM runs").fetchall())
    con.close()
    assert by_tune == stored and len(stored) == 6  # every trial a Tune trial, keyed by its run key
    for key in stored:  # the loggers asked for wrote their files in each trial's folder
        trial = exp / key
        assert (trial / "progress.csv").is_file() and (trial / "result.json").is_file()
        assert any(p.name.startswith("events.out.tfevents") for p in trial.iterdir())
    again = cli("run", str(cfg), "--results", str(tmp_path / "res"))
    assert again.returncode == 0 and "6 already stored, 0 to run" in again.stdout


ASHA_GRID = """
name: asha
data_root: {data}
tasks: {{sources: [snli, mrpc, scitail], targets: [cb]}}
seeds: [7]
sizes: {{source_train: 48, target_train: 48, eval: 16}}
setups:
  - name: good
    model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 2, batch_size: 4, learning_rate: 1.0e-3, eval_every: 1, validation: {{n: 16}}}}
  - name: bad
    model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 2, batch_size: 4, learning_rate: 30.0, eval_every: 1, validation: {{n: 16}}}}
run: {{max_concurrent_trials: 1, scheduler: {{asha: {{grace_period: 2, reduction_factor: 2, max_t: 100}}}}}}
"""


@needs_data
@pytest.mark.integration
def test_asha_stops_trials_which_are_stored_as_decided_stopped_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "asha.yaml"
    cfg.write_text(ASHA_GRID.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # stopped runs are no failures
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT run_key, kind, setup, status, metrics, hparams FROM runs").fetchall()
    stopped = [x for x in rows if x[3] == "stopped"]
    assert stopped, [(x[1], x[2], x[3]) for x in rows]
    assert not [x for x in rows if x[3] == "failed"]
    full_steps = 16  # 2 epochs of 32 training examples (48 less 16 held out for validation) in batches of 4
    for *_, metrics, hparams in stopped:
        m = json.loads(metrics)
        # stopped after ASHA's first rung (grace period 2 steps) and before the end, with its last validation
        # (the worker trains on while Tune decides, so it may stop a step or two past the rung)
        assert 2 <= m["stopped_at_step"] < full_steps and m["last_validation_score"] is not None, m
        assert len(m["validation_curve"]) == m["stopped_at_step"]
        assert json.loads(hparams)["steps"] < full_steps
    ok_sources = {x[0] for x in rows if x[3] == "ok" and x[1] == "source"}
    # compute saved: optimiser steps run against every source and baseline trained to the end
    steps = sum(json.loads(x[5])["steps"] for x in rows if x[1] in ("source", "target"))
    n_single = sum(1 for x in rows if x[1] in ("source", "target"))
    assert steps < n_single * full_steps
    # a transfer from a stopped source never runs, and nothing about it is an error
    stopped_keys = {x[0] for x in stopped}
    transfers = con.execute("SELECT source_run_key, status FROM runs WHERE kind = 'transfer'").fetchall()
    assert all(src in ok_sources and st in ("ok", "stopped") for src, st in transfers)
    assert con.execute("SELECT count(*) FROM transfer_runs WHERE run_key IN (SELECT unnest($k))",
                       {"k": list(stopped_keys)}).fetchone()[0] == 0
    con.close()
    again = cli("run", str(cfg), "--results", str(results), timeout=600)  # decided: nothing is retried
    assert again.returncode == 0 and " 0 to run" in again.stdout, again.stdout[-2000:]


@needs_data
@pytest.mark.integration
def test_tuner_restore_resumes_an_experiment_whose_driver_was_killed(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(tiny_grid("restored"))
    results = tmp_path / "res"
    env = {**os.environ, "TRANSFERLAB_FAULT": "sleep3:full:tiny"}
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "run", str(cfg), "--results", str(results)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    store = ResultStore(results)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(store.runs_dir.glob("*.parquet"))) < 2 if store.runs_dir.exists() \
            else time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in store.runs_dir.glob("*.parquet")}
    assert 2 <= len(before) < 6
    exp = experiment_dir(results)
    r = subprocess.run([sys.executable, "-m", "rayjobs.engine.tuning", "restore", str(exp)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name, m in before.items():  # what was stored before the kill is not trained again
        assert (store.runs_dir / name).stat().st_mtime_ns == m, name
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT run_key), count(*) FILTER (status = 'ok') "
                       "FROM runs").fetchone() == (6, 6, 6)
    con.close()


@needs_data
@pytest.mark.integration
def test_mlflow_and_wandb_callbacks_log_every_trial_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow to a local file store and W&B in offline mode: no server, no network."""
    cfg = tmp_path / "g.yaml"
    cfg.write_text(tiny_grid("tracked", sources="[snli]", targets="[mrpc]"))
    results = tmp_path / "res"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    r = cli("run", str(cfg), "run.callbacks=[mlflow,wandb]", "--results", str(results), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tune_dir = results / "tune"
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the local file store, as the run wrote it
    client = mlflow.tracking.MlflowClient(tracking_uri=(tune_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    scores = dict(con.execute("SELECT run_key, score FROM runs").fetchall())
    con.close()
    logged = {run.data.params["run_key"]: run.data.metrics.get("score") for run in runs}
    assert logged.keys() == scores.keys() and len(scores) == 3
    for key, score in scores.items():
        assert logged[key] == pytest.approx(score)
    offline = list((tune_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3, list((tune_dir).iterdir())


BUDGET_GRID = """
name: budgeted
data_root: {data}
tasks: {{sources: [snli, mrpc, scitail], targets: null}}
seeds: [7, 8]
sizes: {{source_train: 16, target_train: 16, eval: 16}}
setups:
  - model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 1, batch_size: 8}}
budget: {{runs: 0.5, policy: racing, k: 1}}
"""


@needs_data
@pytest.mark.integration
def test_budgeted_grid_trains_what_its_policy_proposes_within_the_budget(tmp_path: Path) -> None:
    """3 tasks x 2 seeds: 6 sources + 6 baselines + 12 transfers = 24 runs; a budget of half of them.
    Racing gives every pair one seed first (6 transfers + their 3 sources and 3 baselines = 12 runs):
    that is the budget, so the second seed is never trained."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text(BUDGET_GRID.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "a budget of 12 (racing)" in r.stdout
    assert "budget: 12 of 24 runs of the full grid spent (6 transfers, 3 baselines, 3 sources); 12 runs left " \
           "out by the budget" in r.stdout, r.stdout[-2000:]
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT kind, seed, status FROM runs").fetchall()
    con.close()
    assert len(rows) == 12 and all(st == "ok" for *_, st in rows)
    assert {seed for kind, seed, _ in rows} == {7}  # one seed on every pair first: the first seed
    assert sorted(k for k, *_ in rows).count("transfer") == 6
    again = cli("run", str(cfg), "--results", str(results), timeout=600)  # the stored runs are replayed
    assert again.returncode == 0 and "12 already stored, 12 to run" in again.stdout, again.stdout[-2000:]
    assert "budget: 12 of 24 runs" in again.stdout
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 12  # nothing more was trained


def test_a_config_that_fails_its_checks_leaves_nothing_behind(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(tiny_grid("bad", sources="[snli, no_such_task]"))
    results = tmp_path / "deep" / "res"
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 2 and "no_such_task" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "deep").exists()  # no runs/, checkpoints/ or DuckDB file, not even the parent
    (tmp_path / "file").write_text("x")
    r = cli("run", str(cfg), "--results", str(tmp_path / "file"))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
