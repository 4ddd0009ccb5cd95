"""A multi-node Ray cluster on one machine for tests: `ray.cluster_utils.Cluster` in its own process.

Why a separate process: the cluster's nodes are children of the process that creates them, and that
process holds Ray's global state; pytest's process must stay free of it (other tests start their own
Ray). The test talks to the controller over stdin/stdout, one JSON line each way:

    python tests/support/cluster_support.py --workers 2     ->  {"address": ..., "nodes": [{node_id, raylet_pid}...]}
    {"cmd": "remove", "node_id": ID}                 ->  {"ok": true}      (SIGKILL: a node lost)
    {"cmd": "add"}                                   ->  {"node_id": ..., "raylet_pid": ...}
    {"cmd": "quit"}                                  ->  (cluster shut down, process exits)

The head has no CPUs (as on the real clusters: trials run only on worker nodes); each worker node
has one. Auth, temp dir and import path come from the environment the test gives the controller
(RAY_AUTH_MODE / RAY_AUTH_TOKEN, RAY_TMPDIR, PYTHONPATH); nodes and their workers inherit it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PREFIX = "@@ "


def _info(node: Any) -> dict[str, Any]:
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    return {"node_id": node.node_id, "raylet_pid": raylet.pid}


def _say(obj: dict[str, Any]) -> None:
    print(PREFIX + json.dumps(obj), flush=True)


def controller(workers: int) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    _say({"address": cluster.address, "head": _info(cluster.head_node), "nodes": [_info(n) for n in nodes]})
    by_id = {n.node_id: n for n in nodes}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "remove":
            cluster.remove_node(by_id.pop(msg["node_id"]), allow_graceful=False)
            _say({"ok": True})
        elif msg["cmd"] == "add":
            n = cluster.add_node(num_cpus=1)
            by_id[n.node_id] = n
            _say(_info(n))
        elif msg["cmd"] == "quit":
            break
    cluster.shutdown()


class LocalCluster:
    """The test side: start the controller, send commands, stop it (and every process it started)."""

    def __init__(self, workers: int = 2, timeout: float = 180):
        #: a private Ray temp dir (short: Unix socket paths are limited to 107 bytes) and auth token:
        #: nothing of this cluster lands in /tmp/ray or ~/.ray, where other Ray users on the machine look
        self.tmp = tempfile.mkdtemp(prefix="tlc", dir="/tmp")
        self.env = {**os.environ, "RAY_TMPDIR": self.tmp, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, __file__, "--workers", str(workers)], cwd=REPO, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.timeout = timeout
        first = self._read()
        self.address: str = first["address"]
        self.head: dict[str, Any] = first["head"]
        self.nodes: list[dict[str, Any]] = first["nodes"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"cluster controller exited with {self.proc.wait()}")

    def _send(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def remove(self, node_id: str) -> None:
        self._send({"cmd": "remove", "node_id": node_id})
        self.nodes = [n for n in self.nodes if n["node_id"] != node_id]

    def add(self) -> dict[str, Any]:
        n = self._send({"cmd": "add"})
        self.nodes.append(n)
        return n

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment of a job driver connected to this cluster (as `ray job submit` gives one)."""
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def stop(self) -> None:
        import shutil
        import signal

        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the controller's own process group only
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    controller(ap.parse_args().workers)
