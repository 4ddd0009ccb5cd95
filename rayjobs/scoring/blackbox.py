"""Black boxes: a model reference + a prompt template + examples -> per-example predictions records.

DESIGN.md: a black box is a model plus a prompt (template + verbalisers, one canonical label order); its
output is the choice distribution from raw model scores at the answer position. Every caller (the bulk
`score` job, the Serve app, FUTE's model task embeddings, PVI, the prompt-selection baselines) scores
through `BlackBox.score`, which goes through `TaskModel.score`, the same path as training-time evaluation.

Model references (`open_black_box`):
  builtin:minilm | sentence:<path or id>   sentence-embedding zero-shot scorer (cosine of prompt and choices)
  run:<run_key>                            a stored run's checkpoint (needs the results folder): an encoder
                                           classifier (label probabilities) or a tuned LM, full or PEFT
  http(s)://host:port/v1[#model]           an OpenAI-compatible completions endpoint that returns prompt
                                           log-probabilities (`echo` + `logprobs`; vLLM, ray.serve.llm, our app)
  <hub id or local folder>                 a causal or seq2seq LM (family from its config), rank classification
"""

from __future__ import annotations

import email.utils
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import Any

from rayjobs.config import AdaptationSpec, ModelSpec, SetupSpec
from rayjobs.models import build_task_model, checkpoint
from rayjobs.models.loading import ModelError, resolve_path
from rayjobs.tasks.registry import Example, LocalSource, TaskSpec
from rayjobs.tasks.templates import PromptTemplate


class UnknownModelError(ModelError):
    """The reference names nothing that exists (unknown run key, missing folder): a 404, not a 503."""


def adhoc_task(template: PromptTemplate, examples: Sequence[Example], name: str = "adhoc") -> TaskSpec:
    """The task a scoring request implies: choices from the template's verbalisers (or per example)."""
    choice = all(e.choices for e in examples) or template.answer_choices is not None
    return TaskSpec(name=name, answer_type="choice" if choice else "text",
                    metric="accuracy" if choice else "exact_match",
                    choices=list(template.answer_choices) if template.answer_choices else None,
                    local=LocalSource(path="-"))


def split_as(flat: Sequence[Any], groups: Sequence[Sized]) -> list[list[Any]]:
    """`flat` cut into consecutive pieces as long as each of `groups` (answers of a joint call, per caller)."""
    out, i = [], 0
    for g in groups:
        out.append(list(flat[i:i + len(g)]))
        i += len(g)
    return out


def render(template: PromptTemplate, examples: Sequence[Example]) -> list[Example]:
    return [template.render(e) for e in examples]


class BlackBox(ABC):
    """One loaded model; thread-safe `score` (one forward at a time per box)."""

    ref: str
    kind: str

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def score(self, template: PromptTemplate, examples: Sequence[Example], *, generate: bool = False,
              perplexity: bool = False, batch_size: int = 32) -> list[dict[str, Any]]:
        """Predictions records (choices, logprobs, logprobs_mean, probs, prediction, pred_text, prompt_ppl)."""
        return self.score_many([(template, examples)], generate=generate, perplexity=perplexity,
                               batch_size=batch_size)[0]

    def score_many(self, requests: Sequence[tuple[PromptTemplate, Sequence[Example]]], *, generate: bool = False,
                   perplexity: bool = False, batch_size: int | None = None) -> list[list[dict[str, Any]]]:
        """Several (template, examples) requests in one model call (what a serving batch needs); the records
        equal each request scored alone: every example is scored against its own rendered choices. All
        requests must be of one answer type (all with choices, or all free text)."""
        rendered = [render(t, exs) for t, exs in requests]
        flat = [e for r in rendered for e in r]
        task = adhoc_task(requests[0][0], flat)
        with self._lock:
            records = self._score(flat, task, generate, perplexity, batch_size or max(1, len(flat)))
        return split_as(records, rendered)

    @abstractmethod
    def _score(self, examples: list[Example], task: TaskSpec, generate: bool, perplexity: bool,
               batch_size: int) -> list[dict[str, Any]]: ...

    def to(self, device: str) -> BlackBox:
        """Place the model on `device` (a GPU trial's); a remote endpoint stays where it is."""
        return self

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind}


class TaskModelBox(BlackBox):
    """Any TaskModel (LM, stored encoder classifier, sentence scorer) behind the black-box interface."""

    def __init__(self, ref: str, kind: str, tm: Any, fixed_labels: list[str] | None = None):
        super().__init__()
        self.ref, self.kind, self.tm = ref, kind, tm
        self.fixed_labels = fixed_labels  # a classifier head answers only its own label set
        self.device = "cpu"

    def to(self, device: str) -> BlackBox:
        self.tm.module.to(device)
        self.device = device
        return self

    def _score(self, examples: list[Example], task: TaskSpec, generate: bool, perplexity: bool,
               batch_size: int) -> list[dict[str, Any]]:
        from rayjobs.train.loop import score_examples  # lazy: torch stays out of CLI start-up

        if self.fixed_labels is not None:
            bad = [e for e in examples if len(e.choices) != len(self.fixed_labels)]
            if bad:
                raise ValueError(f"model {self.ref} classifies into {len(self.fixed_labels)} labels "
                                 f"{self.fixed_labels}; the template gives {len(bad[0].choices)} answer choices")
            task = self.tm.task  # the head's own task (its label order is canonical)
        own = self.tm.task
        self.tm.task = task
        try:
            records = score_examples(self.tm, examples, batch_size, self.device, generate=generate)
        finally:
            self.tm.task = own
        if perplexity:
            ppl = self.tm.prompt_perplexity([e.text for e in examples])
            for r, p in zip(records, ppl, strict=True):
                r["prompt_ppl"] = p
        return records


class EndpointBox(BlackBox):
    """An OpenAI-compatible `/v1/completions` endpoint scored through prompt log-probabilities.

    A choice's log-likelihood is the sum of `token_logprobs` of the tokens the server echoes after the
    prompt, temperature 0: raw scores, no sampling settings. What is sent is what vLLM and `ray.serve.llm`
    (vLLM underneath) accept:
      - `max_tokens: 1`, never 0: vLLM's SamplingParams rejects `max_tokens < 1` ("max_tokens must be at
        least 1", vllm-project/vllm#9336, still open), so prompt log-probabilities come from `echo: true`
        + `logprobs` + `max_tokens: 1`, the combination vLLM's maintainers point to (vllm#6508);
      - `logprobs: 1`, not 0 (the form vllm#6508 confirms; 0 is falsy in some servers' echo checks);
      - the echoed answer then ends with the one generated token, at `text_offset == len(prompt)` (vLLM
        0.16's wire format, shown in ggml-org/llama.cpp#15189): only tokens that start inside the sent
        text count, so the generated token never enters a score or a perplexity.
    Connections are reused (one `requests.Session` per box). A 503 (vLLM's overload answer, vllm#22805;
    Ray Serve's backpressure default, `BackpressureConfig`) or a 429 is retried at most `max_retries`
    times, waiting the server's `Retry-After` seconds (capped at `max_wait`) or, without one, 0.5 s
    doubling.
    """

    kind = "endpoint"
    RETRY_STATUS = (429, 503)

    def __init__(self, ref: str, timeout: float = 60.0, api_key: str | None = None, max_retries: int = 5,
                 max_wait: float = 30.0):
        super().__init__()
        self.ref = ref
        base, _, model = ref.partition("#")
        self.base = base.rstrip("/")
        self.model = model or None
        self.timeout = timeout
        self.api_key = api_key
        self.max_retries = max_retries
        self.max_wait = max_wait
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:  # a session and a lock do not travel to another process
        state = dict(self.__dict__)
        state["_session"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        import requests  # lazy: requests only for a remote call

        if self._session is None:
            self._session = requests.Session()
            if self.api_key:
                self._session.headers["Authorization"] = f"Bearer {self.api_key}"
        return self._session

    def _wait(self, response: Any, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0-based): Retry-After (seconds or an HTTP date), capped."""

        header = response.headers.get("Retry-After")
        wait = 0.5 * 2 ** attempt
        if header:
            try:
                wait = float(header)
            except ValueError:
                try:
                    wait = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
                except (TypeError, ValueError):
                    pass  # an unreadable header: the backoff
        return min(max(wait, 0.0), self.max_wait)

    def _post(self, prompts: list[str], max_tokens: int = 1, echo: bool = True) -> list[dict[str, Any]]:
        import requests  # lazy: requests only for a remote call

        body: dict[str, Any] = {"prompt": prompts, "max_tokens": max(1, max_tokens), "echo": echo,
                                "temperature": 0.0}
        if echo:
            body["logprobs"] = 1
        if self.model:
            body["model"] = self.model
        for attempt in range(self.max_retries + 1):
            try:
                r = self.session.post(f"{self.base}/completions", json=body, timeout=self.timeout)
            except requests.RequestException as e:
                raise ModelError(f"endpoint {self.base} unreachable: {e}") from None
            if r.status_code not in self.RETRY_STATUS or attempt == self.max_retries:
                break
            time.sleep(self._wait(r, attempt))
        if r.status_code in self.RETRY_STATUS:
            raise ModelError(f"endpoint {self.base} still answered {r.status_code} after {self.max_retries} "
                             f"retries: {r.text[:300]}")
        if r.status_code != 200:
            raise ModelError(f"endpoint {self.base} answered {r.status_code}: {r.text[:300]}")
        choices = sorted(r.json()["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ModelError(f"endpoint {self.base} answered {len(choices)} choices for {len(prompts)} prompts")
        return choices

    @staticmethod
    def _prompt_part(choice: dict[str, Any], text: str, start: int = 0) -> list[float]:
        """Log-probabilities of the echoed tokens that start in text[start:] (the generated token, at
        offset len(text), is dropped; so is the first token's None)."""
        lp = choice.get("logprobs") or {}
        offsets, values = lp.get("text_offset") or [], lp.get("token_logprobs") or []
        return [float(v) for o, v in zip(offsets, values, strict=False) if start <= o < len(text) and v is not None]

    def _continuation_logprobs(self, prompts: list[str], full: list[str]) -> list[tuple[float, float]]:
        out = []
        for p, text, ch in zip(prompts, full, self._post(full), strict=True):
            picked = self._prompt_part(ch, text, len(p))
            if not picked:
                raise ModelError(f"endpoint {self.base} returned no prompt log-probabilities (needs echo + logprobs)")
            out.append((float(sum(picked)), float(sum(picked) / len(picked))))
        return out

    def _score(self, examples: list[Example], task: TaskSpec, generate: bool, perplexity: bool,
               batch_size: int) -> list[dict[str, Any]]:
        import torch  # lazy: torch stays out of CLI start-up

        from rayjobs.models.base import choice_record  # lazy: torch stays out of CLI start-up

        records: list[dict[str, Any]] = [{} for _ in examples]
        if task.answer_type == "choice":
            prompts = [e.text for e in examples for _ in e.choices]
            full = [e.text + " " + c for e in examples for c in e.choices]
            scored = []
            for i in range(0, len(full), batch_size):
                scored += self._continuation_logprobs(prompts[i:i + batch_size], full[i:i + batch_size])
            j = 0
            for k, e in enumerate(examples):
                part = scored[j:j + len(e.choices)]
                j += len(e.choices)
                records[k] = choice_record(e.choices, torch.tensor([s for s, _ in part], dtype=torch.float64),
                                           torch.tensor([m for _, m in part], dtype=torch.float64))
        if generate or task.answer_type != "choice":
            for k, ch in enumerate(self._post([e.text for e in examples], max_tokens=32, echo=False)):
                records[k]["pred_text"] = str(ch.get("text", "")).split("\n")[0].strip()
        if perplexity:
            for k, (e, ch) in enumerate(zip(examples, self._post([e.text for e in examples]), strict=True)):
                vals = self._prompt_part(ch, e.text)
                records[k]["prompt_ppl"] = math.exp(-sum(vals) / len(vals)) if vals else None
        return records


def _family_of(path: str) -> str:
    """seq2seq, causal or encoder, from a model's HF config."""
    from transformers import AutoConfig  # lazy: transformers loads only when a model is built

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config of {path}: {e}") from None
    if getattr(cfg, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or cfg.model_type in ("gpt2", "llama", "mistral"):
        return "causal"
    return "encoder"


def _stored_run(key: str, results: str | Path | None) -> BlackBox:
    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

    if results is None:
        raise ModelError(f"model run:{key} names a stored run, but no results folder was given")
    folder = ResultStore(results).checkpoint_dir(key)
    if not (folder / checkpoint.WEIGHTS).is_file():
        raise UnknownModelError(f"no stored checkpoint for run {key} under {ResultStore(results).checkpoints_dir}")
    meta = checkpoint.read_meta(folder)
    if "setup_spec" not in meta or "task_spec" not in meta:
        raise ModelError(f"checkpoint of run {key} predates self-describing checkpoints (no setup/task spec)")
    setup = SetupSpec.model_validate(meta["setup_spec"])
    task = TaskSpec.model_validate(meta["task_spec"])
    tm = build_task_model(setup.model, setup.adaptation, task)
    tm.load(folder, skip_head=False)
    tm.module.eval()
    labels = list(task.choices or []) if setup.model.family == "encoder" and task.choices else None
    return TaskModelBox(f"run:{key}", f"run:{setup.model.family}", tm, fixed_labels=labels)


def open_black_box(ref: str, results: str | Path | None = None, temperature: float | None = None,
                   max_length: int = 512, api_key: str | None = None) -> BlackBox:
    """Load the model a reference names (see the module docstring)."""
    from rayjobs.models.sentence_zero_shot import (  # lazy: torch stays out of CLI start-up
        DEFAULT_TEMPERATURE,
        SentenceZeroShot,
    )

    placeholder = TaskSpec(name="adhoc", choices=["a", "b"], local=LocalSource(path="-"))
    if ref.startswith(("http://", "https://")):
        return EndpointBox(ref, api_key=api_key)
    if ref.startswith("run:"):
        return _stored_run(ref[4:], results)
    if ref == "builtin:minilm" or ref.startswith("sentence:"):
        path = "builtin:minilm" if ref == "builtin:minilm" else ref[len("sentence:"):]
        tm = SentenceZeroShot(path, placeholder, temperature or DEFAULT_TEMPERATURE)
        return TaskModelBox(ref, "sentence", tm)
    if ref.startswith("builtin:"):
        resolve_path(ref)  # names the unknown builtin
    looks_local = ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()
    if looks_local and not Path(ref).expanduser().is_dir():
        raise UnknownModelError(f"model folder {ref} does not exist")
    path = resolve_path(ref)
    family = _family_of(path)
    if family == "encoder":  # a pretrained encoder without a task head: use it as a sentence embedder
        return TaskModelBox(ref, "sentence", SentenceZeroShot(path, placeholder, temperature or DEFAULT_TEMPERATURE))
    tm = build_task_model(ModelSpec(name=Path(ref).name or ref, path=ref, family=family, max_length=max_length),
                          AdaptationSpec(), placeholder)
    tm.module.eval()
    return TaskModelBox(ref, family, tm)
