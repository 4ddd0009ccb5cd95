"""Faults at scale, small (issue 20 point 4): a few hundred simulated trials on a two-node cluster; a
worker node is removed and another added, the driver is killed once and restarted; the store ends with
every run exactly once. Scheduler-agnostic: it drives `python -m rayjobs.pairwise` and kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from cluster_support import REPO, LocalCluster

from analysis.store.results import ResultStore
from tests.conftest import DATA

TASKS = ["snli", "mrpc", "rte", "cb", "boolq", "copa"]
SEEDS = [1, 2, 3, 4, 5, 6]
PLANNED = len(TASKS) * len(SEEDS) * 2 + len(TASKS) * (len(TASKS) - 1) * len(SEEDS)  # 252
EXAMPLES = 20


def _config(path: Path) -> Path:
    cfg = {"job": "pairwise", "name": "faults", "data_root": str(DATA), "tasks": {"sources": TASKS},
           "seeds": SEEDS, "sizes": {"target_train": 100, "eval": EXAMPLES},
           "setups": [{"name": "sim:a", "model": {"name": "sim", "path": "builtin:minilm"},
                       "resources": {"cpu": 0.5},
                       "simulate": {"sleep_s": 0.05, "examples": EXAMPLES, "checkpoint_bytes": 256}}],
           "run": {"max_failures": 2}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stored(results: Path) -> int:
    try:
        t = ResultStore(results).read_runs(["run_key", "status"])
    except Exception:  # noqa: BLE001 - a folder being written; ask again
        return 0
    return sum(1 for s in t["status"].to_pylist() if s == "ok")


def _wait_for(results: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while _stored(results) < n:
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.monotonic() - t0 < timeout, f"fewer than {n} runs stored after {timeout}s"
        time.sleep(0.5)


def test_node_lost_and_added_and_driver_killed_every_run_once(tmp_path):
    cfg = _config(tmp_path / "faults.yaml")
    results = tmp_path / "results"
    cluster = LocalCluster(workers=2)
    try:
        env = cluster.driver_env(TRANSFERLAB_COMPACT_MIN_FILES="40")  # compaction runs during the faults too
        cmd = [sys.executable, "-m", "rayjobs.pairwise", "--config", str(cfg), "--results", str(results)]
        log = open(tmp_path / "driver1.log", "w")
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(results, PLANNED // 4, first)
            cluster.remove(cluster.nodes[0]["node_id"])  # a node lost with its trials
            cluster.add()
            _wait_for(results, PLANNED // 2, first)
            os.kill(first.pid, signal.SIGKILL)  # the driver, mid-run
            first.wait(timeout=60)
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
        assert _stored(results) < PLANNED
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "already stored" in second.stdout
    finally:
        cluster.stop()

    store = ResultStore(results)
    files = store.read_runs(["run_key", "status", "kind"])
    keys = files["run_key"].to_pylist()
    assert len(keys) == len(set(keys)) == PLANNED
    assert set(files["status"].to_pylist()) == {"ok"}
    plan = store.read_json("plan.json")["trials"]
    assert set(plan) == set(keys) == store.finished_keys()
    with store.connect() as con:
        assert con.execute("SELECT count(*), count(DISTINCT run_key) FROM runs").fetchone() == (PLANNED, PLANNED)
        assert con.execute("SELECT count(*), count(DISTINCT (key, task, example_id, template)), count(DISTINCT key) "
                           "FROM predictions").fetchone() == (PLANNED * EXAMPLES, PLANNED * EXAMPLES, PLANNED)
        n_pairs = con.execute("SELECT count(*) FROM transfer_scores WHERE provenance = 'local'").fetchone()[0]
    assert n_pairs == len(TASKS) * (len(TASKS) - 1)
    assert any(p.name.startswith("part-") for p in store.runs_dir.iterdir())  # compacted while it ran


def test_simulate_executor_writes_realistic_deterministic_rows(tmp_path):
    """The benchmark's executor: rows shaped like training's, predictions whose accuracy is the row's score,
    checkpoints for sources, a transfer refused without its source checkpoint; the same run key, the same row."""
    import numpy as np

    from rayjobs.engine.simulate import simulate_trial
    from rayjobs.job import load_job_config

    job, cfg = load_job_config(str(_config(tmp_path / "sim.yaml")), [], default_kind="pairwise")
    store = ResultStore(tmp_path / "results")
    store.ensure_writable()
    trials = job.plan(cfg, store).trials
    assert len(trials) == PLANNED and {t.executor for t in trials} == {"rayjobs.engine.simulate:simulate_trial"}
    source = next(t for t in trials if t.kind == "source")
    transfer = next(t for t in trials if t.kind == "transfer" and t.source_run_key == source.run_key)
    try:
        simulate_trial(transfer)
        raise AssertionError("a transfer ran without its source checkpoint")
    except FileNotFoundError as e:
        assert source.run_key in str(e)
    row = simulate_trial(source)
    assert (store.checkpoint_dir(source.run_key) / "adapter.bin").stat().st_size == 256
    preds = row["predictions"]
    assert len(preds) == EXAMPLES and row["n_eval"] == EXAMPLES
    assert row["score"] == np.mean([p["correct"] for p in preds])
    for p in preds:
        assert abs(sum(p["probs"]) - 1) < 1e-5 and p["prediction"] == int(np.argmax(p["probs"]))
        assert p["correct"] == (p["prediction"] == p["gold"]) and len(p["choices"]) == 2
    again = simulate_trial(transfer)
    assert again["predictions"] == simulate_trial(transfer)["predictions"]
    assert again["source_run_key"] == source.run_key and again["kind"] == "transfer"
