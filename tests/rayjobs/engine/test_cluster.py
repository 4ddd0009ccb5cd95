"""transferlab on a multi-node Ray cluster, on one machine: a head without CPUs plus two one-CPU worker
nodes (`ray.cluster_utils.Cluster`, token auth on), a driver connected through RAY_ADDRESS as `ray job
submit` starts one, and one results folder all nodes see. Checked: trials spread over the nodes; a
worker node lost mid-grid costs only its in-flight trial and a re-run stores every run exactly once;
a SIGKILLed trial process is retried (`max_failures: 1`) or recorded as failed (`max_failures: 0`);
a run without RAY_ADDRESS starts its own Ray instead of joining the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import psutil
import pytest
from cluster_support import LocalCluster

from tests.conftest import REPO, needs_data, tiny_grid

pytestmark = [needs_data, pytest.mark.integration]

def grid(tmp: Path, name: str, sources: str = "[snli, mrpc]", targets: str = "null", max_failures: int = 0) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(tiny_grid(name, sources=sources, targets=targets, max_failures=max_failures))
    return cfg


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    try:
        yield c
    finally:
        c.stop()


def run_driver(c: LocalCluster, cfg: Path, results: Path, **env: str) -> subprocess.CompletedProcess:
    """The job driver on the cluster; `env` reaches its trial processes the way `ray job submit`'s
    runtime_env does (a driver's own environment does not travel to other nodes' workers)."""
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env}})} if env else {}
    return subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(cfg), "--results", str(results)],
                          cwd=REPO, env=c.driver_env(**job), capture_output=True, text=True, timeout=900)


def rows(results: Path) -> list[dict]:
    """Every result file as {run_key, kind, status, error, node_id} (read like the driver does)."""
    files = [str(p) for p in (results / "runs").glob("*.parquet")]
    if not files:
        return []
    con = duckdb.connect()
    out = con.execute("SELECT run_key, kind, status, error, metrics->>'node_id' FROM read_parquet($f)",
                      {"f": files}).fetchall()
    return [dict(zip(("run_key", "kind", "status", "error", "node_id"), r, strict=True)) for r in out]


def trial_in_flight(raylet_pid: int) -> bool:
    """A trial runs on the node of this raylet (a warm worker busy in `run`: `ray::TrialWorker.run`)."""
    try:
        kids = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    titles = []
    for k in kids:
        try:
            titles.append(" ".join(k.cmdline()))
        except psutil.Error:
            continue
    return any(t.startswith("ray::TrialWorker.run") for t in titles)


def test_lost_node_costs_only_its_in_flight_trial_and_a_rerun_stores_each_run_once(cluster: LocalCluster,
                                                                                    tmp_path: Path) -> None:
    cfg, results = grid(tmp_path, "spread"), tmp_path / "res"
    node_a, node_b = cluster.nodes[0], cluster.nodes[1]
    # every trial waits 5 s first: on a warm worker a tiny trial lasts about a second, less than it takes
    # to see it in flight and remove its node
    slow = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {
        "TRANSFERLAB_FAULT": "sleep5:full:tiny"}}})}
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "run", str(cfg), "--results", str(results)],
                            cwd=REPO, env=cluster.driver_env(**slow), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # wait until node B has finished a trial and is running the next one, then lose it
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(r["node_id"] == node_b["node_id"] for r in rows(results)) and trial_in_flight(node_b["raylet_pid"]):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the grid finished before node B could be removed mid-run"
    before = {r["run_key"]: r for r in rows(results)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")}
    cluster.remove(node_b["node_id"])
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 1, out[-3000:]  # runs are missing: the job says so

    first = rows(results)
    ok = [r for r in first if r["status"] == "ok"]
    lost = [r for r in first if r["status"] == "failed"]
    # trials ran on both worker nodes (the head has no CPUs)
    assert {r["node_id"] for r in ok} == {node_a["node_id"], node_b["node_id"]}
    # exactly the one trial in flight on B (one CPU) was lost, recorded with why
    assert len(lost) == 1 and "died without writing a result" in lost[0]["error"], lost
    assert all(r["status"] == "ok" for k, r in before.items()), before
    # runs finished on B before it went stay stored; the rest ran on A
    assert {r["node_id"] for r in ok if r["run_key"] not in before} <= {node_a["node_id"]}
    assert "runs wait for failed runs" in out or len(ok) == 5  # a lost source leaves its transfer waiting

    # a status summary of the broken run names the lost trial
    st = subprocess.run([sys.executable, "-m", "rayjobs.cli", "status", "--results", str(results), "--json"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    summary = json.loads(st.stdout)
    assert sum(s["failed"] for s in summary["stages"]) == 1 and summary["errors"][0]["run_key"] == lost[0]["run_key"]
    assert sum(s["done"] for s in summary["stages"]) == len(ok)

    # re-run with a fresh second node: only the missing runs train, and each run is stored once
    node_c = cluster.add()
    r = run_driver(cluster, cfg, results)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{len(ok)} already stored, {6 - len(ok)} to run" in r.stdout
    for name, m in mtimes.items():
        assert (results / "runs" / name).stat().st_mtime_ns == m, f"{name} was trained again"
    final = rows(results)
    assert len(final) == 6 and all(x["status"] == "ok" for x in final)
    assert {x["node_id"] for x in final if x["run_key"] not in {o["run_key"] for o in ok}} <= {
        node_a["node_id"], node_c["node_id"]}
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT run_key) FROM runs").fetchone() == (6, 6)
    assert dict(con.execute("SELECT kind, count(*) FROM runs WHERE status = 'ok' GROUP BY kind").fetchall()) == {
        "source": 2, "target": 2, "transfer": 2}


@pytest.mark.parametrize("max_failures", [0, 1])
def test_sigkilled_trial_is_retried_or_recorded_as_failed(cluster: LocalCluster, tmp_path: Path,
                                                          max_failures: int) -> None:
    """One source, one target: source, baseline, transfer. The baseline's process is SIGKILLed on its
    first attempt; with one retry allowed it finishes, without it is a failed run and the others finish."""
    cfg = grid(tmp_path, f"kill{max_failures}", sources="[snli]", targets="[mrpc]", max_failures=max_failures)
    results = tmp_path / "res"
    r = run_driver(cluster, cfg, results, TRANSFERLAB_FAULT="kill-once:mrpc (baseline)")
    got = {x["kind"]: x for x in rows(results)}
    assert (results / f".fault-{got['target']['run_key']}").exists(), "the fault did not fire"
    assert {k: x["status"] for k, x in got.items()} == {
        "source": "ok", "transfer": "ok", "target": "ok" if max_failures else "failed"}
    if max_failures:
        assert r.returncode == 0, r.stdout[-3000:]
    else:
        assert r.returncode == 1
        assert "died without writing a result" in got["target"]["error"]
        assert "FAILED: target full:tiny mrpc (baseline)" in r.stdout


def test_run_without_ray_address_starts_its_own_ray(cluster: LocalCluster) -> None:
    """Ray's own default would join the cluster this machine started last ($RAY_TMPDIR/ray/ray_current_cluster)."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    assert (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").is_file()  # the trap is set
    code = ("import json, ray; from rayjobs.config import RunSpec; from rayjobs.engine.runner import init_ray; "
            "init_ray(RunSpec()); print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, "
            "'nodes': len(ray.nodes())})); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["gcs"] != cluster.address and got["nodes"] == 1
