"""The scoring deployment: black boxes multiplexed per replica (LRU), requests batched across callers.

`@serve.multiplexed` keeps up to `max_models_per_replica` loaded black boxes (any `open_black_box`
reference: builtin:minilm, run:<key> checkpoints and their adapters, LM folders) and routes requests for
a model to a replica that has it. Requests arrive in bundles: the ingress batches concurrent requests
(waiting up to `batch_wait_timeout_s`) and sends each batch as one `score_many` call. `@serve.batch`
here merges bundles (up to `max_batch_size` requests, waiting up to the same `batch_wait_timeout_s` for
more, which fills batches from several ingress batches under load) and scores each group that shares a
model with one forward pass (`serving.batching.score_jobs`), in a worker thread so the event loop keeps
receiving. A bundle that finds the scorer idle skips the wait (`_score_bundle`). A sentence scorer keeps
its verbalised choices' embeddings between batches (an LRU of `choice_cache_size` texts per loaded model).
Forward passes are counted by a hook on each model (`stats`), which is how the tests see batching.

Outcomes are plain dicts `{"status": 200, ...}` or `{"status": 4xx/5xx, "message": ...}`, so a bad
request or a model that fails to load never raises through the handle (no 500, the replica stays
healthy); a failed load is not cached, the next request for that model tries again.

Loads run outside Serve's multiplexing lock (which is global per replica and held for a whole load):
each model loads once at a time in a small pool of its own threads, and a request waits for it at most
`load_timeout_s` (then 503), so a slow or hanging model holds neither other models nor the scoring
thread. The Hugging Face hub is off (`HF_HUB_OFFLINE=1` unless the environment says otherwise): a name
that is not on disk fails at once instead of waiting for the network.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve

from rayjobs.engine import observe
from rayjobs.models.loading import BUILTINS, ModelError
from rayjobs.models.sentence_zero_shot import ChoiceCache
from rayjobs.scoring.blackbox import BlackBox, UnknownModelError, open_black_box, split_as
from serving.batching import Failure, ScoreJob, internal_error, request_failure, score_jobs
from serving.completions import causal_lm, complete
from serving.schemas import ExampleIn, TemplateIn
from serving.settings import ServeSettings


class Loaded:
    """A loaded black box and its forward-pass counter; `__del__` is Serve's unload hook (LRU eviction)."""

    def __init__(self, model_id: str, box: BlackBox, on_unload: Any):
        self.model_id, self.box, self._on_unload = model_id, box, on_unload
        self.forwards = 0
        self._hook = None
        module = getattr(getattr(box, "tm", None), "module", None)
        if module is not None:
            # a SentenceTransformer is a Sequential whose forward encode() calls directly: hook its first stage
            root = module[0] if isinstance(module, torch.nn.Sequential) and len(module) else module
            self._hook = root.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.forwards += 1

    def __del__(self) -> None:
        cb, self._on_unload = getattr(self, "_on_unload", None), None
        if cb is not None:
            cb(self)


def _to_gpu(box: BlackBox) -> None:
    """Move a model to the replica's GPU where its scoring path follows the model's device: LMs (inputs go to
    `TaskModel.device`) and the sentence scorer; encoder classifiers are scored on the CPU (their batches are
    built on the CPU by the shared scoring loop). Only where Ray gave this replica a GPU."""

    tm = getattr(box, "tm", None)
    if tm is None or not ray.get_gpu_ids() or not torch.cuda.is_available():
        return
    if box.kind in ("causal", "seq2seq", "run:causal", "run:seq2seq"):
        tm.module.to("cuda")
    elif box.kind == "sentence":
        tm.encoder.to("cuda")


def _inject_load_fault(model_id: str) -> None:
    """Failure injection for tests: TRANSFERLAB_SERVE_FAULT="sleep<S>:<model substring>[;...]" makes the
    load of a matching model take S seconds longer (a slow disk or a hanging network mount)."""
    for rule in os.environ.get("TRANSFERLAB_SERVE_FAULT", "").split(";"):
        action, _, pattern = rule.partition(":")
        if action.startswith("sleep") and pattern and pattern in model_id:
            time.sleep(float(action[len("sleep"):] or 1))


def _failure(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"status": status, "message": message, "type": kind}


def apply_batching(replica: Any, batched: Any, config: dict[str, Any]) -> None:
    """user_config's {max_batch_size, batch_wait_timeout_s} on a replica (scorer or ingress, which batch alike)
    and on its `@serve.batch` method `batched`; a key not given keeps its value."""
    if "max_batch_size" in config:
        replica.max_batch_size = int(config["max_batch_size"])
        batched.set_max_batch_size(replica.max_batch_size)
    if "batch_wait_timeout_s" in config:
        replica.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
        batched.set_batch_wait_timeout_s(replica.batch_wait_timeout_s)


@serve.deployment(name="Scorer", max_ongoing_requests=256, health_check_period_s=5)
class Scorer:
    def __init__(self, settings: dict[str, Any]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.settings = ServeSettings.model_validate(settings)
        self.max_batch_size, self.batch_wait_timeout_s = 32, 0.005  # the decorator's; user_config sets both
        self._loads: dict[str, asyncio.Future[BlackBox]] = {}  # model id -> its load in progress or done
        self._load_pool = ThreadPoolExecutor(4, thread_name_prefix="load")
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="score")  # one forward pass at a time
        self._busy = 0  # bundles queued or being scored (the adaptive wait)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.counts: Counter[str] = Counter()
        self.loaded: dict[str, Loaded] = {}
        self.unloaded_forwards: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.started = time.time()

        async def load(model_id: str) -> Loaded:
            return await self._load(model_id)

        # wired at init so the LRU size comes from the settings (Serve detects instance-level multiplexing)
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.settings.max_models_per_replica)(load)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; `serve deploy` changes them without a restart."""
        apply_batching(self, self._batched, config)

    # -- models -----------------------------------------------------------------------------------
    async def _load(self, model_id: str) -> Loaded:
        """Serve's multiplexing load hook (held under its replica-wide lock): the box `_open` loaded already."""
        box = await self._open(model_id)
        loaded = Loaded(model_id, box, self._unloaded)
        with self._lock:
            self.loaded[model_id] = loaded
            self.counts["loads"] += 1
        self._loads.pop(model_id, None)  # held by Serve's LRU from here on
        return loaded

    def _open(self, model_id: str) -> asyncio.Future[BlackBox]:
        """The load of `model_id` in the load pool, started once and shared by every request waiting for it;
        a failed load is forgotten, so the next request tries again."""
        fut = self._loads.get(model_id)
        if fut is None:
            s = self.settings

            def load() -> BlackBox:
                _inject_load_fault(model_id)
                box = open_black_box(model_id, results=s.results, max_length=s.max_length)
                if box.kind == "sentence":  # the bound of its choice-embedding cache is the operator's

                    box.tm.choice_cache = ChoiceCache(s.choice_cache_size)
                _to_gpu(box)  # where the replica was given a GPU (ray_actor_options.num_gpus)
                return box

            fut = self._loads[model_id] = asyncio.get_running_loop().run_in_executor(self._load_pool, load)

            def forget(f: asyncio.Future[BlackBox]) -> None:
                if (f.cancelled() or f.exception() is not None) and self._loads.get(model_id) is f:
                    del self._loads[model_id]

            fut.add_done_callback(forget)
        return fut

    def _unloaded(self, loaded: Loaded) -> None:
        with self._lock:
            if self.loaded.get(loaded.model_id) is loaded:
                del self.loaded[loaded.model_id]
                self.unloaded_forwards[loaded.model_id] += loaded.forwards
                self.counts["unloads"] += 1

    async def _model(self, model_id: str) -> Loaded | dict[str, Any]:
        refused = self.settings.refusal(model_id)
        if refused:
            return _failure(404, refused, "not_found_error")
        if model_id.startswith("builtin:") and model_id[len("builtin:"):] not in BUILTINS:
            return _failure(404, f"unknown builtin model {model_id}; known: "
                                 f"{', '.join('builtin:' + b for b in BUILTINS)}", "not_found_error")
        try:
            if model_id not in self.loaded:  # load outside Serve's lock, waiting at most load_timeout_s
                await asyncio.wait_for(asyncio.shield(self._open(model_id)), self.settings.load_timeout_s)
            return await self.get_model(model_id)
        except asyncio.TimeoutError:
            self.counts["load_timeouts"] += 1
            return _failure(503, f"model {model_id} is still loading after {self.settings.load_timeout_s:g}s "
                                 "(load_timeout_s); retry later", "model_unavailable")
        except UnknownModelError as e:
            return _failure(404, str(e), "not_found_error")
        except Exception as e:  # noqa: BLE001 - ModelError, OSError, a broken checkpoint: the reason, not a 500
            self.counts["load_failures"] += 1
            reason = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
            return _failure(503, f"model {model_id} failed to load: {reason}", "model_unavailable")

    # -- scoring ----------------------------------------------------------------------------------
    async def score(self, request: dict[str, Any]) -> dict[str, Any]:
        """One /v1/score request (validated by the ingress): {model, template, examples, generate, perplexity}."""
        return (await self.score_many([request]))[0]

    async def score_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several /v1/score requests in one call (the ingress sends its own batches this way: one Ray call
        per batch instead of per request); one outcome per request, in order. Requests of different models
        are scored apart; the ingress groups them by model so multiplexing routes each group."""

        out: list[dict[str, Any] | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_model.setdefault(r["model"], []).append(i)
        jobs: list[tuple[int, ScoreJob]] = []
        for model_id, idx in by_model.items():
            model = await self._model(model_id)
            for i in idx:
                if isinstance(model, dict):
                    out[i] = model
                    continue
                r = requests[i]
                try:
                    tpl = TemplateIn.model_construct(**r["template"])  # validated by the ingress already
                    jobs.append((i, ScoreJob(model.box, tpl.template(),
                                             [ExampleIn.model_construct(**e).example(tpl, j)
                                              for j, e in enumerate(r["examples"])],
                                             bool(r.get("generate")), bool(r.get("perplexity")))))
                except Exception as e:  # noqa: BLE001 - this request's input: it fails alone
                    f = request_failure(e)
                    out[i] = _failure(f.status, f.message, f.type)
        self.counts["calls"] += 1
        self.counts["requests"] += len(requests)
        observe.serve_request("Scorer", len(requests))
        # bundles of at most max_batch_size requests (a live reconfigure may have lowered it below the ingress's)
        size = self.max_batch_size
        bundles = [jobs[k:k + size] for k in range(0, len(jobs), size)]
        scored = await asyncio.gather(*(self._score_bundle([j for _, j in b]) for b in bundles))
        for bundle, results in zip(bundles, scored, strict=True):
            for (i, job), res in zip(bundle, results, strict=True):
                out[i] = (_failure(res.status, res.message, res.type) if isinstance(res, Failure) else
                          {"status": 200, "results": [{**r, "id": e.uid} for r, e in zip(res, job.examples,
                                                                                          strict=True)]})
        return out  # type: ignore[return-value]

    async def _score_bundle(self, jobs: list[ScoreJob]) -> list[list[dict[str, Any]] | Failure]:
        """Adaptive wait: a bundle that finds the scorer idle (nothing queued, nothing computing) is scored at
        once, since nothing could join it; otherwise it waits in the batch queue (up to batch_wait_timeout_s)
        to merge with the bundles already there. So a lone request waits at most at one level, and not at
        all when the ingress also sees it alone."""
        idle = self._busy == 0
        self._busy += 1
        try:
            return (await self._run([jobs]))[0] if idle else await self._batched(jobs)
        finally:
            self._busy -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=lambda bundles: sum(map(len, bundles)))
    async def _batched(self, bundles: list[list[ScoreJob]]) -> list[list[list[dict[str, Any]] | Failure]]:
        """Bundles of requests (one per caller) scored together; the batch size counts requests."""
        return await self._run(bundles)

    async def _run(self, bundles: list[list[ScoreJob]]) -> list[list[list[dict[str, Any]] | Failure]]:
        """One batch: every bundle's requests in one forward pass per model group, in the scoring thread."""
        jobs = [j for b in bundles for j in b]
        self.counts["batches"] += 1
        self.counts["batched_requests"] += len(jobs)
        self.counts["max_batch"] = max(self.counts["max_batch"], len(jobs))
        observe.serve_batch("Scorer", len(jobs))
        try:
            scored = await asyncio.get_running_loop().run_in_executor(self._score_pool, score_jobs, jobs)
        except Exception as e:  # noqa: BLE001 - score_jobs isolates requests; this is a fault of its own
            scored = [internal_error(e, "a scoring batch")] * len(jobs)
        return split_as(scored, bundles)

    # -- completions ------------------------------------------------------------------------------
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One /v1/completions request: {model, prompts, max_tokens, echo, logprobs}."""

        model = await self._model(request["model"])
        if isinstance(model, dict):
            return model
        tm = getattr(model.box, "tm", None)
        if not causal_lm(tm):
            return _failure(422, f"model {request['model']} is a {model.box.kind} scorer; /v1/completions "
                                 "needs a causal LM (a GPT-2 style folder or a stored causal run)")

        def run() -> tuple[list[dict[str, Any]], int, int]:
            with model.box._lock:
                return complete(tm, request["prompts"], request["max_tokens"], request["echo"], request["logprobs"])

        self.counts["completions"] += 1
        choices, n_prompt, n_new = await asyncio.to_thread(run)
        return {"status": 200, "choices": choices, "prompt_tokens": n_prompt, "completion_tokens": n_new}

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this replica: requests, batches, forward passes per model, loaded models (LRU order),
        the choice-embedding cache of each loaded sentence scorer."""
        ctx = serve.get_replica_context()
        with self._lock:
            forwards = Counter(self.unloaded_forwards)
            for mid, m in self.loaded.items():
                forwards[mid] += m.forwards
            loaded = list(self.loaded)
            caches = {mid: getattr(getattr(m.box, "tm", None), "choice_cache", None) for mid, m in self.loaded.items()}
        return {"replica": ctx.replica_id.unique_id, "pid": os.getpid(), "uptime_s": time.time() - self.started,
                "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "loaded_models": loaded, "forward_passes": dict(forwards),
                "choice_cache": {mid: {"entries": len(c), "max_entries": c.max_entries, "hits": c.hits,
                                       "misses": c.misses} for mid, c in caches.items() if c is not None},
                **dict(self.counts)}

    def ping(self) -> str:
        return "ok"
