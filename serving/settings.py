"""Settings of the Serve application: the `args` of `serving/config.yaml` (or `transferlab serve` flags).

One validated model for every knob of the application itself, so a typo in the config fails at build
time with the field's name instead of as a replica that crashes later. What Serve runs (replicas,
resources, autoscaling, max_ongoing_requests) and the batching knobs (`user_config`) are not settings:
they are the config's `deployments:` section, which Serve applies itself (`serve run`/`serve deploy`,
live for `user_config`) and `serving.app.application(args, deployments)` applies the same way for `transferlab serve`.
Paths are made absolute where the application is built (the `serve run` process, whose working
directory the user chose), because replicas may run elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db: str | None = Field(default=None, description="DuckDB results store answering /v1/rank/sources and "
                                                      "listing stored runs (default: $TRANSFERLAB_DB)")
    results: str | None = Field(default=None, description="results folder holding checkpoints/<run_key> for "
                                                          "run:<key> models (default: the db's folder)")
    models: list[str] = Field(default_factory=lambda: ["builtin:minilm"],
                              description="model references advertised by /v1/models; http(s) endpoints "
                                          "are served only when listed here")
    allow_unlisted_models: bool = Field(default=False, description="load any local folder, hub id or builtin a "
                                        "request names (trusted clients only); off: only `models`, "
                                        "`completion_model` and run:<key> checkpoints of `results`")
    completion_model: str | None = Field(default=None, description="causal LM used by /v1/completions when "
                                                                   "a request names no model")
    max_examples: int = Field(default=256, gt=0, description="examples per /v1/score request (more: 413)")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="request body size (more: 413, before "
                                                                  "the body is read past the limit)")
    max_prompt_chars: int = Field(default=20_000, gt=0, description="characters of one rendered prompt or "
                                                                    "completions prompt (more: 413)")
    max_request_chars: int = Field(default=1_000_000, gt=0, description="a request's cost before any model "
                                   "runs: rendered prompt characters times choices, plus the choices (more: 413)")
    max_choices: int = Field(default=64, gt=0, description="answer choices per example (more: 413)")
    load_timeout_s: float = Field(default=120.0, gt=0, description="a model load slower than this answers 503 "
                                                                   "(the load goes on; other models are not held)")
    store_timeout_s: float = Field(default=30.0, gt=0, description="a store query slower than this is "
                                                                   "cancelled (504)")
    max_store_queries: int = Field(default=4, gt=0, description="store queries at once per ingress replica "
                                                                "(more wait, up to store_timeout_s)")
    max_prompts: int = Field(default=256, gt=0, description="prompts per /v1/completions request (more: 413)")
    max_new_tokens: int = Field(default=64, ge=0, description="largest max_tokens of /v1/completions")
    max_models_per_replica: int = Field(default=4, gt=0, description="models kept per scoring replica (LRU)")
    torch_threads: int | None = Field(default=None, gt=0, description="torch intra-op threads per scoring "
                                                                      "replica (default: Ray's, = the replica's num_cpus)")
    max_length: int = Field(default=512, gt=0, description="token limit of LM prompts")
    choice_cache_size: int = Field(default=4096, ge=0, description="verbalised choices whose embeddings a sentence "
                                   "scorer keeps per loaded model (LRU; 0: none)")
    access_log: bool = Field(default=True, description="Serve's per-request access log lines in the replicas")
    request_timeout_s: float = Field(default=120.0, gt=0, description="a request slower than this gets 504")

    def resolved(self) -> ServeSettings:
        """Absolute paths; the store from $TRANSFERLAB_DB when not given; results next to the store."""
        db = self.db or os.environ.get("TRANSFERLAB_DB")
        db_path = Path(db).expanduser().resolve() if db else None
        results = self.results or (str(db_path.parent) if db_path else None)
        return self.model_copy(update={"db": str(db_path) if db_path else None,
                                       "results": str(Path(results).expanduser().resolve()) if results else None})


    def refusal(self, model: str) -> str | None:
        """Why `model` may not be loaded here (None: it may). Served are the configured `models` and
        `completion_model`, and run:<key> for a well-formed key (its checkpoint under `results`, else 404);
        with `allow_unlisted_models` also any other local folder, hub id or builtin. An http(s) endpoint
        is served only when listed, whatever the flag (the app would call it on the client's behalf)."""
        from serving.schemas import RUN_KEY  # lazy: the task registry stays out of settings

        if model in self.models or model == self.completion_model:
            return None
        if is_endpoint(model):
            return (f"model {model} is not served: an http(s) endpoint must be listed in the application's "
                    "`models`")
        if model.startswith("run:"):
            return None if RUN_KEY.fullmatch(model[4:]) else "run:<key> takes a stored run's key (no path)"
        if self.allow_unlisted_models:
            return None
        return (f"model {model} is not served: not in the application's `models` and not a stored run "
                "(run:<key>; see GET /v1/models); the operator may allow other local models with "
                "allow_unlisted_models")


def is_endpoint(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))
