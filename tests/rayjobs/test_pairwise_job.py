"""The pairwise job end to end on a real local Ray cluster: bad inputs, kill + resume, exactly-once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import REPO, cli, needs_data, tiny_grid

pytestmark = needs_data


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_grid("grid2").replace("mrpc", "nosuch"))
    r = cli("run", str(cfg), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "unknown task 'nosuch'" in r.stderr and "Traceback" not in r.stderr

    cfg.write_text("name: [\n")
    r = cli("run", str(cfg))
    assert r.returncode == 2 and "malformed YAML" in r.stderr

    cfg.write_text(tiny_grid("grid2", data=tmp_path / "nodata"))
    r = cli("run", str(cfg), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "not found" in r.stderr and "snli.jsonl" in r.stderr

    text = tiny_grid("grid2").replace("{name: tiny, config: {model_type: bert, hidden_size: 16, "
                                          "num_hidden_layers: 1,\n            num_attention_heads: 2, "
                                          "intermediate_size: 32}, max_length: 48}",
                                          f"{{name: gone, path: {tmp_path / 'no_model'}}}")
    cfg.write_text(text)
    r = cli("run", str(cfg), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "does not exist" in r.stderr

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg.write_text(tiny_grid("grid2"))
    try:
        if os.geteuid() == 0:  # root ignores permissions: use a path under a regular file instead
            (tmp_path / "afile").write_text("x")
            target = str(tmp_path / "afile" / "results")
        else:
            target = str(ro / "results")
        r = cli("run", str(cfg), "--results", target)
        assert r.returncode == 2 and "not writable" in r.stderr
    finally:
        ro.chmod(0o700)


@pytest.mark.integration
def test_kill_midway_then_resume_stores_each_run_once(tmp_path: Path) -> None:
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(tiny_grid("grid2"))
    results = tmp_path / "res"
    # 1) start, kill the whole driver process group once the first results exist
    # transfers wait 30 s first: on warm workers the whole tiny grid finishes in seconds, faster than the
    # kill below could land midway
    slow = {**os.environ, "TRANSFERLAB_FAULT": "sleep30:->"}
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "run", str(cfg), "--results", str(results)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=slow)
    deadline = time.time() + 400
    while time.time() < deadline and len(list((results / "runs").glob("*.parquet"))) < 2:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    # Ray's workers run in process groups of their own: one that finishes its trial in the moment before
    # it notices its raylet is gone still stores a complete run. Count the runs once nothing changes.
    first: set[str] = set()
    for _ in range(30):
        now = {p.name for p in (results / "runs").glob("*.parquet")}
        if now == first:
            break
        first = now
        time.sleep(2)
    assert 2 <= len(first) < 6, first  # stopped midway
    mtimes = {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")}

    # 2) resume: only the missing runs train
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(first)} already stored, {6 - len(first)} to run" in r.stdout
    for name, m in mtimes.items():
        assert (results / "runs" / name).stat().st_mtime_ns == m  # finished runs untouched

    # 3) a finished job re-run trains nothing and adds no rows
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0 and "6 already stored, 0 to run" in r.stdout
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    kinds = dict(con.execute("SELECT kind, count(*) FROM runs GROUP BY kind").fetchall())
    assert kinds == {"source": 2, "target": 2, "transfer": 2}
    assert con.execute("SELECT count(DISTINCT run_key) = count(*) FROM runs").fetchone()[0]
    assert con.execute("SELECT count(*) FROM transfer_scores WHERE provenance='local'").fetchone()[0] == 2


@pytest.mark.integration
def test_failing_trial_is_recorded_and_others_finish(tmp_path: Path) -> None:
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(tiny_grid("grid2"))
    env = {**os.environ, "TRANSFERLAB_FAULT": "raise:mrpc (baseline)"}
    r = subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(cfg), "--results", str(tmp_path / "r")],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1
    con = duckdb.connect(str(tmp_path / "r" / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT kind, target, status, error FROM runs ORDER BY kind, target").fetchall()
    failed = [x for x in rows if x[2] == "failed"]
    assert len(failed) == 1 and failed[0][:2] == ("target", "mrpc") and "injected failure" in failed[0][3]
    assert sum(x[2] == "ok" for x in rows) == 5  # sources, the other baseline, both transfers


@pytest.mark.integration
def test_default_output_is_a_line_per_trial_and_verbose_adds_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(tiny_grid("grid2"))
    r = cli("run", str(cfg), "--results", str(tmp_path / "quiet"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    done = [x for x in lines if " done, " in x and "| ok: " in x]
    assert len(done) == 6  # one line per finished trial
    # the driver's lines, the stage lines and the transfer matrix: no tables of trials, no model-loading
    # chatter (progress bars, load reports), no start lines
    noise = ("Trial status", "│", "╭", "Loading", "%|", "LOAD REPORT", "start:")
    assert not [x for x in lines + r.stderr.splitlines() if any(n in x for n in noise)], lines
    assert len(lines) <= 20, lines
    v = cli("run", str(cfg), "--results", str(tmp_path / "loud"), "--verbose")
    assert v.returncode == 0, v.stderr[-2000:]
    starts = [x for x in v.stdout.splitlines() if "] start: " in x]
    assert len(starts) == 6
