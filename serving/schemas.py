"""Request and response models of the HTTP API (they are the OpenAPI schema at /docs).

The score request uses the task registry's template fields (`input` with `{input}`, optional
`answer_choices`), so a template copied from `rayjobs/tasks/registry.yaml` works as is. The completions
models are the subset of OpenAI's legacy `POST /v1/completions` that scoring needs (prompt, max_tokens,
logprobs, echo), so OpenAI clients and `rayjobs.scoring.blackbox.EndpointBox` talk to this app unchanged.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate

#: a stored run's key as `run:<key>` names it: one path segment under the checkpoints folder, never a path
RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _no_surrogates(value: Any, where: str) -> None:
    """A lone surrogate code point (JSON `\\ud800`) cannot be encoded as UTF-8: refused here, not a 500 in a
    tokenizer or in the response encoder."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: holds a lone surrogate code point (not valid Unicode text)") from None
    elif isinstance(value, list):
        for v in value:
            _no_surrogates(v, where)


class _Request(BaseModel):
    """Every request body: text fields must be valid Unicode (no lone surrogates)."""

    @field_validator("*", mode="after")
    @classmethod
    def _text(cls, value: Any, info: Any) -> Any:
        _no_surrogates(value, info.field_name)
        return value


class _Strict(_Request):
    model_config = ConfigDict(extra="forbid")


# -- /v1/score ------------------------------------------------------------------------------------------
class TemplateIn(_Strict):
    name: str = Field(default="request", description="template name (only echoed back)")
    input: str = Field(description="format string over {input}, {options}, {options_list}; must use {input}")
    answer_choices: list[str] | None = Field(default=None, min_length=1,
                                             description="verbalised labels in the task's order")

    @model_validator(mode="after")
    def _valid(self) -> TemplateIn:
        self.template()  # the registry's own checks: {input} present, known fields, a valid format string
        for _, field, spec, conv in string.Formatter().parse(self.input):
            if field is not None and (spec or conv):
                raise ValueError(f"template input: only plain placeholders {{input}}, {{options}}, {{options_list}} "
                                 f"are served; {{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                                 "has a format spec or conversion (write literal braces as {{ }})")
        return self

    def prompt_chars(self, text: str, choices: list[str]) -> int:
        """Length of the prompt this template renders for one example, computed without rendering it (plain
        placeholders only): what bounds a request's cost before any model runs."""
        sizes = {None: 0, "input": len(text), "options": len(", ".join(choices)),
                 "options_list": sum(3 + len(c) for c in choices)}
        return sum(len(lit) + sizes[field] for lit, field, _, _ in string.Formatter().parse(self.input))

    def template(self) -> PromptTemplate:
        return PromptTemplate(name=self.name, input=self.input, answer_choices=self.answer_choices)


class ExampleIn(_Strict):
    input: str = Field(description="the example's text, substituted for {input}")
    choices: list[str] | None = Field(default=None, min_length=1,
                                      description="this example's answer choices (default: the template's)")
    id: str | None = Field(default=None, description="echoed back in the result")

    def example(self, template: TemplateIn, index: int) -> Example:
        """Choices fall back to the template's verbalisers (the label set a choice task scores)."""
        choices = self.choices or template.answer_choices or []
        return Example(text=self.input, choices=tuple(choices), label=-1, uid=self.id or str(index))


class ScoreRequest(_Strict):
    model: str = Field(min_length=1, max_length=512,
                       description="builtin:minilm | sentence:<path> | run:<key> | "
                                   "a local LM folder or hub id | a listed http(s)://.../v1#model")
    template: TemplateIn
    examples: list[ExampleIn] = Field(min_length=1)
    generate: bool = Field(default=False, description="also return greedy generations (pred_text; LMs)")
    perplexity: bool = Field(default=False, description="also return each rendered prompt's perplexity (LMs)")

    @field_validator("model")
    @classmethod
    def _run_key(cls, model: str) -> str:
        if model.startswith("run:") and not RUN_KEY.fullmatch(model[4:]):
            raise ValueError("run:<key> takes a stored run's key (letters, digits, '-', '_'; no path)")
        return model


class ScoreResult(BaseModel):
    id: str
    choices: list[str] | None = None
    logprobs: list[float] | None = Field(default=None, description="summed log-likelihood per choice")
    logprobs_mean: list[float] | None = Field(default=None, description="length-normalised per choice")
    probs: list[float] | None = Field(default=None, description="softmax over the choices of the scores "
                                                                "used to predict")
    prediction: int | None = Field(default=None, description="index into choices")
    pred_text: str | None = None
    pred_value: float | None = None
    prompt_ppl: float | None = None


class ScoreResponse(BaseModel):
    model: str
    template: str
    results: list[ScoreResult]


# -- /v1/models ------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "transferlab"
    source: Literal["config", "stored run"] = "config"
    task: str | None = None
    setup: str | None = None
    score: float | None = Field(default=None, description="the stored run's evaluation score")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /v1/rank/sources ------------------------------------------------------------------------------------
class RankRequest(_Strict):
    target: str = Field(min_length=1)
    selector: str = Field(min_length=1, description="roe | llm | taskshop-roe | taskshop-llm | oracle "
                                                    "(measured transfer) | size | random | fute (DTE cosine "
                                                    "of the only embedding space) | fute-dte@<space> | "
                                                    "fute-mte@<space> | a stored name")
    setup: str | None = Field(default=None, description="transfer setup ADAPTATION:MODEL (TaskShop, oracle)")
    k: int = Field(default=5, ge=1, le=1000)
    lam: float | None = Field(default=None, ge=0, le=1, description="TaskShop's lambda (default 0.7)")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seed of the random selector")


class RankedSource(BaseModel):
    rank: int
    source: str
    score: float


class RankResponse(BaseModel):
    target: str
    selector: str
    stored_as: str
    setup: str | None
    k: int
    n_candidates: int
    sources: list[RankedSource]


# -- /v1/rank/models and /v1/rank/prompts (FUTE, paper 004) ---------------------------------------------------
class RankModelsRequest(_Strict):
    target: str = Field(min_length=1, description="the target task: its DTE is the query")
    space: str | None = Field(default=None, description="embedding space id, id prefix or name (default: the "
                                                        "only stored space)")
    k: int = Field(default=5, ge=1, le=1000)
    data: str | None = Field(default=None, description="which DTE where the target has several ('registry', "
                                                       "'prompted')")
    models: list[str] | None = Field(default=None, min_length=1, description="rank only these black boxes")


class RankedModel(BaseModel):
    rank: int
    name: str
    model: str
    prompt: str | None
    source_task: str | None = Field(description="the task a fine-tuned source model was trained on")
    cosine: float
    run_key: str


class RankModelsResponse(BaseModel):
    space: str
    target: str
    dte: str = Field(description="run key of the target's DTE")
    k: int
    n_candidates: int
    models: list[RankedModel]


class RankPromptsRequest(_Strict):
    task: str = Field(min_length=1, description="the task whose DTE the prompts are compared with")
    model: str = Field(min_length=1, description="the black-box model the prompts were embedded with")
    space: str | None = Field(default=None, description="embedding space id, id prefix or name (default: the "
                                                        "only stored space)")
    k: int = Field(default=5, ge=1, le=1000)
    data: str | None = Field(default=None, description="which DTE where the task has several")


class RankedPrompt(BaseModel):
    rank: int
    prompt: str
    cosine: float
    run_key: str


class RankPromptsResponse(BaseModel):
    space: str
    task: str
    model: str
    dte: str
    k: int
    n_candidates: int
    prompts: list[RankedPrompt]


# -- /v1/completions (OpenAI subset) ---------------------------------------------------------------------
class CompletionRequest(_Request):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)

    model: str | None = None
    prompt: str | list[str]
    # at least 1, as vLLM (SamplingParams: "max_tokens must be at least 1"): prompt log-probabilities come
    # from echo + logprobs + max_tokens 1, the generated token last (see serving.completions)
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    temperature: float | None = Field(default=None, description="0 or unset: greedy (the only decoding)")
    n: int = Field(default=1, ge=1, le=1)
    stream: Literal[False] = False

    @model_validator(mode="after")
    def _greedy(self) -> CompletionRequest:
        if self.temperature not in (None, 0):
            raise ValueError("only greedy decoding is served: temperature must be 0 or unset")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorBody(BaseModel):
    """Every error: OpenAI's shape (`error.message`), plus `detail` as FastAPI clients expect."""

    error: dict[str, Any]
    detail: Any
