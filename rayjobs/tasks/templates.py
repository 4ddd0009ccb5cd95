"""Prompt templates: how one task definition renders for every model family (PromptSource-style).

A task's examples come out of the registry as `Example(text, choices, label)`, `text` being the
task's base rendering. A template turns that into a prompt (`input`, a format string over
`{input}`, `{options}` and `{options_list}`) and may verbalise a fixed label set
(`answer_choices`, e.g. snli's `C`/`N` as `Contradiction`/`Neutral`) so text-to-text models read
and score words rather than letters. Encoder heads use the base rendering by default; seq2seq and
causal models use the task's first template; `all` trains on a seeded template per example (T0 /
TaskWeb multi-task style) and evaluates as the mean over every template.

The null template (`null`, or `null:<choice>`) is the null input of PVI (paper 003, Algorithm 1;
Ethayarajh et al., 2022): it replaces the whole input (every segment of a pair: the task's base
rendering holds both) by one fixed text, the same for every example, and keeps the answer side (the
task's choices, or the verbalised `answer_choices` of the template `<choice>` resolves to, `default`
when none is named), so g[null](y) scores the same y as g'[x](y). The fixed text is the empty string
(encoders see [CLS][SEP], T5 encodes EOS alone); a causal LM predicts an answer's first token from the
token before it, so it gets the cue `Answer:` instead, constant and so as uninformative about x.
`null` is a reserved template name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import string
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rayjobs.tasks.example import Example


class TaskSpec(Protocol):
    """What templates read of a task (`rayjobs.tasks.registry.TaskSpec`), named here so that templates do
    not import the registry that imports them."""

    @property
    def name(self) -> str: ...
    @property
    def answer_type(self) -> str: ...
    @property
    def prompts(self) -> Sequence[PromptTemplate]: ...

#: the identity template: the task's base rendering, its own choices
BASE = "input"
FIELDS = {"input", "options", "options_list"}


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    input: str = Field(description="format string over {input}, {options}, {options_list}")
    answer_choices: list[str] | None = Field(default=None, description="verbalised labels, in the task's order")

    @model_validator(mode="after")
    def _fields(self) -> PromptTemplate:
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(self.input) if f is not None}
        except ValueError as e:
            raise ValueError(f"template {self.name!r}: bad format string: {e}") from None
        unknown = used - FIELDS
        if unknown:
            raise ValueError(f"template {self.name!r} uses unknown fields {sorted(unknown)} "
                             f"(known: {sorted(FIELDS)}; write literal braces as {{{{ }}}})")
        if "input" not in used:
            raise ValueError(f"template {self.name!r} must contain {{input}}")
        return self

    def _choices(self, ex: Example) -> tuple[str, ...]:
        if self.answer_choices is None or not ex.choices:
            return ex.choices
        if len(self.answer_choices) != len(ex.choices):
            raise ValueError(f"template {self.name!r}: {len(self.answer_choices)} answer_choices for "
                             f"{len(ex.choices)} labels")
        return tuple(self.answer_choices)

    def render(self, ex: Example) -> Example:
        choices = self._choices(ex)
        text = self.input.format(input=ex.text, options=", ".join(choices),
                                 options_list="".join(f"\n- {c}" for c in choices))
        return dataclasses.replace(ex, text=text, choices=choices)


IDENTITY = PromptTemplate(name=BASE, input="{input}")

#: the null-input template's name (reserved) and the fixed text it renders every input to, per family
NULL = "null"
NULL_TEXT = {"encoder": "", "seq2seq": "", "causal": "Answer:"}


class NullTemplate(PromptTemplate):
    """The null input of PVI: every example renders to the same fixed `input` text (no fields), the
    answer side kept (see the module docstring)."""

    name: str = NULL
    input: str = Field(default="", description="the fixed text every input becomes (literal, no fields)")

    @model_validator(mode="after")
    def _fields(self) -> NullTemplate:  # replaces PromptTemplate's check: the text must hold no field
        if "{" in self.input or "}" in self.input:
            raise ValueError(f"null template {self.name!r}: the null input is literal text, got {self.input!r}")
        return self

    def render(self, ex: Example) -> Example:
        return dataclasses.replace(ex, text=self.input, choices=self._choices(ex))


def null_template(base: PromptTemplate, family: str) -> NullTemplate:
    """The null input for a model trained on `base`: its verbalised answers, the family's fixed text."""
    return NullTemplate(input=NULL_TEXT[family], answer_choices=base.answer_choices)


def coerce_templates(raw: Any) -> Any:
    """Registry YAML may list plain strings; they become templates named t0, t1, ..."""
    if not isinstance(raw, list):
        return raw
    return [{"name": f"t{i}", "input": t} if isinstance(t, str) else t for i, t in enumerate(raw)]


def default_templates(spec: TaskSpec) -> list[PromptTemplate]:
    """Templates of a task that declares none: its options spelled out, then an answer cue."""
    if spec.answer_type == "choice":
        return [PromptTemplate(name="options", input="{input}\nOptions:{options_list}\nAnswer:"),
                PromptTemplate(name="answer", input="{input}\nAnswer:")]
    return [PromptTemplate(name="answer", input="{input}\nAnswer:")]


def task_templates(spec: TaskSpec) -> list[PromptTemplate]:
    return list(spec.prompts) or default_templates(spec)


def resolve(spec: TaskSpec, choice: str, family: str) -> list[PromptTemplate]:
    """The templates a prompt choice (`default`, `all`, `input`, a template name, or `null[:<choice>]`)
    means for a task."""
    if choice == NULL or choice.startswith(NULL + ":"):
        return [_resolve_null(spec, choice.partition(":")[2] or "default", family)]
    if choice == "default":
        choice = BASE if family == "encoder" else "first"
    if choice == BASE:
        return [IDENTITY]
    templates = task_templates(spec)
    if choice == "first":
        return templates[:1]
    if choice == "all":
        return templates
    named = [t for t in templates if t.name == choice]
    if not named:
        raise ValueError(f"task {spec.name!r} has no prompt template {choice!r} "
                         f"(has: {[t.name for t in templates]}; or use default, all, input, first)")
    return named


def _resolve_null(spec: TaskSpec, base_choice: str, family: str) -> NullTemplate:
    bases = resolve(spec, base_choice, family)
    answers = {tuple(t.answer_choices or ()) for t in bases}
    if len(answers) > 1:
        raise ValueError(f"task {spec.name!r}: `null:{base_choice}` names {len(bases)} templates with different "
                         f"answer_choices; name one template (null:<name>) so the null model scores one answer set")
    return null_template(bases[0], family)


def identity(templates: Sequence[PromptTemplate]) -> str:
    """Short digest of the templates' content, part of run keys (editing a template retrains)."""
    blob = json.dumps([t.model_dump() for t in templates], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def render_train(examples: Sequence[Example], templates: Sequence[PromptTemplate], seed: int) -> list[Example]:
    """One template per example; with several, drawn with `seed` (a fixed, reproducible mixture)."""
    if len(templates) == 1:
        return [templates[0].render(e) for e in examples]
    rng = random.Random(seed)
    return [templates[rng.randrange(len(templates))].render(e) for e in examples]
