"""The transferlab Serve application: a FastAPI ingress in front of the scoring deployment.

    serve run serving/config.yaml            # or: transferlab serve --db results/taskweb.duckdb
    curl -s localhost:8000/v1/score -H 'content-type: application/json' -d '{"model": "builtin:minilm",
         "template": {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]},
         "examples": [{"input": "a joyful film"}]}'

Endpoints (OpenAPI at /docs): POST /v1/score (model + template + examples -> per-example predictions
records, the `predictions` columns), POST /v1/completions (the OpenAI subset scoring needs: prompt,
max_tokens, logprobs, echo), GET /v1/models, POST /v1/rank/sources (top-k sources for a target by a
stored or computed selector, `fute` included, read-only over the store), POST /v1/rank/models and
POST /v1/rank/prompts (FUTE: black boxes / prompts ranked by cosine to a task's DTE, from stored
embeddings), GET /v1/stats, GET /healthz.

Errors are JSON `{"error": {"message", "type", "code"}, "detail"}` with a 4xx for every bad request
(422 names the field, 413 a body, prompt or request cost over its limit, 404 unknown or unserved model /
run key, 503 a model that failed to load or a replica that is restarting, 504 a request slower than
`request_timeout_s`); host paths in messages read `<path>`. A 500 is a server fault: its body holds only a
request id, the traceback is in the replica log. Serve has no authentication of its own: with
TRANSFERLAB_API_TOKEN set in the ingress replica's environment every /v1 route requires
`Authorization: Bearer <token>`, checked before the body is read (/healthz and /docs stay open for probes).

Hostile input is bounded before it costs anything: the body size (`max_body_bytes`, also for chunked
bodies), templates with plain placeholders only, each rendered prompt's length and the request's cost
(computed without rendering), the models a request may load (`ServeSettings.refusal`), and store queries
(`max_store_queries` at once, cancelled after `store_timeout_s`).
"""

# no `from __future__ import annotations`: FastAPI must see the body models, not strings, through
# Serve's class-based view
import asyncio
import hmac
import logging
import os
import re
import time
import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from analysis.errors import AnalysisError
from serving.schemas import (
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ModelCard,
    ModelList,
    RankModelsRequest,
    RankModelsResponse,
    RankPromptsRequest,
    RankPromptsResponse,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
)
from serving.scorer import Scorer, apply_batching
from serving.settings import ServeSettings, is_endpoint

log = logging.getLogger("ray.serve")

TOKEN_ENV = "TRANSFERLAB_API_TOKEN"
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)  # a replica down or full: 503

api = FastAPI(title="transferlab", version="0.1.0",
              description="Models with prompts as black boxes, per-example outputs, and source-selection "
                          "queries over the transferlab results store.")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (401, 404, 413, 422, 503, 504)}
BEARER = {"WWW-Authenticate": 'Bearer realm="transferlab"'}
_PATH = re.compile(r"(?<![\w:/.~-])(?:~|/)[^\s'\"`,;()\[\]{}<>]+")


def redact(text: str, keep: tuple[str, ...] = ()) -> str:
    """`text` with host paths (absolute or ~) written as `<path>`, except the strings in `keep` (what the
    request itself named): error messages must not tell a client where things live on the host."""
    return _PATH.sub(lambda m: m.group(0) if any(k and m.group(0).startswith(k) for k in keep) else "<path>", text)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", keep: tuple[str, ...] = ()):
        super().__init__(message)
        self.status, self.message, self.kind = status, redact(message, keep), kind


def _error(status: int, message: str, kind: str, detail: Any = None, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status},
                         "detail": message if detail is None else detail}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "2"} if e.status == 503 else BEARER if e.status == 401 else None
    return _error(e.status, e.message, e.kind, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (`body.examples.0.input: Field required`)."""
    errors = e.errors()[:20]
    parts = [redact(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}") for err in errors]
    detail = [{"loc": [str(x) for x in err.get("loc", ())], "msg": redact(str(err.get("msg", ""))),
               "type": err.get("type")} for err in errors]
    return _error(422, "; ".join(parts)[:2000], "invalid_request_error", detail)


@api.exception_handler(HTTPException)
async def _http(_: Request, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, redact(str(e.detail)), "invalid_request_error", headers=getattr(e, "headers", None))


@api.exception_handler(Exception)
async def _bug(request: Request, e: Exception) -> JSONResponse:
    """A server-side fault (not a bad request): the traceback goes to the replica log under a request id,
    the body holds only that id (no source paths, pids, node addresses or actor ids)."""
    rid = uuid.uuid4().hex[:16]
    log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=e)
    return _error(500, f"internal error (request id {rid}; details in the replica log)", "server_error")


UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer <TRANSFERLAB_API_TOKEN>)"


def token_ok(authorization: str | None) -> bool:
    """The Authorization header against TRANSFERLAB_API_TOKEN (where the ingress replica runs; unset: open)."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class Guard:
    """ASGI middleware in front of every route, before a byte of the body is read: the bearer token of /v1
    routes (401 with WWW-Authenticate) and the body size (413 from Content-Length, and while a chunked body
    is read, at `max_body_bytes`). The limit is the ingress's setting (`Guard.max_body_bytes`)."""

    max_body_bytes = 1 << 20

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"].startswith("/v1/") and not token_ok(headers.get("authorization")):
            return await _error(401, UNAUTHORIZED, "authentication_error", headers=BEARER)(scope, receive, send)
        limit = self.max_body_bytes
        too_big = f"request body over {limit} bytes (max_body_bytes)"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _error(413, too_big, "request_too_large")(scope, receive, send)
        seen = 0

        async def bounded() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_big)
            return message

        return await self.app(scope, bounded, send)


api.add_middleware(Guard)
bearer = HTTPBearer(auto_error=False, description="TRANSFERLAB_API_TOKEN, when the service sets one")


def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """The same check as `Guard` (which runs first, before the body is read); declared through HTTPBearer
    so the OpenAPI schema names the scheme on every /v1 route."""
    if not token_ok(f"{creds.scheme} {creds.credentials}" if creds else None):
        raise ApiError(401, UNAUTHORIZED, "authentication_error")


AUTH = [Depends(require_token)]


@serve.deployment(name="Ingress", max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, settings: dict[str, Any]):
        self.scorer = scorer
        self.settings = ServeSettings.model_validate(settings)
        self._handles: dict[str, DeploymentHandle] = {}
        self._store_slots = asyncio.Semaphore(self.settings.max_store_queries)
        self.max_batch_size, self.batch_wait_timeout_s = 32, 0.005  # the decorator's; user_config sets both
        Guard.max_body_bytes = self.settings.max_body_bytes
        self._scoring = 0  # /v1/score requests in flight here (the adaptive wait)

    def _scorer_for(self, model: str) -> DeploymentHandle:
        """The scorer handle routed by model (multiplexing); one per model, reused (bounded)."""
        handle = self._handles.get(model)
        if handle is None:
            if len(self._handles) >= 1024:
                self._handles.clear()
            handle = self._handles[model] = self.scorer.options(multiplexed_model_id=model)
        return handle

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config, shared with the scorer: the ingress batches with the same size and wait."""
        apply_batching(self, self._forward, config)

    async def _call(self, response: Any, model: str = "") -> dict[str, Any]:
        """Await a scorer call: its outcome dict, 503 while a replica is down, 504 past the timeout."""
        try:
            out = await asyncio.wait_for(response, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()
            raise ApiError(504, f"no answer within {self.settings.request_timeout_s:g}s (request_timeout_s)",
                           "timeout") from None
        except UNAVAILABLE as e:
            raise ApiError(503, f"scoring replica unavailable, retry shortly: {type(e).__name__}",
                           "service_unavailable") from None
        if out["status"] != 200:
            raise ApiError(out["status"], out["message"], out.get("type", "invalid_request_error"), keep=(model,))
        return out

    @staticmethod
    async def _single(call: Any) -> dict[str, Any]:
        return (await call)[0]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Concurrent /v1/score requests go to the scorer as one call per model: one Ray call per batch instead
        of one per request, which is most of Serve's cost per request on a small model. Several batches are in
        flight at once, so the scorer's own batch queue merges them while it computes."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["model"], []).append(i)
        out: list[dict[str, Any]] = [{}] * len(requests)

        async def send(model: str, idx: list[int]) -> None:
            try:
                got = await self._scorer_for(model).score_many.remote([requests[i] for i in idx])
            except UNAVAILABLE as e:
                got = [{"status": 503, "message": f"scoring replica unavailable, retry shortly: {type(e).__name__}",
                        "type": "service_unavailable"}] * len(idx)
            except Exception as e:  # noqa: BLE001 - a fault of this group's call: its requests fail, not the batch
                rid = uuid.uuid4().hex[:16]
                log.error("request %s: scorer call for %d request(s) failed", rid, len(idx), exc_info=e)
                got = [{"status": 500, "message": f"internal error (request id {rid}; details in the replica log)",
                        "type": "server_error"}] * len(idx)
            for i, o in zip(idx, got, strict=True):
                out[i] = o

        await asyncio.gather(*(send(m, idx) for m, idx in groups.items()))
        return out

    def _check_model(self, model: str) -> None:
        refused = self.settings.refusal(model)
        if refused:
            raise ApiError(404, refused, "not_found_error", keep=(model,))

    def _check_cost(self, body: ScoreRequest) -> None:
        """413 before any model runs: a rendered prompt over `max_prompt_chars`, more than `max_choices`
        choices, or a cost (prompt characters times choices, plus the choices) over `max_request_chars`."""
        s, cost = self.settings, 0
        for i, ex in enumerate(body.examples):
            choices = ex.choices or body.template.answer_choices or []
            if len(choices) > s.max_choices:
                raise ApiError(413, f"body.examples.{i}: {len(choices)} answer choices; at most {s.max_choices} "
                                    "(max_choices)", "request_too_large")
            chars = body.template.prompt_chars(ex.input, choices)
            if chars > s.max_prompt_chars:
                raise ApiError(413, f"body.examples.{i}: the rendered prompt has {chars} characters; at most "
                                    f"{s.max_prompt_chars} (max_prompt_chars)", "request_too_large")
            cost += chars * max(1, len(choices)) + sum(map(len, choices))
        if cost > s.max_request_chars:
            raise ApiError(413, f"the request renders {cost} characters to score; at most {s.max_request_chars} "
                                "(max_request_chars)", "request_too_large")

    @api.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, dependencies=AUTH)
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """Score examples under a prompt template with a model: per example the choices' log-likelihoods,
        probabilities and prediction (the `predictions` columns)."""
        if len(body.examples) > self.settings.max_examples:
            raise ApiError(413, f"{len(body.examples)} examples in one request; at most "
                                f"{self.settings.max_examples} (max_examples)", "request_too_large")
        self._check_model(body.model)
        self._check_cost(body)
        self._scoring += 1
        try:  # adaptive wait: a request alone in flight has nothing to wait for, it goes straight to the scorer
            req = body.model_dump()
            alone = self._scoring == 1
            call = self._scorer_for(body.model).score_many.remote([req]) if alone else self._forward(req)
            out = await self._call(self._single(call) if alone else call, body.model)
        finally:
            self._scoring -= 1
        # the records are the scorer's own (ScoreResult fields); sent as they are, not validated twice
        return JSONResponse({"model": body.model, "template": body.template.name, "results": out["results"]})

    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS, dependencies=AUTH)
    async def completions(self, body: CompletionRequest) -> CompletionResponse:
        """OpenAI legacy completions, the subset scoring needs, validated as vLLM validates it: `echo` +
        `logprobs` returns the prompt tokens' log-probabilities (raw logits, first token None) followed by the
        greedily decoded tokens (`max_tokens` >= 1; 0 is refused, as vLLM refuses it)."""
        model = body.model or self.settings.completion_model
        if not model:
            raise ApiError(422, "body.model: required (no completion_model is configured)")
        prompts = body.prompts()
        if len(prompts) > self.settings.max_prompts:
            raise ApiError(413, f"{len(prompts)} prompts in one request; at most {self.settings.max_prompts} "
                                "(max_prompts)", "request_too_large")
        if body.max_tokens > self.settings.max_new_tokens:
            raise ApiError(422, f"body.max_tokens: at most {self.settings.max_new_tokens} (max_new_tokens)")
        longest = max(map(len, prompts))
        if longest > self.settings.max_prompt_chars:
            raise ApiError(413, f"a prompt of {longest} characters; at most {self.settings.max_prompt_chars} "
                                "(max_prompt_chars)", "request_too_large")
        self._check_model(model)
        if is_endpoint(model):
            raise ApiError(422, f"model {model} is an endpoint itself; /v1/completions serves local causal LMs")
        out = await self._call(self._scorer_for(model).complete.remote({"model": model, "prompts": prompts,
                                                       "max_tokens": body.max_tokens, "echo": body.echo,
                                                       "logprobs": body.logprobs}), model)
        n_p, n_c = out["prompt_tokens"], out["completion_tokens"]
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model,
                                  choices=out["choices"],
                                  usage={"prompt_tokens": n_p, "completion_tokens": n_c, "total_tokens": n_p + n_c})

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=AUTH)
    async def models(self) -> ModelList:
        """The configured models, then every stored run with a checkpoint (as run:<key>)."""
        from serving.store_queries import stored_runs  # lazy: duckdb only on store endpoints

        cards = [ModelCard(id=m) for m in self.settings.models]
        db = self.settings.db
        if db and os.path.isfile(db):
            runs = await self._store(stored_runs, db)
            cards += [ModelCard(source="stored run", **r) for r in runs]
        return ModelList(data=cards)

    @api.post("/v1/rank/sources", response_model=RankResponse, responses=ERRORS, dependencies=AUTH)
    async def rank_sources(self, body: RankRequest) -> RankResponse:
        """Top-k source tasks for a target by a selector (TaskShop, RoE, LLM-similarity, measured transfer:
        `oracle`), computed over the store read-only."""
        from serving.store_queries import rank_sources  # lazy: duckdb only on store endpoints

        if not self.settings.db:
            raise ApiError(503, "no results store configured (args.db or TRANSFERLAB_DB)", "service_unavailable")
        out = await self._store(rank_sources, self.settings.db, body.target, body.selector, body.k, body.setup,
                                body.lam, body.seed)
        return RankResponse(**out)

    @api.post("/v1/rank/models", response_model=RankModelsResponse, responses=ERRORS, dependencies=AUTH)
    async def rank_models(self, body: RankModelsRequest) -> RankModelsResponse:
        """FUTE (paper 004): top-k black boxes (fine-tuned models, model + prompt) for a target by
        cos(MTE, DTE(target)), from the stored task embeddings of one space."""
        from serving.store_queries import rank_models  # lazy: duckdb only on store endpoints

        out = await self._store(rank_models, self._db(), body.target, body.space, body.k, body.data, body.models)
        return RankModelsResponse(**out)

    @api.post("/v1/rank/prompts", response_model=RankPromptsResponse, responses=ERRORS, dependencies=AUTH)
    async def rank_prompts(self, body: RankPromptsRequest) -> RankPromptsResponse:
        """FUTE (paper 004): one model's prompts for a task ranked by cos(MTE(model + prompt), DTE(task)),
        from stored embeddings: no black-box call at query time."""
        from serving.store_queries import rank_prompts  # lazy: duckdb only on store endpoints

        out = await self._store(rank_prompts, self._db(), body.task, body.model, body.space, body.k, body.data)
        return RankPromptsResponse(**out)

    def _db(self) -> str:
        if not self.settings.db:
            raise ApiError(503, "no results store configured (args.db or TRANSFERLAB_DB)", "service_unavailable")
        return str(self.settings.db)

    async def _store(self, fn: Any, *args: Any) -> Any:
        """A read of the store in a worker thread: at most `max_store_queries` at once (a request waits up
        to `store_timeout_s` for a slot, then 503), each cancelled after `store_timeout_s` (504)."""
        from analysis.store.results import StoreError  # lazy: duckdb only on store endpoints
        from serving.store_queries import StoreTimeout  # lazy: duckdb only on store endpoints

        timeout = self.settings.store_timeout_s
        try:
            await asyncio.wait_for(self._store_slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, "the store is busy (max_store_queries); retry shortly", "service_unavailable") from None
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, timeout_s=timeout), timeout + 10)
        except (StoreTimeout, asyncio.TimeoutError):
            raise ApiError(504, f"the store query ran past {timeout:g}s (store_timeout_s)", "timeout") from None
        except AnalysisError as e:  # unknown selector / setup / target, k too large
            raise ApiError(422, str(e)) from None
        except StoreError as e:  # no database, or it cannot be opened
            raise ApiError(503, str(e), "service_unavailable") from None
        finally:
            self._store_slots.release()

    @api.get("/v1/stats", dependencies=AUTH)
    async def stats(self) -> dict[str, Any]:
        """Counters of a scoring replica (requests, Ray calls, batches, forward passes per model, loaded
        models) and the ingress's batching settings."""
        out = await self._call_stats()
        out["ingress"] = {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}
        return out

    async def _call_stats(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.scorer.stats.remote(), 10)
        except (asyncio.TimeoutError, RayActorError) as e:
            raise ApiError(503, f"scoring replica unavailable: {type(e).__name__}", "service_unavailable") from None

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when the ingress and a scoring replica answer (no token needed: for probes, so it tells
        nothing about the host: no paths, versions or replica names)."""
        try:
            await asyncio.wait_for(self.scorer.ping.remote(), 5)
        except Exception:  # noqa: BLE001 - any failure of the probe is "not ready"
            return _error(503, "not ready", "service_unavailable")
        return JSONResponse({"status": "ok"})


def _options(name: str, deployments: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The `deployments:` entry of `name` as `.options()` keywords (what Serve applies from a config file)."""
    for d in deployments or []:
        if d.get("name") == name:
            return {k: v for k, v in d.items() if k != "name"}
    return {}


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The application for `serve run` / `serve deploy` / `serve build` (`import_path: serving.app:build_app`,
    `args`: the fields of `ServeSettings`); Serve applies the config's `deployments:` section itself."""
    return application(args)


def application(args: dict[str, Any] | None = None, deployments: list[dict[str, Any]] | None = None) -> Any:
    """The application with a config's `deployments:` section applied as Serve applies it (`.options()` per
    deployment name): `transferlab serve`, the tests and the benchmark configure replicas, resources,
    autoscaling and batching (`user_config`) the same way as the config file does."""
    settings = ServeSettings.model_validate(args or {}).resolved()
    payload = settings.model_dump()
    logging = {"enable_access_log": settings.access_log}
    scorer = Scorer.options(**{"logging_config": logging, **_options("Scorer", deployments)}).bind(payload)
    return Ingress.options(**{"logging_config": logging, **_options("Ingress", deployments)}).bind(scorer, payload)


#: the application with default settings, for `serve build serving.app:app` (Serve's config generator takes an
#: application, not a builder); its output has the shape of serving/config.yaml
app = build_app()
