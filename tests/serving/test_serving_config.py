"""The Serve config is Ray's own: `serve run serving/config.yaml` as a user runs it (own Ray, loopback, free
port) applies its `deployments:` section (batching user_config, resources, autoscaling), resolves relative
`args` paths against the directory it runs in, and answers scores equal to a direct MiniLM computation and
a stored run's own predictions; `serve build serving.app:app` emits the same deployments; the KubeRay RayService holds the
same file apart from the cluster's paths, host and scorer resources."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from analysis.store.results import ResultStore
from serving.cli import free_port
from tests.conftest import REPO, needs_data

CONFIG = REPO / "serving" / "config.yaml"
SERVE = Path(sys.executable).parent / "serve"
TEMPLATE = {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]}


def _rayservice_config() -> dict[str, Any]:
    doc = next(d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
               if d and d.get("kind") == "RayService")
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_the_rayservice_runs_the_same_config_file() -> None:
    local, cluster = yaml.safe_load(CONFIG.read_text()), _rayservice_config()
    differ = []  # what may differ between a laptop and the cluster, and nothing else
    a, b = copy.deepcopy(local), copy.deepcopy(cluster)
    for cfg, where in ((a, "local"), (b, "cluster")):
        app = cfg["applications"][0]
        differ.append((where, cfg["http_options"].pop("host"), app["args"].pop("db"), app["args"].pop("results"),
                       app["runtime_env"]["env_vars"].pop("HF_HOME", None),
                       next(d for d in app["deployments"] if d["name"] == "Scorer").pop("ray_actor_options")))
    assert a == b, "serving/config.yaml and the RayService's serveConfigV2 differ beyond paths, host and resources"
    assert differ[1][1] == "0.0.0.0" and differ[1][2].startswith("/mnt/transferlab/")
    names = [d["name"] for d in local["applications"][0]["deployments"]]
    assert names == ["Ingress", "Scorer"]
    scorer = local["applications"][0]["deployments"][1]
    assert scorer["autoscaling_config"]["target_ongoing_requests"] > 0 and "num_replicas" not in scorer
    assert "max_batch_size" not in local["applications"][0]["args"]  # batching lives in user_config only


def test_serve_build_emits_the_deployments_the_config_sets(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "built.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": tempfile.mkdtemp(prefix="tl-sb-", dir="/tmp")}
    env.pop("TRANSFERLAB_DB", None)
    r = subprocess.run([str(SERVE), "build", "serving.app:app", "-o", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    built = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    app = built.applications[0]
    assert app.import_path == "serving.app:app"
    local = yaml.safe_load(CONFIG.read_text())["applications"][0]
    assert {d.name for d in app.deployments} == {d["name"] for d in local["deployments"]}
    # every key the config sets on a deployment is a key `serve build` writes for it (Serve's own fields)
    fields = set(type(app.deployments[0]).model_fields)
    assert all(set(d) <= fields for d in local["deployments"])


def _minilm_logprobs(text: str) -> list[float]:
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
    emb = st.encode([TEMPLATE["input"].format(input=text), *TEMPLATE["answer_choices"]], normalize_embeddings=True,
                    convert_to_tensor=True).double()
    return torch.log_softmax((emb[1:] @ emb[0]) / 0.05, -1).tolist()


@needs_data
def test_serve_run_of_the_config_file(trained_source: dict[str, Any], tmp_path: Path, registry: Any) -> None:
    # the store and checkpoints under ./store of the directory `serve run` starts in, named relatively
    store_dir = tmp_path / "store"
    shutil.copytree(trained_source["results"], store_dir)
    ResultStore(store_dir).ingest()
    cfg = yaml.safe_load(CONFIG.read_text())
    port = free_port("127.0.0.1")
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"].update(db="store/transferlab.duckdb", results="store")
    for d in app["deployments"]:  # a live knob of the deployments: section, visible in /v1/stats
        d["user_config"]["max_batch_size"] = 7
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": tempfile.mkdtemp(prefix="tl-sr-", dir="/tmp"),
           "TOKENIZERS_PARALLELISM": "false"}
    for k in ("TRANSFERLAB_API_TOKEN", "TRANSFERLAB_DB", "RAY_ADDRESS"):
        env.pop(k, None)
    log = (tmp_path / "serve-run.log").open("w")
    proc = subprocess.Popen([str(SERVE), "run", "serve.yaml"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve-run.log").read_text()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the application still building
                pass
            assert time.time() < deadline, (tmp_path / "serve-run.log").read_text()[-3000:]
            time.sleep(2)
        text = "a joyful, generous film"
        r = requests.post(url + "/v1/score", json={"model": "builtin:minilm", "template": TEMPLATE,
                                                   "examples": [{"input": text}]}, timeout=180)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["logprobs"] == pytest.approx(_minilm_logprobs(text), abs=1e-4)
        # run:<key> found through the relative `results`, answering the stored run's own predictions
        run = trained_source["runs"]["snli"]
        models = [m["id"] for m in requests.get(url + "/v1/models", timeout=60).json()["data"]]
        assert f"run:{run['key']}" in models  # listed from the relative `db`
        data = list(registry.load_data("snli", 0, 8, seed=3).eval)
        r = requests.post(url + "/v1/score", json={"model": f"run:{run['key']}", "template": {"input": "{input}"},
                                                   "examples": [{"input": e.text, "choices": list(e.choices),
                                                                 "id": e.uid} for e in data]}, timeout=180)
        assert r.status_code == 200, r.text
        stored = {p["example_id"]: p for p in run["predictions"].to_pylist()}
        for g in r.json()["results"]:
            assert g["logprobs"] == pytest.approx(stored[g["id"]]["logprobs"], abs=1e-5)
        stats = requests.get(url + "/v1/stats", timeout=60).json()
        assert stats["max_batch_size"] == 7 and stats["ingress"]["max_batch_size"] == 7  # user_config applied
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left of the Ray it started
        except ProcessLookupError:
            pass
        log.close()


def test_a_typo_in_the_deployments_section_is_refused(tmp_path: Path) -> None:
    from tests.conftest import cli

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["applications"][0]["deployments"][1]["max_ongoing_requestz"] = 256  # Serve's schema would let it through
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("serve", "--check", "--config", str(tmp_path / "bad.yaml"), timeout=120)
    assert r.returncode == 2 and "deployment 'Scorer': unknown field(s) ['max_ongoing_requestz']" in r.stderr, r.stderr
    r = cli("serve", "--check", "--max-batch-size", "8", timeout=120)
    assert r.returncode == 0 and r.stdout.count('"max_batch_size": 8') == 2  # both deployments' user_config
