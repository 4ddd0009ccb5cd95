"""The Serve application on a real local Ray Serve (one instance for the module), plus its pure parts.

References are independent of the served code path: log-likelihoods from a hand-written forward pass,
the `predictions` rows and `runs.score` a training run stored, the paper's Tables 6 and 7 and the
released CSVs for source rankings, forward passes counted by a hook in the replica.
"""

from __future__ import annotations

import csv
import hashlib
import math
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
import yaml
from analysis_support import TASKWEB, needs_taskweb, pristine_taskweb_db

from analysis.store.results import ResultStore
from rayjobs.scoring.blackbox import open_black_box
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate
from serving.app import TOKEN_ENV
from tests.analysis.selection.test_analysis_selection import TABLE6, TABLE7
from tests.analysis.selection.test_fute_embeddings import V, cos, put
from tests.conftest import REPO, cli, needs_data

pytestmark = [needs_data, needs_taskweb]

TOKEN = "test-token-123"
SENTIMENT = {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]}
REVIEWS = ["a fine, moving film", "dull and far too long", "I would watch it again tomorrow"]


# -- pure parts (no Ray) ----------------------------------------------------------------------------------
def _direct_logprobs(tm: Any, ids: list[int]) -> list[float]:
    """log p(token_j | tokens_<j) for j >= 1 from one unpadded forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(tm.module(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[j - 1, t]) for j, t in enumerate(ids) if j > 0]


def test_prompt_logprobs_and_greedy_match_a_direct_forward(tiny_lm_folder: Path) -> None:  # noqa: F811
    from serving.completions import complete, greedy, prompt_logprobs

    tm = open_black_box(str(tiny_lm_folder)).tm
    prompts = ["Review: a fine film Sentiment? positive", "short"]
    got = prompt_logprobs(tm, prompts, top=2)
    for p, g in zip(prompts, got, strict=True):
        ids = tm.tokenizer(p, add_special_tokens=False)["input_ids"]
        assert g["token_logprobs"][0] is None and len(g["token_logprobs"]) == len(ids)
        assert g["token_logprobs"][1:] == pytest.approx(_direct_logprobs(tm, ids), abs=1e-5)
        assert "".join(g["tokens"]) == p[g["text_offset"][0]:]  # tokens concatenate back to the prompt
        assert g["text_offset"] == sorted(g["text_offset"]) and all(p[o] != " " for o in g["text_offset"])
        assert all(max(t.values()) >= v - 1e-6 for t, v in zip(g["top_logprobs"][1:], g["token_logprobs"][1:],
                                                                 strict=True))
    # greedy: argmax of raw logits step by step, stopping at EOS
    ids = tm.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(4):
        with torch.no_grad():
            nxt = int(tm.module(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(nxt)
        if nxt == tm.eos_id:
            break
    g = greedy(tm, prompts[0], 4)
    kept = new[:-1] if new[-1] == tm.eos_id else new
    assert g["text"] == tm.tokenizer.decode(kept, skip_special_tokens=True)
    assert g["finish_reason"] == ("stop" if new[-1] == tm.eos_id else "length")
    choices, n_prompt, n_new = complete(tm, prompts[:1], 4, echo=True, logprobs=0)
    assert choices[0]["text"] == prompts[0] + g["text"] and n_prompt == len(ids) and n_new == len(new)
    lp = choices[0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + len(kept) and lp["text_offset"][len(ids)] == len(prompts[0])


def test_batched_scoring_equals_each_request_alone_and_isolates_a_bad_one(trained_source: dict[str, Any],
                                                                          registry: Any) -> None:
    from serving.batching import Failure, ScoreJob, score_jobs

    snli = trained_source["runs"]["snli"]
    box = open_black_box(f"run:{snli['key']}", results=trained_source["results"])
    data = list(registry.load_data("snli", 0, 12, seed=3).eval)
    ident = PromptTemplate(name="input", input="{input}")
    jobs = [ScoreJob(box, ident, data[:5]), ScoreJob(box, ident, data[5:12]),
            ScoreJob(box, PromptTemplate(name="x", input="{input}", answer_choices=["a", "b", "c"]),
                     [Example("t", ("x", "y", "z"), 0)])]
    out = score_jobs(jobs)
    assert isinstance(out[2], Failure) and out[2].status == 422 and "classifies into 2 labels" in out[2].message
    for job, recs in zip(jobs[:2], out[:2], strict=True):
        alone = box.score(ident, job.examples)
        assert [r["prediction"] for r in recs] == [r["prediction"] for r in alone]
        assert torch.allclose(torch.tensor([r["logprobs"] for r in recs]), torch.tensor([r["logprobs"] for r in alone]),
                              atol=1e-5)


def test_read_only_store_computes_taskshop_without_writing() -> None:
    from serving.store_queries import rank_sources, read_only_store

    db = pristine_taskweb_db()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    res = rank_sources(db, "rte", "taskshop-roe", 5, setup="finetune:t5l", lam=0.7)
    assert [s["source"] for s in res["sources"]] == TABLE6["rte"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with read_only_store(db) as con:
        assert con.execute("SELECT count(*) FROM selector_scores WHERE selector LIKE 'taskshop%'").fetchone()[0] == 0
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM selector_scores WHERE selector LIKE 'taskshop%'").fetchone()[0] == 0
    con.close()


def test_serve_config_is_a_valid_serve_deploy_file_and_builds() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.settings import ServeSettings

    raw = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app" and app.route_prefix == "/"
    settings = ServeSettings.model_validate(app.args)  # every arg is a known setting
    assert settings.db and settings.models
    r = cli("serve", "--help")
    assert r.returncode == 0 and "--db" in r.stdout and "--port" in r.stdout


# -- the real Serve application ---------------------------------------------------------------------------
@dataclass
class Service:
    url: str
    port: int
    db: Path
    lm: str
    runs: dict[str, Any]
    http: requests.Session

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=120, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=60, **kw)

    def stats(self) -> dict[str, Any]:
        r = self.get("/v1/stats")
        assert r.status_code == 200, r.text
        return r.json()


#: the config's `deployments:` section, as serving/config.yaml writes it: a long wait, so concurrent requests meet
BATCHING = [{"name": d, "user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.2}} for d in ("Ingress", "Scorer")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(trained_source: dict[str, Any], tiny_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
            ) -> Iterator[Service]:
    """Ray + Serve started here (own temp dir, free port), the app deployed from `build_app` with a store
    holding the TaskWeb release and the two trained runs; torn down at the end of the module."""
    import ray
    from ray import serve

    from serving.app import application

    root = tmp_path_factory.mktemp("serve")
    db = root / "store.duckdb"
    shutil.copy(pristine_taskweb_db(), db)
    ResultStore(trained_source["results"], db_path=db).ingest()  # the runs and predictions, into the copy
    emb = ResultStore(root / "emb", db_path=db)  # one FUTE space with hand-made vectors (test_fute_embeddings)
    for t in ("nli", "para", "sent"):
        put(emb, f"dte-{t}", "S1aaaa", "DTE", t, V[t])
    put(emb, "mte-nli", "S1aaaa", "MTE", "nli", V["m_nli"], model="full/nli", source_task="nli")
    put(emb, "mte-para", "S1aaaa", "MTE", "para", V["m_para"], model="full/para", source_task="para")
    for p, v in (("good", "p_good"), ("good-copy", "p_copy"), ("bad-x", "p_bad")):
        put(emb, f"mte-{p}", "S1aaaa", "MTE", "nli", V[v], model="zs", prompt=p)
    emb.ingest()
    saved = {k: os.environ.get(k) for k in (TOKEN_ENV, "RAY_AUTH_MODE")}
    os.environ[TOKEN_ENV] = TOKEN  # the ingress replica inherits it from the Ray this process starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp"),
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application({"db": str(db), "results": str(trained_source["results"]),
                             "models": ["builtin:minilm", str(tiny_lm_folder)], "completion_model": str(tiny_lm_folder),
                             "allow_unlisted_models": True,  # the operator's opt-in: any local folder loads
                             "max_examples": 64, "max_prompts": 8, "max_new_tokens": 32,
                             "max_models_per_replica": 3, "request_timeout_s": 60}, BATCHING),
                  name="transferlab", route_prefix="/")
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        yield Service(f"http://127.0.0.1:{port}", port, db, str(tiny_lm_folder), trained_source["runs"], http)
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _score(svc: Service, model: str, examples: list[dict[str, Any]], template: dict[str, Any] | None = None,
           **extra: Any) -> list[dict[str, Any]]:
    r = svc.post("/v1/score", {"model": model, "template": template or SENTIMENT, "examples": examples, **extra})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_score_loglikelihoods_equal_a_direct_forward(service: Service) -> None:
    got = _score(service, service.lm, [{"input": t, "id": f"r{i}"} for i, t in enumerate(REVIEWS)], perplexity=True)
    tm = open_black_box(service.lm).tm
    tok = tm.tokenizer
    for text, row, i in zip(REVIEWS, got, range(3), strict=True):
        prompt = SENTIMENT["input"].format(input=text)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        direct = []
        for c in SENTIMENT["answer_choices"]:
            cids = tok(" " + c, add_special_tokens=False)["input_ids"]
            direct.append(sum(_direct_logprobs(tm, p + cids)[len(p) - 1:]))
        assert row["id"] == f"r{i}" and row["choices"] == SENTIMENT["answer_choices"]
        assert row["logprobs"] == pytest.approx(direct, abs=1e-4)
        assert row["probs"] == pytest.approx(torch.softmax(torch.tensor(direct, dtype=torch.float64), -1).tolist(),
                                             abs=1e-4)
        assert row["prediction"] == int(torch.tensor(direct).argmax())
        assert row["prompt_ppl"] == pytest.approx(math.exp(-sum(_direct_logprobs(tm, p)) / (len(p) - 1)), rel=1e-4)
    # the sentence scorer: log-softmax of cosine / 0.05 between the prompt and each choice (MiniLM embeddings)
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
    rows = _score(service, "builtin:minilm", [{"input": REVIEWS[0]}])
    emb = st.encode([SENTIMENT["input"].format(input=REVIEWS[0]), *SENTIMENT["answer_choices"]],
                    normalize_embeddings=True, convert_to_tensor=True).double()
    want = torch.log_softmax((emb[1:] @ emb[0]) / 0.05, -1).tolist()
    assert rows[0]["logprobs"] == pytest.approx(want, abs=1e-4)


def test_concurrent_requests_are_batched_into_fewer_forward_passes(service: Service) -> None:
    model = f"run:{service.runs['snli']['key']}"
    tpl = {"input": "{input}", "answer_choices": ["C", "N"]}
    alone = {t: _score(service, model, [{"input": t}], tpl)[0] for t in REVIEWS}  # loads the model, one by one
    before = service.stats()
    n = 12
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = service.post("/v1/score", {"model": model, "template": tpl,
                                            "examples": [{"input": REVIEWS[i % 3]}]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = service.stats()
    assert all(r.status_code == 200 for r in out), [r.text for r in out if r.status_code != 200]
    for i, r in enumerate(out):  # a batched answer is the answer the request gets alone
        assert r.json()["results"][0]["logprobs"] == pytest.approx(alone[REVIEWS[i % 3]]["logprobs"], abs=1e-5)
    forwards = after["forward_passes"][model] - before["forward_passes"][model]
    batches = after["batches"] - before["batches"]
    assert after["batched_requests"] - before["batched_requests"] == n
    assert 1 <= forwards == batches < n  # one forward pass per batch, fewer than the requests
    assert after["requests"] - before["requests"] == n
    assert 1 <= after["calls"] - before["calls"] < n  # the ingress sent them in fewer Ray calls than requests
    assert after["max_batch"] > 1


def test_a_bad_request_batched_with_good_ones_fails_alone(service: Service) -> None:
    """Concurrent requests for two models, one of them unfit for its model, travel in the same ingress
    batch: the unfit one gets its 422, every other one its own answer."""
    run = f"run:{service.runs['snli']['key']}"
    fit, unfit = {"input": "{input}", "answer_choices": ["C", "N"]}, {"input": "{input}", "answer_choices": ["a", "b", "c"]}
    bodies = [{"model": run, "template": fit, "examples": [{"input": REVIEWS[0]}]},
              {"model": "builtin:minilm", "template": SENTIMENT, "examples": [{"input": REVIEWS[1]}]},
              {"model": run, "template": unfit, "examples": [{"input": REVIEWS[2]}]},
              {"model": "builtin:minilm", "template": SENTIMENT, "examples": [{"input": REVIEWS[2]}]}]
    alone = [_score(service, b["model"], b["examples"], b["template"])[0] for b in bodies if b["template"] is not unfit]
    before = service.stats()
    barrier, out = threading.Barrier(len(bodies)), [None] * len(bodies)

    def one(i: int) -> None:
        barrier.wait()
        out[i] = service.post("/v1/score", bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[2].status_code == 422 and "classifies into 2 labels" in out[2].json()["error"]["message"]  # type: ignore[union-attr]
    good = [r for i, r in enumerate(out) if i != 2]
    assert [r.status_code for r in good] == [200, 200, 200], [r.text for r in good]  # type: ignore[union-attr]
    for r, want in zip(good, alone, strict=True):
        assert r.json()["results"][0]["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)  # type: ignore[union-attr]
    assert service.stats()["calls"] - before["calls"] < len(bodies)  # they did share Ray calls


def test_two_stored_checkpoints_from_one_replica_reproduce_their_training_predictions(
        service: Service, registry: Any) -> None:
    replicas = set()
    for task in ("snli", "scitail"):
        run = service.runs[task]
        data = list(registry.load_data(task, 0, 40, seed=3).eval)
        got = _score(service, f"run:{run['key']}", [{"input": e.text, "choices": list(e.choices), "id": e.uid}
                                                    for e in data], {"name": "input", "input": "{input}"})
        stored = {p["example_id"]: p for p in run["predictions"].to_pylist()}
        assert {g["id"] for g in got} == set(stored) and len(got) == 40
        for g in got:
            assert g["prediction"] == stored[g["id"]]["prediction"]
            assert g["logprobs"] == pytest.approx(stored[g["id"]]["logprobs"], abs=1e-5)
        gold = {e.uid: e.label for e in data}
        served_acc = sum(g["prediction"] == gold[g["id"]] for g in got) / len(got)
        con = duckdb.connect(str(service.db), read_only=True)
        score = con.execute("SELECT score FROM runs WHERE run_key = ?", [run["key"]]).fetchone()[0]
        con.close()
        assert served_acc == pytest.approx(score)
        stats = service.stats()
        assert f"run:{run['key']}" in stats["loaded_models"]
        replicas.add(stats["replica"])
    assert len(replicas) == 1  # both checkpoints live on one replica
    assert {f"run:{service.runs[t]['key']}" for t in ("snli", "scitail")} <= set(service.stats()["loaded_models"])


def test_least_recently_used_model_is_unloaded(service: Service) -> None:
    tpl = {"input": "{input}", "answer_choices": ["C", "N"]}
    order = [service.lm, f"run:{service.runs['snli']['key']}", f"run:{service.runs['scitail']['key']}",
             "builtin:minilm"]
    for m in order:
        _score(service, m, [{"input": "a"}], tpl)
    stats = service.stats()
    assert set(stats["loaded_models"]) == set(order[1:])  # max_models_per_replica = 3: the LM went first
    assert stats["unloads"] >= 1


def test_openai_client_and_endpoint_black_box_against_the_app(service: Service) -> None:
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=TOKEN, max_retries=0)
    prompt = "Review: a fine film Sentiment? positive"
    res = client.completions.create(model=service.lm, prompt=[prompt, "short"], max_tokens=1, echo=True, logprobs=0)
    tm = open_black_box(service.lm).tm
    lp = res.choices[0].logprobs
    ids = tm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert res.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(_direct_logprobs(tm, ids), abs=1e-4)
    assert all(o >= len(prompt) for o in lp.text_offset[len(ids):])  # the generated token(s) after the prompt
    assert res.usage.prompt_tokens == len(ids) + len(tm.tokenizer("short", add_special_tokens=False)["input_ids"])
    gen = client.completions.create(model=service.lm, prompt=prompt, max_tokens=3)
    assert gen.choices[0].finish_reason in ("stop", "length") and isinstance(gen.choices[0].text, str)
    models = [m.id for m in client.models.list().data]
    assert service.lm in models and f"run:{service.runs['snli']['key']}" in models

    # the endpoint-as-model path: EndpointBox scoring through this app equals scoring the model directly
    tpl = PromptTemplate(name="s", input=SENTIMENT["input"], answer_choices=SENTIMENT["answer_choices"])
    examples = [Example(t, ("n", "p"), 0) for t in REVIEWS]
    remote = open_black_box(f"{service.url}/v1#{service.lm}", api_key=TOKEN).score(tpl, examples, perplexity=True)
    local = open_black_box(service.lm).score(tpl, examples, perplexity=True)
    for a, b in zip(remote, local, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
        assert a["logprobs_mean"] == pytest.approx(b["logprobs_mean"], abs=1e-4)
        assert a["prediction"] == b["prediction"]
        assert a["prompt_ppl"] == pytest.approx(b["prompt_ppl"], rel=1e-4)
    one = examples[:1]  # greedy generation through the endpoint (one prompt: no padding on either side)
    assert (open_black_box(f"{service.url}/v1#{service.lm}", api_key=TOKEN).score(tpl, one, generate=True)[0]["pred_text"]
            == open_black_box(service.lm).score(tpl, one, generate=True)[0]["pred_text"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=service.lm, prompt="x", max_tokens=1, echo=True, logprobs=0)


def _ranking(path: Path, a: str, b: str, target: str, value: Any) -> list[str]:
    rows = [r for r in csv.DictReader(path.open()) if r[b] == target and r[a] != target]
    return [r[a] for r in sorted(rows, key=lambda r: (-value(r), r[a]))]


def test_rank_sources_from_the_store_read_only(service: Service) -> None:
    before = hashlib.sha256(service.db.read_bytes()).hexdigest()

    def rank(**body: Any) -> list[str]:
        r = service.post("/v1/rank/sources", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [s["rank"] for s in out["sources"]] == list(range(1, len(out["sources"]) + 1))
        scores = [s["score"] for s in out["sources"]]
        assert scores == sorted(scores, reverse=True)
        return [s["source"] for s in out["sources"]]

    for target in ("rte", "copa", "wsc"):  # paper 000, Table 6 (TaskShop, F = RoE) and Table 7 (measured transfer)
        assert rank(target=target, selector="taskshop-roe", setup="finetune:t5l", k=5) == TABLE6[target]
        assert rank(target=target, selector="oracle", setup="finetune:t5l", k=5) == TABLE7[target]
    # RoE as released
    roe = _ranking(TASKWEB / "roe_scores_minilm_dot32.csv", "source", "target", "cb", lambda r: float(r["score"]))
    assert rank(target="cb", selector="roe", k=4) == roe[:4]
    # LLM-similarity: symmetric, the mean of both directions
    llm: dict[tuple[str, str], float] = {(r["task_a"], r["task_b"]): float(r["score"])
                                         for r in csv.DictReader((TASKWEB / "llm_similarity_davinci003.csv").open())}
    sym = {s: (v + llm[(t, s)]) / 2 if (t, s) in llm else v for (s, t), v in llm.items() if t == "rte" and s != t}
    assert rank(target="rte", selector="llm", k=3) == sorted(sym, key=lambda s: (-sym[s], s))[:3]
    rank(target="rte", selector="taskshop-llm", setup="finetune:t5b", k=3)
    assert hashlib.sha256(service.db.read_bytes()).hexdigest() == before  # nothing was written


def test_fute_rankings_from_stored_embeddings(service: Service) -> None:
    before = hashlib.sha256(service.db.read_bytes()).hexdigest()
    r = service.post("/v1/rank/models", {"target": "nli", "k": 10})
    assert r.status_code == 200, r.text
    out = r.json()
    vec = {"full/nli": V["m_nli"], "full/para": V["m_para"], "zs + good": V["p_good"],
           "zs + good-copy": V["p_copy"], "zs + bad-x": V["p_bad"]}
    want = sorted(vec, key=lambda n: (-cos(vec[n], V["nli"]), n))
    assert out["space"] == "S1aaaa" and out["dte"] == "dte-nli" and out["n_candidates"] == 5
    assert [m["name"] for m in out["models"]] == want
    assert [m["cosine"] for m in out["models"]] == pytest.approx([cos(vec[n], V["nli"]) for n in want], abs=1e-6)
    only = service.post("/v1/rank/models", {"target": "para", "models": ["full/nli", "full/para"], "k": 1}).json()
    assert [(m["model"], m["source_task"], m["rank"]) for m in only["models"]] == [("full/para", "para", 1)]
    # prompts of one model: the good prompt and its copy first (equal cosines: by name), the bad one last
    p = service.post("/v1/rank/prompts", {"task": "nli", "model": "zs", "space": "S1a"}).json()
    assert [x["prompt"] for x in p["prompts"]] == ["good", "good-copy", "bad-x"]
    assert p["prompts"][2]["cosine"] == pytest.approx(cos(V["p_bad"], V["nli"]), abs=1e-6)
    # source ranking with FUTE's DTE cosine: sent (1/sqrt 3) above para (0) for nli
    src = service.post("/v1/rank/sources", {"target": "nli", "selector": "fute", "k": 2}).json()
    assert [x["source"] for x in src["sources"]] == ["sent", "para"]
    assert src["sources"][0]["score"] == pytest.approx(cos(V["sent"], V["nli"]), abs=1e-6)
    for path, body, fragment in (
            ("/v1/rank/models", {"target": "nli", "space": "nosuch"}, "unknown embedding space 'nosuch'"),
            ("/v1/rank/models", {"target": "copa"}, "no DTE of task 'copa'"),
            ("/v1/rank/prompts", {"task": "nli", "model": "gpt-x"}, "no prompt MTEs of model 'gpt-x'"),
            ("/v1/rank/prompts", {"task": "nli", "model": "zs", "k": 0}, "body.k")):
        bad = service.post(path, body)
        assert bad.status_code == 422 and fragment in bad.text, (path, body, bad.text)
    # embed rows hold vectors, not models: /v1/models does not offer them
    assert not [c for c in service.get("/v1/models").json()["data"] if c["id"].startswith("run:dte-")]
    assert hashlib.sha256(service.db.read_bytes()).hexdigest() == before


BAD = [
    ("missing field", "/v1/score", {"template": SENTIMENT, "examples": [{"input": "x"}]}, 422, "body.model"),
    ("wrong type", "/v1/score", {"model": "builtin:minilm", "template": SENTIMENT, "examples": "x"}, 422,
     "body.examples"),
    ("wrong item type", "/v1/score", {"model": "builtin:minilm", "template": SENTIMENT, "examples": [{"input": 3}]},
     422, "body.examples.0.input"),
    ("no placeholder", "/v1/score", {"model": "builtin:minilm", "template": {"input": "Sentiment?"},
                                     "examples": [{"input": "x"}]}, 422, "must contain {input}"),
    ("unknown field in template", "/v1/score", {"model": "builtin:minilm", "template": {"input": "{inpt}"},
                                                "examples": [{"input": "x"}]}, 422, "unknown fields ['inpt']"),
    ("empty batch", "/v1/score", {"model": "builtin:minilm", "template": SENTIMENT, "examples": []}, 422,
     "body.examples"),
    ("oversized batch", "/v1/score", {"model": "builtin:minilm", "template": SENTIMENT,
                                      "examples": [{"input": "x"}] * 65}, 413, "at most 64"),
    ("unknown run key", "/v1/score", {"model": "run:0000nosuchkey", "template": SENTIMENT,
                                      "examples": [{"input": "x"}]}, 404, "no stored checkpoint for run 0000nosuchkey"),
    ("unknown folder", "/v1/score", {"model": "/nonexistent/model", "template": SENTIMENT,
                                     "examples": [{"input": "x"}]}, 404, "does not exist"),
    ("unknown builtin", "/v1/score", {"model": "builtin:nosuch", "template": SENTIMENT,
                                      "examples": [{"input": "x"}]}, 404, "unknown builtin model builtin:nosuch"),
    ("unlisted endpoint", "/v1/score", {"model": "http://127.0.0.1:9/v1", "template": SENTIMENT,
                                        "examples": [{"input": "x"}]}, 404, "must be listed"),
    ("choices do not fit the head", "/v1/score", {"model": "RUN:snli", "template": {"input": "{input}",
                                                  "answer_choices": ["a", "b", "c"]}, "examples": [{"input": "x"}]},
     422, "classifies into 2 labels"),
    ("no choices for the sentence scorer", "/v1/score", {"model": "builtin:minilm", "template": {"input": "{input}"},
                                                         "examples": [{"input": "x"}]}, 422, "needs answer choices"),
    ("unknown selector", "/v1/rank/sources", {"target": "rte", "selector": "nosuch"}, 422, "unknown selector 'nosuch'"),
    ("unknown setup", "/v1/rank/sources", {"target": "rte", "selector": "oracle", "setup": "finetune:nosuch"}, 422,
     "no transfer scores for setup 'finetune:nosuch'"),
    ("setup missing", "/v1/rank/sources", {"target": "rte", "selector": "taskshop-roe"}, 422, "needs a transfer setup"),
    ("unknown target", "/v1/rank/sources", {"target": "nosuch", "selector": "roe"}, 422, "no scores for target"),
    ("k too large", "/v1/rank/sources", {"target": "rte", "selector": "roe", "k": 500}, 422, "candidate sources"),
    ("k not positive", "/v1/rank/sources", {"target": "rte", "selector": "roe", "k": 0}, 422, "body.k"),
    ("sampling", "/v1/completions", {"model": "LM", "prompt": "x", "temperature": 0.7}, 422, "only greedy"),
    ("max_tokens 0 (vLLM refuses it)", "/v1/completions", {"model": "LM", "prompt": "x", "max_tokens": 0}, 422,
     "body.max_tokens"),
    ("too many new tokens", "/v1/completions", {"model": "LM", "prompt": "x", "max_tokens": 33}, 422, "at most 32"),
    ("too many prompts", "/v1/completions", {"model": "LM", "prompt": ["x"] * 9, "max_tokens": 1}, 413, "at most 8"),
    ("not a causal LM", "/v1/completions", {"model": "builtin:minilm", "prompt": "x", "max_tokens": 1}, 422,
     "needs a causal LM"),
]


@pytest.mark.parametrize("name, path, body, status, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_clear_4xx(service: Service, name: str, path: str, body: dict[str, Any], status: int,
                                      fragment: str) -> None:
    body = {k: (service.lm if v == "LM" else f"run:{service.runs['snli']['key']}" if v == "RUN:snli" else v)
            for k, v in body.items()}
    r = service.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == status


def test_a_model_that_fails_to_load_is_a_503_and_the_replica_keeps_serving(service: Service, tmp_path: Path) -> None:
    broken = tmp_path / "broken-lm"
    shutil.copytree(service.lm, broken)
    (broken / "config.json").write_text("{not json")
    body = {"model": str(broken), "template": SENTIMENT, "examples": [{"input": "x"}]}
    r = service.post("/v1/score", body)
    assert r.status_code == 503 and f"model {broken} failed to load" in r.json()["error"]["message"], r.text
    assert _score(service, "builtin:minilm", [{"input": "x"}])  # other models still served
    shutil.copy(Path(service.lm) / "config.json", broken / "config.json")  # repaired: the failure was not cached
    r = service.post("/v1/score", body)
    assert r.status_code == 200, r.text


def test_token_health_docs_and_models(service: Service) -> None:
    body = {"model": "builtin:minilm", "template": SENTIMENT, "examples": [{"input": "x"}]}
    assert requests.post(service.url + "/v1/score", json=body, timeout=60).status_code == 401
    wrong = requests.post(service.url + "/v1/score", json=body, timeout=60, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]["message"]
    health = requests.get(service.url + "/healthz", timeout=60)  # probes need no token
    assert health.status_code == 200 and health.json()["status"] == "ok"
    spec = requests.get(service.url + "/openapi.json", timeout=60).json()
    assert {"/v1/score", "/v1/completions", "/v1/models", "/v1/rank/sources", "/v1/rank/models", "/v1/rank/prompts",
            "/healthz"} <= set(spec["paths"])
    assert "ScoreRequest" in spec["components"]["schemas"]
    cards = service.get("/v1/models").json()["data"]
    runs = {c["id"]: c for c in cards if c["source"] == "stored run"}
    snli = service.runs["snli"]
    assert runs[f"run:{snli['key']}"]["task"] == "snli"
    assert runs[f"run:{snli['key']}"]["score"] == pytest.approx(snli["row"]["score"])
    assert [c["id"] for c in cards[:2]] == ["builtin:minilm", service.lm]


def test_zy_request_and_batch_metrics_reach_the_prometheus_endpoint(service: Service) -> None:
    """The scorer's Ray metrics agree with its own counters: one request count per /v1/score, one
    batch-size observation per batch (bucket counts: Ray exports buckets, its _sum is approximate)."""
    import time

    import ray

    from tests.rayjobs.engine.test_observability import buckets, scrape, total

    _score(service, "builtin:minilm", [{"input": REVIEWS[0]}])
    stats = service.stats()
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.time() + 60
    while True:
        s = scrape(port)
        got = (total(s, "ray_transferlab_serve_requests_total", deployment="Scorer"),
               total(s, "ray_transferlab_serve_batch_size_count", deployment="Scorer"))
        if got == (stats["requests"], stats["batches"]) or time.time() > deadline:
            break
        time.sleep(3)
    assert got == (stats["requests"], stats["batches"]) and stats["requests"] > 0
    size = buckets(s, "ray_transferlab_serve_batch_size_bucket")
    assert size[256] == stats["batches"]
    if stats["max_batch"] > 1:  # a batch of several requests is above the first bucket
        assert size[1] < stats["batches"]


def test_zz_a_killed_replica_recovers(service: Service) -> None:
    """Runs last (name): kills the scoring replica; Serve replaces it and requests succeed after retries."""
    import ray

    old = service.stats()["replica"]
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#Scorer#" in a["name"] and old in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    body = {"model": "builtin:minilm", "template": SENTIMENT, "examples": [{"input": "x"}]}
    deadline, statuses = time.time() + 150, []
    while time.time() < deadline:
        r = service.post("/v1/score", body)
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503, 504}, statuses  # never a 500 while the replica is replaced
    assert service.stats()["replica"] != old
