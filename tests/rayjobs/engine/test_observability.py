"""Observability: the throughput formula, `transferlab status` on hand-made result files, and the Ray
metrics of a real job read back from the node's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.store.results import ResultStore
from analysis.store.status import render, summarise, write_plan
from rayjobs.engine import observe
from tests.conftest import REPO, cli, needs_data, tiny_grid

# -- throughput -------------------------------------------------------------------------------------------


def test_examples_per_second_is_steps_times_global_batch_over_train_time() -> None:
    # 3 optimiser steps x (micro 4 x 2 workers x 2 accumulation) = 48 examples in 6 s
    row = {"hparams": {"steps": 3, "micro_batch": 4, "world_size": 2, "grad_accum_steps": 2}, "train_time_s": 6.0}
    assert observe.examples_trained(row) == 48
    assert observe.examples_per_second(row) == pytest.approx(8.0)
    as_json = {**row, "hparams": json.dumps(row["hparams"])}  # rows read back from Parquet hold JSON text
    assert observe.examples_per_second(as_json) == pytest.approx(8.0)
    assert observe.examples_per_second({"hparams": {"template": "x"}, "train_time_s": 1.0}) is None  # scoring
    assert observe.examples_per_second({**row, "train_time_s": 0.0}) is None


def test_hooks_are_no_ops_outside_ray() -> None:
    import ray

    assert not ray.is_initialized()
    observe.trial_started(type("S", (), {"experiment": "e", "kind": "source"})())
    observe.rows_ingested({"runs": 3})
    observe.serve_request("d")
    observe.serve_batch("d", 4)
    assert observe.placement() == {} and not ray.is_initialized()


# -- transferlab status -----------------------------------------------------------------------------------


def _row(key: str, kind: str, status: str, created: float, error: str | None = None) -> dict:
    import datetime as dt

    return {"run_key": key, "experiment": "e", "kind": kind, "setup": "full:tiny", "status": status, "error": error,
            "wall_time_s": 10.0, "created_at": dt.datetime.fromtimestamp(created, dt.timezone.utc).replace(tzinfo=None)}


def test_status_counts_planned_runs_and_estimates_from_the_finish_rate(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    plan = {"s1": "source", "s2": "source", "t1": "target", "t2": "target", "x1": "transfer"}
    write_plan(store, "e", "pairwise", plan)
    started = store.read_json("plan.json")["started_at"]
    store.write_result(_row("s1", "source", "ok", started - 500))  # stored by an earlier driver
    store.write_result(_row("s2", "source", "ok", started + 20))
    store.write_result(_row("t1", "target", "failed", started + 40, "RuntimeError: boom\nTraceback ..."))
    store.write_result(_row("other", "source", "ok", started + 30))  # another experiment's run: not planned
    s = summarise(store, now=started + 60)
    by = {x["stage"]: x for x in s["stages"]}
    assert by["source"] == {"stage": "source", "planned": 2, "done": 2, "failed": 0, "remaining": 0}
    assert by["target"] == {"stage": "target", "planned": 2, "done": 0, "failed": 1, "remaining": 1}
    assert by["transfer"] == {"stage": "transfer", "planned": 1, "done": 0, "failed": 0, "remaining": 1}
    # 2 runs finished in the 60 s since the driver started (s1 is older): 2 remaining -> 60 s
    assert s["finished_since_start"] == 2 and s["eta_s"] == pytest.approx(60.0)
    assert s["errors"] == [{"run_key": "t1", "stage": "target", "error": "RuntimeError: boom"}]
    text = "\n".join(render(s))
    assert "2 runs to go, ETA 1m00s" in text and "FAILED target t1: RuntimeError: boom" in text

    for key, kind in [("t2", "target"), ("x1", "transfer")]:
        store.write_result(_row(key, kind, "ok", started + 70))
    done = summarise(store, now=started + 80)
    assert done["remaining"] == 0 and done["eta_s"] == 0
    assert "finished" in "\n".join(render(done))


def test_status_cli_prints_the_summary_and_rejects_an_empty_folder(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r")
    write_plan(store, "e", "pairwise", {"s1": "source"})
    store.write_result(_row("s1", "source", "ok", time.time()))
    r = cli("status", "--results", str(tmp_path / "r"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stages"] == [{"stage": "source", "planned": 1, "done": 1, "failed": 0, "remaining": 0}]
    (tmp_path / "empty").mkdir()
    r = cli("status", "--results", str(tmp_path / "empty"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no transferlab results" in r.stderr


# -- Ray metrics on the Prometheus endpoint -----------------------------------------------------------------

SAMPLE = re.compile(r"^(\w+)\{(.*)\} ([0-9.e+-]+)$")


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on a node's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples: list, name: str, **labels: str) -> float:
    """Sum over reporting processes (Ray labels each sample with its WorkerId)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def buckets(samples: list, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram by upper bound, summed over processes and tags."""
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == name and lab.get("le") not in (None, "+Inf"):
            out[float(lab["le"])] = out.get(float(lab["le"]), 0) + v
    return out


@needs_data
@pytest.mark.integration
def test_job_metrics_reach_the_prometheus_endpoint(tmp_path: Path) -> None:
    """A 2x2 pairwise grid (2 sources, 2 baselines, 2 transfers; 16 training examples each, batch 8 ->
    2 steps x 8 = 16 examples per run) on an embedded Ray; then the node's /metrics must show it."""
    import ray

    from rayjobs.config import load_config
    from rayjobs.engine.driver import run_job
    from rayjobs.job import get_job

    cfg_path = tmp_path / "grid.yaml"
    cfg_path.write_text(tiny_grid("metrics"))
    ray.init(address="local", include_dashboard=False, num_cpus=2,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = ray.nodes()[0]["MetricsExportPort"]
        assert run_job(get_job("pairwise"), load_config(cfg_path), str(tmp_path / "r")) == 0
        with ResultStore(tmp_path / "r").connect(read_only=True) as con:
            n_pred = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
            nodes = {r[0] for r in con.execute("SELECT metrics->>'node_id' FROM runs").fetchall()}
            # throughput of each run from its stored row: steps x micro-batch / train time (1 worker, no accumulation)
            eps = [r[0] for r in con.execute("SELECT (hparams->>'steps')::INT * (hparams->>'micro_batch')::INT "
                                             "/ train_time_s FROM runs").fetchall()]
        assert nodes == {ray.get_runtime_context().get_node_id()}
        want = {("ray_transferlab_trials", stage, "done"): 2.0 for stage in ("source", "target", "transfer")}
        deadline = time.time() + 90  # nodes export every few seconds
        while True:
            s = scrape(port)
            got = {k: total(s, k[0], stage=k[1], state=k[2], experiment="metrics") for k in want}
            checks = {
                "trials": got == want,
                # the driver's count table lives as long as its process: earlier jobs in this one (other
                # experiments) stay published, so look at this job's experiment only
                "running back to 0": total(s, "ray_transferlab_trials", state="running", experiment="metrics") == 0,
                "no failures": total(s, "ray_transferlab_trials", state="failed", experiment="metrics") == 0,
                "finished events": total(s, "ray_transferlab_trial_events_total", event="finished") == 6,
                "started events": total(s, "ray_transferlab_trial_events_total", event="started") == 6,
                "examples": all(total(s, "ray_transferlab_train_examples_total", stage=k) == 32
                                for k in ("source", "target", "transfer")),
                "throughput count": all(total(s, "ray_transferlab_examples_per_second_count", stage=k) == 2
                                        for k in ("source", "target", "transfer")),
                # Ray exports bucket counts (its _sum is built from bucket midpoints): compare those
                "throughput buckets": buckets(s, "ray_transferlab_examples_per_second_bucket") == {
                    le: sum(e <= le for e in eps) for le in observe.EPS_BUCKETS},
                "trial seconds": total(s, "ray_transferlab_trial_seconds_count") == 6,
                "rows": total(s, "ray_transferlab_rows_ingested_total", table="runs") == 6
                        and total(s, "ray_transferlab_rows_ingested_total", table="predictions") == n_pred > 0,
            }
            if all(checks.values()) or time.time() > deadline:
                break
            time.sleep(3)
        assert all(checks.values()), ([k for k, v in checks.items() if not v], got, eps,
                                      [(n, lab.get("stage"), v) for n, lab, v in s if "transferlab" in n])
    finally:
        ray.shutdown()
