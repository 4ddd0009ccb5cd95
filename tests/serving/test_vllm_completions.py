"""The completions black box (`EndpointBox`) against a loopback stand-in that validates like vLLM.

The stand-in follows vLLM's documented behaviour of `POST /v1/completions` (checked, not guessed):
  - `max_tokens` < 1 is a 400: vLLM's SamplingParams raises "max_tokens must be at least 1, got 0."
    (vllm-project/vllm#9336 quotes the check; the feature request to allow 0 is still open);
  - prompt log-probabilities come from `echo: true` + `logprobs` + `max_tokens: 1` (vllm#6508): the answer's
    text is prompt + generated token, its `token_logprobs` start with None (nothing predicts the first
    token) and end with the generated token, whose `text_offset` is len(prompt) (vLLM 0.16's answer,
    shown in ggml-org/llama.cpp#15189);
  - `logprobs` above the server's `max_logprobs` (20 by default) is a 400;
  - under overload the server answers 503 (vllm#22805; Ray Serve's backpressure default, which adds
    `Retry-After` when `BackpressureConfig.retry_after_s` is set).
Its numbers come from a real tiny causal LM (raw logits), so scores through it can be compared with the
same model scored in process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from rayjobs.models.loading import ModelError
from rayjobs.scoring.blackbox import EndpointBox, open_black_box
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate

MAX_LOGPROBS = 20
TPL = PromptTemplate(name="s", input="Review: {input} Sentiment?", answer_choices=["negative", "positive"])
EXAMPLES = [Example(t, ("n", "p"), i % 2) for i, t in
            enumerate(["a fine, moving film", "dull and far too long", "I would watch it again tomorrow"])]


class VllmLike(ThreadingHTTPServer):
    """vLLM's /v1/completions rules over a real model; records every request and connection."""

    daemon_threads = True

    def __init__(self, tm: Any):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tm = tm
        self.bodies: list[dict[str, Any]] = []
        self.peers: set[tuple[str, int]] = set()
        self.statuses: list[int] = []
        self.overload = 0  # answer the next N requests 503
        self.retry_after: str | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from serving.completions import greedy, prompt_logprobs

        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return 400, {"object": "error", "message": f"max_tokens must be at least 1, got {max_tokens}.",
                         "type": "BadRequestError", "param": None, "code": 400}
        logprobs = body.get("logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            return 400, {"object": "error", "type": "BadRequestError", "code": 400,
                         "message": f"Requested sample logprobs of {logprobs}, which is greater than max "
                                    f"allowed: {MAX_LOGPROBS}"}
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        echo = bool(body.get("echo"))
        echoed = prompt_logprobs(self.tm, prompts) if echo else [None] * len(prompts)
        choices = []
        for i, (p, e) in enumerate(zip(prompts, echoed, strict=True)):
            g = greedy(self.tm, p, max_tokens)
            text = (p if echo else "") + g["text"]
            lp = None
            if logprobs is not None:
                head = e or {"tokens": [], "token_logprobs": [], "text_offset": []}
                base = len(p) if echo else 0
                lp = {"tokens": head["tokens"] + g["tokens"],
                      "token_logprobs": head["token_logprobs"] + g["token_logprobs"],
                      "text_offset": head["text_offset"] + [base + o for o in g["text_offset"]],
                      "top_logprobs": None}
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": g["finish_reason"]})
        return 200, {"id": "cmpl-standin", "object": "text_completion", "model": body.get("model"),
                     "choices": choices}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn: a reused session stays on one connection
    server: VllmLike

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.bodies.append(body)
            srv.peers.add(self.client_address)
            busy = srv.overload > 0
            srv.overload -= busy
        headers = {}
        if self.path != "/v1/completions":
            status, out = 404, {"message": "not found"}
        elif busy:
            status, out = 503, {"object": "error", "message": "server overloaded", "code": 503}
            if srv.retry_after is not None:
                headers["Retry-After"] = srv.retry_after
        else:
            with srv.lock:  # one model, one forward at a time
                status, out = srv.complete(body)
        srv.statuses.append(status)
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def local(tiny_lm_folder: Path) -> Any:  # noqa: F811
    return open_black_box(str(tiny_lm_folder))


@pytest.fixture()
def vllm(local: Any) -> Iterator[VllmLike]:
    srv = VllmLike(local.tm)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_the_stand_in_refuses_what_vllm_refuses(vllm: VllmLike) -> None:
    r = requests.post(f"{vllm.url}/completions", json={"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 400 and "max_tokens must be at least 1" in r.json()["message"]
    r = requests.post(f"{vllm.url}/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 21})
    assert r.status_code == 400


def test_endpoint_scores_through_a_vllm_like_server_equal_the_model_in_process(vllm: VllmLike, local: Any) -> None:
    box = open_black_box(vllm.url + "#tiny")
    remote = box.score(TPL, EXAMPLES, perplexity=True, batch_size=4)
    here = local.score(TPL, EXAMPLES, perplexity=True)
    for a, b in zip(remote, here, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
        assert a["logprobs_mean"] == pytest.approx(b["logprobs_mean"], abs=1e-4)
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-4)
        assert a["prediction"] == b["prediction"]
        # the generated token is in the echoed answer but not in the perplexity of the prompt
        assert a["prompt_ppl"] == pytest.approx(b["prompt_ppl"], rel=1e-4)
    assert set(vllm.statuses) == {200}  # nothing refused
    assert all(b["max_tokens"] >= 1 and b["model"] == "tiny" for b in vllm.bodies)
    assert all(b["echo"] and b["logprobs"] == 1 for b in vllm.bodies)
    assert len(vllm.bodies) == 3 and len(vllm.peers) == 1  # 6 choice prompts in 2 batches + 1 ppl: one connection
    gen = box.score(TPL, EXAMPLES[:1], generate=True)[0]["pred_text"]
    assert gen == local.score(TPL, EXAMPLES[:1], generate=True)[0]["pred_text"]
    assert vllm.bodies[-1]["echo"] is False and "logprobs" not in vllm.bodies[-1]


def test_503_is_retried_after_the_servers_retry_after(vllm: VllmLike, local: Any) -> None:
    vllm.overload, vllm.retry_after = 2, "1"
    box = open_black_box(vllm.url)
    t0 = time.monotonic()
    got = box.score(TPL, EXAMPLES[:1])
    waited = time.monotonic() - t0
    assert got[0]["logprobs"] == pytest.approx(local.score(TPL, EXAMPLES[:1])[0]["logprobs"], abs=1e-4)
    assert vllm.statuses == [503, 503, 200] and waited >= 2.0  # two waits of Retry-After: 1
    assert len(vllm.peers) == 1

    vllm.overload, vllm.retry_after = 100, "0"
    vllm.bodies.clear()
    bounded = EndpointBox(vllm.url, max_retries=2)
    with pytest.raises(ModelError, match="still answered 503 after 2 retries"):
        bounded.score(TPL, EXAMPLES[:1])
    assert len(vllm.bodies) == 3  # the first try and two retries, then the error


def test_retry_wait_reads_seconds_and_dates_and_is_capped() -> None:
    import email.utils

    class R:
        def __init__(self, h: str | None):
            self.headers = {} if h is None else {"Retry-After": h}

    box = EndpointBox("http://127.0.0.1:9/v1", max_wait=10.0)
    assert box._wait(R("3"), 0) == 3.0
    assert box._wait(R("3600"), 0) == 10.0  # capped
    assert box._wait(R(None), 2) == 2.0  # 0.5 s doubling without a header
    assert box._wait(R("garbage"), 1) == 1.0
    soon = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= box._wait(R(soon), 0) <= 5.0
