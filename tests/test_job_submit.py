"""The README's cluster commands, run as written: a fresh copy of the repository, a new user's shell
(its own HOME: no token yet, no venv on PATH, no RAY_* variables), `ray start --head` with token auth,
`ray job submit` of the quickstart with `--smoke`, `transferlab status`, then `kill $HEAD_PID`.

Only what must differ on a shared test machine is changed, never the commands: the ports become free
ones, RAY_TMPDIR a private folder (Ray's "latest cluster" file must not steer other users' `ray.init()`),
and PYTHONPATH points at the copy (what `make venv` -- an editable install -- does for a real clone).
Then the job is checked through `JobSubmissionClient` (refused without the token; status and logs
with it), the result store, the head's Prometheus endpoint, and that stopping this cluster leaves
none of its processes behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import duckdb
import psutil
import pytest

from tests.conftest import DATA, REPO, needs_data
from tests.rayjobs.engine.test_observability import scrape, total

pytestmark = [needs_data, pytest.mark.integration]

MARKER = "<!-- tested: tests/test_job_submit.py"
#: the ports the README names (GCS, dashboard, client server, dashboard agent, metrics export)
PORTS = (6379, 8265, 10001, 52365, 8080)


def readme_blocks() -> tuple[str, str]:
    """The two bash blocks after the marker in README.md: start + submit, and stop."""
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "README.md lost the marker of its tested cluster commands"
    blocks = re.findall(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    return blocks[0], blocks[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and new, not ignored), the venv linked in,
    and ../shared next to it as in the project's layout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    root = dest / "transferlab"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    (root / ".venv").symlink_to(Path(sys.prefix))  # the venv `make venv` would have built
    (dest / "shared").symlink_to(DATA.parent)
    return root


def _grep_logs(tmp: str, needle: str) -> list[str]:
    """Lines of the cluster's logs that contain `needle` (to explain a failure)."""
    found = []
    for f in Path(tmp).rglob("*"):
        if f.is_file() and f.suffix in (".log", ".err", ".out"):
            found += [f"{f.name}: {line}" for line in f.read_text(errors="replace").splitlines() if needle in line]
    return found[:20]


def ray_processes(tmp: str) -> list[psutil.Process]:
    """Processes started for the cluster of this test: their environment names its private RAY_TMPDIR."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("RAY_TMPDIR") == tmp:
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_readme_cluster_commands_run_the_quickstart_with_token_auth(tmp_path: Path) -> None:
    start, stop = readme_blocks()
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    for default, port in ports.items():
        start = re.sub(rf"\b{default}\b", str(port), start)
    root = fresh_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="tlj", dir="/tmp")  # short: Unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin", RAY_TMPDIR=ray_tmp, PYTHONPATH=str(root))
    log = tmp_path / "shell.log"
    script = start + '\necho "HEAD_PID=$HEAD_PID"\n'
    head_pid = None
    try:
        with log.open("w") as out:  # a file, not a pipe: the backgrounded head keeps its stdout open
            r = subprocess.run(["bash", "-c", script], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                               timeout=1200)
        text = log.read_text()
        m = re.search(r"HEAD_PID=(\d+)", text)
        head_pid = int(m.group(1)) if m else None
        assert r.returncode == 0, text[-5000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", text)
        assert job_id, text[-5000:]
        assert "finished: no planned run is missing" in text  # transferlab status

        # the jobs API: refused without the token, status and logs with it
        from ray.job_submission import JobStatus, JobSubmissionClient

        url = f"http://127.0.0.1:{ports[8265]}"
        with pytest.raises(Exception, match="401|403|Unauthorized|Forbidden"):
            JobSubmissionClient(url).list_jobs()
        token = (home / ".ray" / "auth_token").read_text().strip()
        client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
        assert client.get_job_status(job_id.group(1)) == JobStatus.SUCCEEDED
        logs = client.get_job_logs(job_id.group(1))
        assert "] finished: " in logs and "transferlab: results database" in logs
        with pytest.raises(Exception, match="401|403"):
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)

        # 3 tasks: 3 sources, 3 baselines, 6 transfers, each stored once, written by the job
        results = root / "results" / "quickstart-cluster"
        con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
        assert dict(con.execute("SELECT kind, count(*) FROM runs WHERE status = 'ok' GROUP BY kind").fetchall()) == {
            "source": 3, "target": 3, "transfer": 6}
        assert con.execute("SELECT count(DISTINCT run_key) FROM runs").fetchone()[0] == 12
        con.close()
        # the job's metrics on the head's Prometheus endpoint (the README's --metrics-export-port): every
        # trial's start (recorded early in each trial) and the driver's ingest; a trial process ending
        # within Ray's 10 s export interval of its finish may not get its last increments out
        def seen(samples: list) -> bool:
            return (total(samples, "ray_transferlab_trial_events_total", event="started") == 12
                    and total(samples, "ray_transferlab_trial_events_total", event="finished") >= 1
                    and total(samples, "ray_transferlab_rows_ingested_total", table="runs") == 12)

        deadline = time.time() + 120
        while not seen(samples := scrape(ports[8080])):
            assert time.time() < deadline, ("trial metrics did not reach the metrics endpoint", {
                f"{n}{{{lab.get('event') or lab.get('state') or ''}}}": total(samples, n, **{
                    k: lab[k] for k in ("event", "state") if k in lab})
                for n, lab, _ in samples if "transferlab" in n and "bucket" not in n},
                _grep_logs(ray_tmp, "transferlab metrics"))
            time.sleep(3)
    finally:
        if head_pid:  # the README's second block
            subprocess.run(["bash", "-c", stop], cwd=root, env={**env, "HEAD_PID": str(head_pid)}, timeout=60)
        deadline = time.time() + 60
        while ray_processes(ray_tmp) and time.time() < deadline:
            time.sleep(1)
        left = ray_processes(ray_tmp)
        for p in left:  # only processes of this test's cluster (they name its private temp dir)
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert head_pid and not left, f"`kill $HEAD_PID` left {len(left)} processes of the cluster running"
