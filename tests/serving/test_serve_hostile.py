"""Hostile requests against the real Serve application, with the default model policy (no opt-in).

Each finding of issue 23 point 4 is tried as an attacker would, on loopback: a bad request fails alone
whatever it raises; templates cannot amplify (plain placeholders, rendered size and request cost bounded
before any model runs, bodies bounded before they are read); run keys are keys; only configured models and
stored runs load, and a hanging or broken model neither blocks other models nor the replica; 500 bodies
hold a request id only and 4xx messages no host paths; the token is checked before the body is read.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests
import torch

from analysis.store.results import DB_NAME
from rayjobs.scoring.blackbox import open_black_box
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate
from serving.app import TOKEN_ENV
from tests.conftest import REPO, needs_data

pytestmark = [needs_data]

TOKEN = "hostile-token-456"
SENT = {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]}
LIMITS = {"max_body_bytes": 64 * 1024, "max_prompt_chars": 2000, "max_request_chars": 40_000, "max_choices": 8,
          "max_examples": 16, "load_timeout_s": 20.0}


@dataclass
class Svc:
    url: str
    port: int
    results: Path
    run: str
    hanging: Path
    broken: Path
    lm: str
    http: requests.Session
    args: dict[str, Any]

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=120, **kw)

    def stats(self) -> dict[str, Any]:
        r = self.http.get(self.url + "/v1/stats", timeout=60)
        assert r.status_code == 200, r.text
        return r.json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def svc(trained_source: dict[str, Any], tiny_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
        ) -> Iterator[Svc]:
    """Serve with the default policy: MiniLM, the tiny LM, a copy of it whose load hangs for a minute and
    one whose config is broken; the stored runs of the trained fixture."""
    import ray
    from ray import serve

    from serving.app import application

    root = tmp_path_factory.mktemp("hostile")
    hanging = root / "slow-lm"  # its load takes 60 s more (failure injection in the scorer)
    shutil.copytree(tiny_lm_folder, hanging)
    broken = root / "broken-lm"
    shutil.copytree(tiny_lm_folder, broken)
    (broken / "config.json").write_text("{not json")
    results = Path(trained_source["results"])
    saved = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp"),
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                                       "TRANSFERLAB_SERVE_FAULT": "sleep60:slow-lm"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"db": str(results / DB_NAME), "results": str(results),
                "models": ["builtin:minilm", str(tiny_lm_folder), str(hanging), str(broken)],
                "request_timeout_s": 60, **LIMITS}
        serve.run(application(args, _batching(32)), name="transferlab", route_prefix="/")
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        deadline = time.time() + 180  # MiniLM loaded before the tests (a load may take longer than load_timeout_s)
        while http.post(f"http://127.0.0.1:{port}/v1/score", json=_body(), timeout=120).status_code != 200:
            assert time.time() < deadline, "MiniLM did not load"
            time.sleep(2)
        yield Svc(f"http://127.0.0.1:{port}", port, results, f"run:{trained_source['runs']['snli']['key']}",
                  hanging, broken, str(tiny_lm_folder), http, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = saved


def _batching(size: int) -> list[dict[str, Any]]:
    """The deployments: section with a batch size; a replaced ingress outlives its requests (as the config's)."""
    return [{"name": "Ingress", "graceful_shutdown_timeout_s": 90,
             "user_config": {"max_batch_size": size, "batch_wait_timeout_s": 0.05}},
            {"name": "Scorer", "user_config": {"max_batch_size": size, "batch_wait_timeout_s": 0.05}}]


def _body(model: str = "builtin:minilm", template: dict[str, Any] | None = None, inputs: tuple[str, ...] = ("x",),
          **extra: Any) -> dict[str, Any]:
    return {"model": model, "template": template or SENT, "examples": [{"input": t} for t in inputs], **extra}


def _error(r: requests.Response, status: int, fragment: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == status, err
    return err


# -- pure parts ----------------------------------------------------------------------------------------------
class _Raising(PromptTemplate):
    """Failure injection: a template whose rendering raises what a hostile input could make it raise."""

    def render(self, ex: Example) -> Example:
        raise {"memory": MemoryError(), "key": KeyError("input"), "runtime": RuntimeError("boom")}[self.name]


def test_a_request_whose_rendering_raises_anything_fails_alone() -> None:
    from serving.batching import Failure, ScoreJob, score_jobs

    box = open_black_box("builtin:minilm")
    good = PromptTemplate(name="s", **SENT)
    texts = ["a fine film", "dull and long", "moving", "awful"]
    jobs = [ScoreJob(box, good, [Example(t, ("n", "p"), 0)]) for t in texts]
    bad = {1: "memory", 3: "key", 5: "runtime"}
    for i, kind in bad.items():
        jobs.insert(i, ScoreJob(box, _Raising(name=kind, input="{input}"), [Example("x", ("n", "p"), 0)]))
    out = score_jobs(jobs)
    want = {1: 413, 3: 422, 5: 422}
    for i, res in enumerate(out):
        if i in bad:
            assert isinstance(res, Failure) and res.status == want[i], res
        else:
            alone = box.score(good, jobs[i].examples)
            assert res[0]["logprobs"] == pytest.approx(alone[0]["logprobs"], abs=1e-6)


def test_a_500_body_holds_a_request_id_and_the_traceback_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.app import _bug

    app = FastAPI()
    app.add_exception_handler(Exception, _bug)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail at /srv/app/models/x.py pid 4242 node 10.0.0.7")

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    msg = r.json()["error"]["message"]
    assert msg.startswith("internal error (request id ") and "secret" not in r.text and "/srv" not in r.text
    rid = msg.split("request id ")[1].split(";")[0]
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the traceback, logged


def test_store_queries_are_cancelled_at_their_deadline(tmp_path: Path) -> None:
    from serving.store_queries import StoreTimeout, read_only_store

    db = tmp_path / "s.duckdb"
    duckdb.connect(str(db)).close()
    start = time.monotonic()
    with pytest.raises(StoreTimeout, match="ran past 1s"), read_only_store(db, timeout_s=1.0) as con:
        con.execute("SELECT sum(x) FROM range(1000000000000) t(x)").fetchall()
    assert time.monotonic() - start < 15


# -- against the service -------------------------------------------------------------------------------------
def test_bad_requests_batched_with_good_ones_fail_alone(svc: Svc) -> None:
    texts = [f"review number {i}: {'good' if i % 2 else 'bad'} film" for i in range(24)]
    alone = {}
    for t in texts[:4]:
        r = svc.post("/v1/score", _body(inputs=(t,)))
        assert r.status_code == 200, r.text
        alone[t] = r.json()["results"][0]["logprobs"]
    bad = [_body(template={"input": "{input:>99999999}", "answer_choices": ["a", "b"]}),
           _body(template={"input": "{input}", "answer_choices": ["a", "b"]}, inputs=()) | {
               "examples": [{"input": "x", "choices": ["a", "b", "c"]}]},
           _body(model="run:../../etc"), _body(model=str(svc.results)), _body(model="org/some-hub-model")]
    bodies = [("good", _body(inputs=(t,))) for t in texts] + [("bad", b) for b in bad]
    out: list[requests.Response | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        barrier.wait()
        out[i] = svc.post("/v1/score", bodies[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (kind, body), r in zip(bodies, out, strict=True):
        assert r is not None
        if kind == "good":
            assert r.status_code == 200, r.text
            text = body["examples"][0]["input"]
            if text in alone:
                assert r.json()["results"][0]["logprobs"] == pytest.approx(alone[text], abs=1e-5)
        else:
            assert 400 <= r.status_code < 500, r.text
    assert svc.stats()["max_batch"] > 1  # they did share batches


@pytest.mark.parametrize("template, fragment", [
    ("{input:>99999999}", "format spec or conversion"),
    ("{input!r}", "format spec or conversion"),
    ("{input:{options}}", "format spec or conversion"),
    ("{input.__class__}", "unknown fields"),
    ("{input[0]}", "unknown fields"),
    ("{0}{input}", "unknown fields"),
])
def test_templates_take_plain_placeholders_only(svc: Svc, template: str, fragment: str) -> None:
    _error(svc.post("/v1/score", _body(template={"input": template, "answer_choices": ["a", "b"]})), 422, fragment)


def test_sizes_and_cost_are_bounded_before_any_model_runs(svc: Svc) -> None:
    before = svc.stats()["requests"]
    # a rendered prompt over max_prompt_chars: 40 copies of a 100-character input
    many = {"input": "{input}" * 40, "answer_choices": ["a", "b"]}
    _error(svc.post("/v1/score", _body(template=many, inputs=("y" * 100,))), 413, "max_prompt_chars")
    # each prompt within bounds, the request's cost (prompt x choices) over max_request_chars
    wide = {"input": "{input}", "answer_choices": [f"c{i}" for i in range(8)]}
    _error(svc.post("/v1/score", _body(template=wide, inputs=("z" * 1900,) * 4)), 413, "max_request_chars")
    _error(svc.post("/v1/score", _body(template={"input": "{input}", "answer_choices": [str(i) for i in range(9)]})),
           413, "max_choices")
    assert svc.stats()["requests"] == before  # none of them reached the scorer
    # a body over max_body_bytes: refused from Content-Length, and while a chunked body is read
    _error(svc.post("/v1/score", _body(inputs=("w" * 70_000,))), 413, "max_body_bytes")

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "builtin:minilm", "template": {"input": "{input}"}, "examples": [{"input": "'
        for _ in range(40):
            yield b"v" * 4096
        yield b'"}]}'

    r = svc.http.post(svc.url + "/v1/score", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    _error(r, 413, "max_body_bytes")
    _error(svc.post("/v1/completions", {"model": svc.lm, "prompt": "p" * 2001, "max_tokens": 1}), 413,
           "max_prompt_chars")


def test_only_configured_models_and_stored_runs_load(svc: Svc) -> None:
    before = svc.stats()
    for model in (str(svc.results / "checkpoints"), "/etc", "~/.cache/huggingface/x", "org/some-hub-model",
                  "builtin:nosuch", "sentence:/tmp"):
        _error(svc.post("/v1/score", _body(model=model)), 404, "is not served")
    for key in ("../../etc", "/abs/path", "a/b", "..", ".hidden", ""):
        r = svc.post("/v1/score", _body(model=f"run:{key}"))
        assert r.status_code in (404, 422) and "stored run's key" in r.text, r.text
    after = svc.stats()
    assert after.get("loads", 0) == before.get("loads", 0) and after["requests"] == before["requests"]
    # a stored run of the store does load, and a well-formed unknown key is a 404 that names no host path
    assert svc.post("/v1/score", _body(model=svc.run, template={"input": "{input}", "answer_choices": ["C", "N"]})
                    ).status_code == 200
    err = _error(svc.post("/v1/score", _body(model="run:0000nosuchkey")), 404, "no stored checkpoint for run")
    assert str(svc.results) not in err["message"] and "<path>" in err["message"]


def test_a_hanging_or_broken_model_fails_fast_and_blocks_no_other(svc: Svc) -> None:
    hang: dict[str, Any] = {}

    def call_hanging() -> None:
        start = time.monotonic()
        hang["r"] = svc.post("/v1/score", _body(model=str(svc.hanging)))
        hang["s"] = time.monotonic() - start

    t = threading.Thread(target=call_hanging)
    t.start()
    time.sleep(0.5)  # the hanging load has started
    start = time.monotonic()
    assert svc.post("/v1/score", _body(inputs=("still served",))).status_code == 200  # loaded model: not held
    r = svc.post("/v1/score", _body(model=svc.lm))  # a model loading now: not held either
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < 30
    broken_start = time.monotonic()
    err = _error(svc.post("/v1/score", _body(model=str(svc.broken))), 503, "failed to load")
    assert time.monotonic() - broken_start < 10 and str(svc.broken) in err["message"]  # the name it was given
    t.join(60)
    _error(hang["r"], 503, "still loading after 20s (load_timeout_s)")
    assert hang["s"] < 20 + 15
    assert hang["r"].headers.get("Retry-After")


def test_bad_values_are_4xx_not_500(svc: Svc) -> None:
    _error(svc.post("/v1/rank/sources", {"target": "snli", "selector": "random", "seed": -1}), 422, "body.seed")
    raw = (b'{"model": "builtin:minilm", "template": {"input": "{input}", "answer_choices": ["a", "b"]}, '
           b'"examples": [{"input": "x\\ud800y"}]}')
    r = svc.http.post(svc.url + "/v1/score", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    _error(r, 422, "lone surrogate")
    r = svc.http.post(svc.url + "/v1/completions", data=b'{"prompt": "\\udfff", "max_tokens": 1}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    _error(r, 422, "lone surrogate")
    deep = b'{"model": "builtin:minilm", "template": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    r = svc.http.post(svc.url + "/v1/score", data=deep, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text


def _raw(port: int, head: str) -> str:
    """Send only a request head (no body) and read what comes back within 20 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head.encode())
        got = b""
        try:
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
    return got.decode("latin-1")


def test_auth_is_declared_checked_first_and_health_tells_nothing(svc: Svc) -> None:
    r = requests.post(svc.url + "/v1/score", json=_body(), timeout=60)
    _error(r, 401, "bearer token")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = requests.post(svc.url + "/v1/score", json=_body(), timeout=60, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    # no token, a body announced but never sent: the answer comes without waiting for it
    head = "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000\r\n\r\n"
    start = time.monotonic()
    got = _raw(svc.port, head)
    assert got.startswith("HTTP/1.1 401") and time.monotonic() - start < 15, got[:300]
    # with the token, a body announced over the limit is refused the same way, unread
    got = _raw(svc.port, head.replace("Content-Length: 50000", "Content-Length: 10000000")
               .replace("Host: x\r\n", f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\n"))
    assert got.startswith("HTTP/1.1 413"), got[:300]
    spec = requests.get(svc.url + "/openapi.json", timeout=60).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in spec["paths"]["/v1/score"]["post"]["security"]
    health = requests.get(svc.url + "/healthz", timeout=60)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def _minilm_reference(texts: list[str]) -> dict[str, list[float]]:
    """log-softmax of cosine / 0.05 between each rendered prompt and the choices, from MiniLM directly."""
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
    choices = st.encode(SENT["answer_choices"], normalize_embeddings=True, convert_to_tensor=True).double()
    prompts = st.encode([SENT["input"].format(input=t) for t in texts], normalize_embeddings=True,
                        convert_to_tensor=True).double()
    return {t: torch.log_softmax((choices @ p) / 0.05, -1).tolist() for t, p in zip(texts, prompts, strict=True)}


#: how much a scorer replica's RSS may grow over a phase of the load test (from a sample after it has
#: served full-concurrency batches to the phase's end). Nothing in the scorer should grow with the request
#: count: the choice-embedding cache holds two entries here (a few kB), the models are loaded and every
#: batch shape was seen before the first sample. Measured growth on this machine: 0.0 to 5.6 MiB per
#: phase (three runs); 48 MiB leaves room for allocator noise, and a leak of 256 kB per request fails it
#: (tried once by injecting one into the scorer: the replacement grew by 94 MiB in its phase).
RSS_GROWTH_BOUND = 48 << 20


def _scorer_rss() -> dict[int, int]:
    """RSS in bytes of each live scoring replica of this test's Ray, found by process title in this
    process's tree (`ray::ServeReplica:transferlab:Scorer...`), not from the application's own answers."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if "ServeReplica:transferlab:Scorer" in title and proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = proc.memory_info().rss
        except psutil.Error:  # a process that just exited (the killed replica)
            continue
    return out


def test_zz_mixed_load_with_a_killed_replica_and_a_redeploy(svc: Svc) -> None:
    """Runs last (name). Shortened load and fault test: 64 clients send ~1,000 requests in three phases (a
    warm one, one with faults, one without), a quarter of the mixed ones bad; in the second phase the
    scoring replica is killed once and the application is redeployed with a new batch size. Every good
    request ends with the answer MiniLM gives directly (a 503 must carry Retry-After and succeed on retry);
    every bad one gets its 4xx (a model that cannot load: 503); no 500; no request outlasts
    request_timeout_s; each scorer replica's RSS grows by at most RSS_GROWTH_BOUND across its phases (the
    killed one from its warm sample to just before the kill, the replacement from the end of the fault
    phase to the end of the run). Shortened from the issue's "a few thousand requests for a couple of
    minutes" to ~1,000 in about a minute: on this 2-core machine every request's CPU is shared with the
    clients, the proxy and Ray, and one phase of ~450 mixed requests already crosses the kill, the
    replacement and the redeploy; the memory bound is per request, so more requests would make it tighter
    only in proportion."""
    import ray
    from ray import serve

    from serving.app import application

    texts = [f"load test review {i}: {'a joyful film' if i % 2 else 'a dreary film'}" for i in range(24)]
    want = _minilm_reference(texts)
    bad: list[tuple[Any, tuple[int, ...]]] = [
        (b'{"model": "builtin:minilm", "template": ', (400, 422)),  # malformed JSON
        (_body(inputs=("o" * 70_000,)), (413,)),  # oversized body
        (_body(model="org/unknown-hub-model"), (404,)),
        (_body(model="run:0000nosuchkey"), (404,)),
        (_body(template={"input": "{input:>99999999}", "answer_choices": ["a", "b"]}), (422,)),
        (_body(model=str(svc.broken)), (503,)),
    ]
    n_threads, per_thread = 64, 7
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    limit = svc.args["request_timeout_s"] + 10
    start = time.monotonic()

    def send(body: Any) -> requests.Response:
        t0 = time.monotonic()
        if isinstance(body, bytes):
            r = requests.post(svc.url + "/v1/score", data=body, timeout=limit + 30,
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        else:
            r = requests.post(svc.url + "/v1/score", json=body, timeout=limit + 30,
                              headers={"Authorization": f"Bearer {TOKEN}"})
        if time.monotonic() - t0 > limit:
            with lock:
                failures.append(f"a request took {time.monotonic() - t0:.0f}s")
        return r

    def good(i: int) -> None:
        text = texts[i % len(texts)]
        for _ in range(30):
            r = send(_body(inputs=(text,)))
            with lock:
                outcomes[str(r.status_code)] = outcomes.get(str(r.status_code), 0) + 1
            if r.status_code != 503:
                break
            if "Retry-After" not in r.headers:
                with lock:
                    failures.append(f"503 without Retry-After: {r.text[:200]}")
                return
            time.sleep(float(r.headers["Retry-After"]))
        if r.status_code != 200:
            with lock:
                failures.append(f"good request {i} at {time.monotonic() - start:.1f}s: {r.status_code} "
                                f"{r.text[:200]} {dict(r.headers)}")
        elif max(abs(a - b) for a, b in zip(r.json()["results"][0]["logprobs"], want[text], strict=True)) > 1e-4:
            with lock:
                failures.append(f"good request {i}: a wrong answer")

    def client(k: int, mixed: bool, n: int) -> None:
        for j in range(n):
            i = k * n + j
            if mixed and i % 4 == 3:
                body, allowed = bad[(i // 4) % len(bad)]
                r = send(body)
                ok = r.status_code in allowed and (r.status_code != 503 or "Retry-After" in r.headers)
                with lock:
                    outcomes[f"bad {r.status_code}"] = outcomes.get(f"bad {r.status_code}", 0) + 1
                    if not ok:
                        failures.append(f"bad request {i}: {r.status_code} {r.text[:200]}")
            else:
                good(i)

    def phase(mixed: bool, n: int, during: Any = None) -> None:
        threads = [threading.Thread(target=client, args=(k, mixed, n)) for k in range(n_threads)]
        for t in threads:
            t.start()
        if during is not None:
            during()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads), "a client hung"

    phase(False, 2)  # warm: 128 good requests at full concurrency, so every batch shape has been seen
    old = svc.stats()
    warm = _scorer_rss()
    assert list(warm) == [old["pid"]], (warm, old["pid"])  # the one replica, as the process table sees it
    samples: dict[str, int] = {"killed replica warm": warm[old["pid"]]}

    def faults() -> None:
        time.sleep(3)
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::") and "#Scorer#" in a["name"]
                    and old["replica"] in a["name"])
        samples["killed replica before the kill"] = _scorer_rss()[old["pid"]]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        print(f"killed at {time.monotonic() - start:.1f}s")
        time.sleep(5)
        print(f"redeploy at {time.monotonic() - start:.1f}s")
        serve.run(application(svc.args, _batching(8)), name="transferlab", route_prefix="/")  # a new batch size
        print(f"redeployed at {time.monotonic() - start:.1f}s")

    phase(True, per_thread, faults)
    new = svc.stats()
    assert new["replica"] != old["replica"] and new["max_batch_size"] == 8 and new["ingress"]["max_batch_size"] == 8
    after_faults = _scorer_rss()
    assert list(after_faults) == [new["pid"]], (after_faults, old["pid"], new["pid"])  # the killed one is gone
    samples["replacement after the fault phase"] = after_faults[new["pid"]]
    phase(True, per_thread)  # the same mix without faults: the replacement's steady state
    end = _scorer_rss()
    assert list(end) == [new["pid"]], (end, new["pid"])
    samples["replacement at the end"] = end[new["pid"]]
    took = time.monotonic() - start
    mib = {k: round(v / 2**20, 1) for k, v in samples.items()}
    n_requests = n_threads * (2 + 2 * per_thread)
    print(f"load test: {n_requests} requests in {took:.0f}s at c={n_threads}, outcomes {outcomes}, scorer RSS MiB {mib}")

    assert not failures, (failures[:10], outcomes)
    assert "500" not in outcomes and not any(k == "bad 500" for k in outcomes), outcomes
    n_good = n_threads * 2 + 2 * sum(1 for i in range(n_threads * per_thread) if i % 4 != 3)
    assert outcomes.get("200", 0) == n_good, outcomes  # each good request answered once, after any 503s
    growth = {"killed replica": samples["killed replica before the kill"] - samples["killed replica warm"],
              "replacement": samples["replacement at the end"] - samples["replacement after the fault phase"]}
    assert all(g <= RSS_GROWTH_BOUND for g in growth.values()), (mib, RSS_GROWTH_BOUND >> 20)
    cache = svc.stats()["choice_cache"]["builtin:minilm"]  # the template's two choices, embedded once
    assert cache["entries"] == cache["misses"] == 2 and cache["hits"] > 0, cache
