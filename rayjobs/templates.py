"""Prompt templates: how one task definition renders for every model family (PromptSource-style).

A task's examples come out of the registry as `Example(text, choices, label)`, `text` being the
task's base rendering. A template turns that into a prompt (`input`, a format string over
`{input}`, `{options}` and `{options_list}`) and may verbalise a fixed label set
(`answer_choices`, e.g. snli's `C`/`N` as `Contradiction`/`Neutral`) so text-to-text models read
and score words rather than letters. Encoder heads use the base rendering by default; seq2seq and
causal models use the task's first template; `all` trains on a seeded template per example (T0 /
TaskWeb multi-task style) and evaluates as the mean over every template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from rayjobs.tasks import Example, TaskSpec

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

    def render(self, ex: Example) -> Example:
        choices = ex.choices
        if self.answer_choices is not None and ex.choices:
            if len(self.answer_choices) != len(ex.choices):
                raise ValueError(f"template {self.name!r}: {len(self.answer_choices)} answer_choices for "
                                 f"{len(ex.choices)} labels")
            choices = tuple(self.answer_choices)
        text = self.input.format(input=ex.text, options=", ".join(choices),
                                 options_list="".join(f"\n- {c}" for c in choices))
        return dataclasses.replace(ex, text=text, choices=choices)


IDENTITY = PromptTemplate(name=BASE, input="{input}")


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
    """The templates a prompt choice (`default`, `all`, `input` or a template name) means for a task."""
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
