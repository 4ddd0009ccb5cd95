"""Warm workers and early release on a real local Ray cluster.

A warm worker runs trials one after another in one process: its results must equal fresh-process
runs of the same trials, and it must not pay per-trial start-up. A transfer starts as soon as its own
source is stored, not when every stage-1 trial is done. A failing trial is stored and its dependents
are blocked; a worker process that dies is replaced and its trial stored as failed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from analysis.store.results import ResultStore
from rayjobs.config import PairwiseConfig, RunSpec
from rayjobs.plan import TrialSpec, expand_pairwise
from rayjobs.tasks.registry import TaskRegistry
from rayjobs.train import loop as train_loop
from tests.conftest import DATA, REPO, local_ray

needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

TINY = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32}
#: injected failures: the "boom" setup's snli source raises, its mrpc baseline kills its worker process
FAULTS = "raise:source boom snli ;kill:target boom mrpc (baseline)"


def plan(results: Path, seed: int, name: str | None = None, source_train: int = 16,
         tasks: tuple[str, ...] = ("snli", "mrpc")) -> list[TrialSpec]:
    cfg = PairwiseConfig.model_validate({
        "name": "warm", "data_root": str(DATA), "tasks": {"sources": list(tasks)}, "seeds": [seed],
        "sizes": {"source_train": source_train, "target_train": 16, "eval": 16},
        "setups": [{"name": name, "model": {"name": "tiny", "config": TINY, "max_length": 48},
                    "train": {"epochs": 1, "batch_size": 8}}]})
    return expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(results))


def one(trials: list[TrialSpec], kind: str, task: str) -> TrialSpec:
    return next(t for t in trials if t.kind == kind and (t.source if kind == "source" else t.target) == task)


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    with local_ray(TRANSFORMERS_VERBOSITY="error", TRANSFERLAB_FAULT=FAULTS) as ray:
        yield ray
    from rayjobs.engine import observe

    observe.COUNTS.counts.clear()  # the driver's trial-state gauges of these runs end with this cluster


def test_process_state_is_restored_between_trials() -> None:
    """Everything a trial may change process-wide comes back to what the worker started with."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, torch.get_default_dtype(),
              torch.is_grad_enabled(), os.getcwd())
    state = train_loop.capture_process_state()
    try:
        torch.set_num_threads(before[0] + 1)
        torch.use_deterministic_algorithms(not before[1])
        torch.utils.deterministic.fill_uninitialized_memory = not before[2]
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        os.chdir("/")
    finally:
        train_loop.restore_process_state(state)
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.get_default_dtype(),
             torch.is_grad_enabled(), os.getcwd())
    assert after == before


def test_seeding_resets_every_generator_a_trial_draws_from() -> None:
    """A trial seeds python, numpy and torch first, so what ran before it in the process does not matter."""
    train_loop.seed_everything(5)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(3), torch.rand(7)  # a previous trial's draws
    train_loop.seed_everything(5)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def cold_runs(trials: list[TrialSpec]) -> None:
    """Each trial in a fresh Python process (side by side) with one torch thread, what Ray gives a
    1-CPU worker."""
    code = ("import sys; from rayjobs.plan import TrialSpec; from rayjobs.engine.trial import execute; "
            "execute(TrialSpec.model_validate_json(sys.argv[1]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    logs = [tempfile.TemporaryFile("w+") for _ in trials]  # not pipes: a full pipe would stall its process
    procs = [subprocess.Popen([sys.executable, "-c", code, t.model_dump_json()], stderr=log, stdout=subprocess.DEVNULL,
                              cwd=REPO, env=env, text=True) for t, log in zip(trials, logs, strict=True)]
    for proc, log in zip(procs, logs, strict=True):
        proc.wait(timeout=300)
        log.seek(0)
        assert proc.returncode == 0, log.read()[-2000:]


def stored(trial: TrialSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run row's result columns and the predictions rows of a stored trial."""
    store = ResultStore(trial.results_dir)
    row = store.read_result(trial.run_key)
    assert row is not None and row["status"] == "ok", row and row.get("error")
    keep = {k: row[k] for k in ("score", "n_train", "n_eval", "trainable_params", "total_params")}
    keep["metrics"] = {k: v for k, v in json.loads(row["metrics"]).items() if k != "node_id"}  # Ray's node
    keep["hparams"] = json.loads(row["hparams"])
    preds = pq.read_table(store.prediction_path(trial.run_key)).to_pylist()
    return keep, preds


@needs_data
@pytest.mark.integration
def test_two_trials_in_one_warm_worker_equal_two_cold_runs(ray_cluster: Any, tmp_path: Path) -> None:
    from rayjobs.engine.runner import run_stage

    a = one(plan(tmp_path / "warm", seed=7), "source", "snli")
    b = one(plan(tmp_path / "warm", seed=11), "target", "mrpc")
    result = run_stage("warm", [a, b], RunSpec(verbose=0, max_concurrent_trials=1))
    assert result.ok == 2, result.records
    ra, rb = result.records
    assert ra.worker == rb.worker and ra.worker  # one process ran both
    assert (ra.warm, rb.warm) == (False, True)
    # the warm trial's cost beyond its own work: handing it over and getting its outcome back
    assert rb.finished_s - rb.started_s - rb.busy_s < 0.5, rb

    cold = [t.model_copy(update={"results_dir": str(tmp_path / f"cold-{t.kind}")}) for t in (a, b)]
    cold_runs(cold)
    for t, c in zip((a, b), cold, strict=True):
        warm_row, warm_preds = stored(t)
        cold_row, cold_preds = stored(c)
        assert warm_row == cold_row, t.label
        assert warm_preds == cold_preds and len(warm_preds) == 16, t.label


@needs_data
@pytest.mark.integration
def test_transfer_starts_once_its_own_source_is_stored(ray_cluster: Any, tmp_path: Path) -> None:
    """snli's source is small, mrpc's large: snli's transfer runs while mrpc's source still trains."""
    from rayjobs.engine.runner import run_stage

    small = plan(tmp_path / "r", seed=3)
    slow_src = one(plan(tmp_path / "r", seed=3, source_train=1200), "source", "mrpc")
    fast_src = one(small, "source", "snli")
    early = next(t for t in small if t.kind == "transfer" and t.source == "snli")
    late = next(t for t in small if t.kind == "transfer" and t.source == "mrpc").model_copy(
        update={"source_run_key": slow_src.run_key})  # starts from the large source
    trials = [fast_src, slow_src, early, late]
    result = run_stage("release", trials, RunSpec(verbose=0, max_concurrent_trials=2))
    assert result.ok == 4 and not result.failed, [r.error for r in result.records]
    fast, slow, first, last = ({r.run_key: r for r in result.records}[t.run_key] for t in trials)
    assert first.released_s >= fast.finished_s and last.released_s >= slow.finished_s  # dependencies first
    assert first.started_s < slow.finished_s, (first, slow)  # no barrier at the end of stage 1
    assert last.started_s >= slow.finished_s


@needs_data
@pytest.mark.integration
def test_failures_are_stored_dependents_blocked_dead_workers_replaced(ray_cluster: Any, tmp_path: Path) -> None:
    from rayjobs.engine.runner import run_trials

    trials = plan(tmp_path / "r", seed=5, name="boom")
    store = ResultStore(tmp_path / "r")
    result = run_trials("boom", trials, RunSpec(verbose=0, max_failures=1), store)
    src_snli, base_mrpc = one(trials, "source", "snli"), one(trials, "target", "mrpc")
    blocked = next(t for t in trials if t.kind == "transfer" and t.source == "snli")
    assert sorted(result.failed) == sorted([src_snli.run_key, base_mrpc.run_key])
    assert result.blocked == [blocked.run_key]
    assert result.ok == 3  # mrpc's source, snli's baseline, mrpc->snli
    attempts = [r.attempt for r in result.records if r.run_key == src_snli.run_key]
    assert attempts == [1, 2]  # max_failures=1: retried once
    rows = {k: store.read_result(k) for k in (src_snli.run_key, base_mrpc.run_key)}
    assert rows[src_snli.run_key]["status"] == "failed" and "injected failure" in rows[src_snli.run_key]["error"]
    assert rows[base_mrpc.run_key]["status"] == "failed"
    assert "trial process died without writing a result" in rows[base_mrpc.run_key]["error"]
    assert store.read_result(blocked.run_key) is None  # never started
    assert store.finished_keys() == {t.run_key for t in trials} - {src_snli.run_key, base_mrpc.run_key,
                                                                   blocked.run_key}
