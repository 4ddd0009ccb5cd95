"""`transferlab serve --direct-ingress` as a user runs it: the ingress replica itself owns the port (no
proxy actor in the path), answers scores equal to a hand-written MiniLM forward, batches concurrent
requests into fewer Ray calls, refuses a busy port before starting Ray, and stops on Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests
import torch
import yaml

from serving.cli import free_port
from tests.conftest import REPO, cli

TEMPLATE = {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]}
TEXTS = ["a joyful, generous film", "tedious and far too long", "the cast is wonderful", "I want my money back"]


def _listener(port: int) -> psutil.Process | None:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    return None


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_direct_ingress_serves_from_the_replica_batches_and_stops(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    for d in config["applications"][0]["deployments"]:  # concurrent requests meet in one batch
        d["user_config"]["batch_wait_timeout_s"] = 0.2
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port("127.0.0.1")
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="tl-di-", dir="/tmp"), "TOKENIZERS_PARALLELISM": "false"}
    for k in ("TRANSFERLAB_API_TOKEN", "TRANSFERLAB_DB", "RAY_ADDRESS"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "serve", "--direct-ingress", "--port", str(port),
                             "--config", str(tmp_path / "serve.yaml"), "--db", str(tmp_path / "none.duckdb")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines, seen = _lines(proc), []
    try:
        deadline = time.time() + 240
        while not any("serving on" in line for line in seen):
            assert proc.poll() is None and time.time() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=5))
            except queue.Empty:
                pass
        assert f"serving on http://127.0.0.1:{port} (direct ingress" in "".join(seen)

        owner = _listener(port)  # the port belongs to the Ingress replica, not to a proxy actor
        assert owner is not None and "ServeReplica" in " ".join(owner.cmdline()) and "Ingress" in " ".join(
            owner.cmdline()), owner and owner.cmdline()

        busy = cli("serve", "--direct-ingress", "--port", str(port), "--db", str(tmp_path / "none.duckdb"), env=env)
        assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is not free" in busy.stderr, busy.stderr

        url = f"http://127.0.0.1:{port}"
        before = requests.get(url + "/v1/stats", timeout=60).json()
        barrier, out = threading.Barrier(len(TEXTS)), [None] * len(TEXTS)

        def one(i: int) -> None:
            barrier.wait()
            out[i] = requests.post(url + "/v1/score", timeout=120, json={  # type: ignore[call-overload]
                "model": "builtin:minilm", "template": TEMPLATE, "examples": [{"input": TEXTS[i]}]})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(TEXTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = requests.get(url + "/v1/stats", timeout=60).json()
        assert all(r.status_code == 200 for r in out), [r.text for r in out]  # type: ignore[union-attr]

        st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
        choices = st.encode(TEMPLATE["answer_choices"], normalize_embeddings=True, convert_to_tensor=True).double()
        for text, r in zip(TEXTS, out, strict=True):
            x = st.encode([TEMPLATE["input"].format(input=text)], normalize_embeddings=True,
                          convert_to_tensor=True).double()[0]
            want = torch.log_softmax((choices @ x) / 0.05, -1).tolist()
            got: Any = r.json()["results"][0]["logprobs"]  # type: ignore[union-attr]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
        assert after["requests"] - before.get("requests", 0) == len(TEXTS)
        assert after["calls"] - before.get("calls", 0) < len(TEXTS)  # batched at the ingress: fewer Ray calls
        assert after["ingress"]["batch_wait_timeout_s"] == 0.2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Serve shut down, the local Ray stopped
            try:
                proc.wait(timeout=90)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # anything left of its Ray
                except ProcessLookupError:
                    pass
    assert proc.returncode == 0
    assert _listener(port) is None
