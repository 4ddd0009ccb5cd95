"""One task example as every layer sees it: what the registry reads, templates render and models score."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """`label` indexes `choices`; free-text tasks carry `answer` (label -1), regression `value`.

    `uid` identifies the example within its task (the record's `id`, else its file line or dataset
    row), so per-example outputs of different runs, models and prompts join on it."""

    text: str
    choices: tuple[str, ...]
    label: int
    answer: str | None = None
    value: float | None = None
    uid: str = ""

    @property
    def target_text(self) -> str:
        if self.answer is not None:
            return self.answer
        if self.value is not None:
            return f"{self.value:.1f}"
        return self.choices[self.label]
