"""Score several requests in one model call: what the scoring deployment's `@serve.batch` runs.

Requests that share a black box and options (and whose examples all have choices, or all lack them) are
rendered with their own templates, concatenated and scored by one `BlackBox.score_many` call with one
`TaskModel.score` batch, so N concurrent requests cost one forward pass instead of N. The records
are those of `BlackBox.score` on each request alone: rank classification scores every example's own
choices and an encoder head its own label set, so batching changes no number beyond float rounding.
A group whose joint call fails is retried request by request, so one bad request (a template whose
choices do not fit a classifier head) fails alone with its own message.

The joint call is `BlackBox.score_many`, the same path as `BlackBox.score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rayjobs.blackbox import BlackBox, adhoc_task, render
from rayjobs.models.loading import ModelError
from rayjobs.tasks import Example
from rayjobs.templates import PromptTemplate


@dataclass
class ScoreJob:
    box: BlackBox
    template: PromptTemplate
    examples: list[Example]
    generate: bool = False
    perplexity: bool = False


@dataclass
class Failure:
    """A request that could not be scored: the HTTP status and a message naming the problem."""

    status: int
    message: str
    type: str = "invalid_request_error"


def _score_group(box: BlackBox, examples: list[list[Example]], templates: list[PromptTemplate],
                 generate: bool, perplexity: bool) -> list[list[dict[str, Any]]]:
    return box.score_many(list(zip(templates, examples, strict=True)), generate=generate, perplexity=perplexity)


def _failure(e: Exception) -> Failure:
    if isinstance(e, (ValueError, ModelError)):  # a request that does not fit the model
        return Failure(422, str(e))
    return Failure(500, f"scoring failed: {type(e).__name__}: {e}", "server_error")


def score_jobs(jobs: Sequence[ScoreJob]) -> list[list[dict[str, Any]] | Failure]:
    """Predictions records per job (in the job's example order), or its Failure; one model call per
    group of compatible jobs."""
    results: list[list[dict[str, Any]] | Failure | None] = [None] * len(jobs)
    groups: dict[tuple, list[tuple[int, list[Example]]]] = {}
    for i, job in enumerate(jobs):
        try:
            rendered = render(job.template, job.examples)
        except ValueError as e:
            results[i] = Failure(422, str(e))
            continue
        kind = adhoc_task(job.template, rendered).answer_type
        groups.setdefault((id(job.box), kind, job.generate, job.perplexity), []).append((i, job.examples))
    for members in groups.values():
        first = jobs[members[0][0]]
        try:
            scored = _score_group(first.box, [r for _, r in members], [jobs[i].template for i, _ in members],
                                  first.generate, first.perplexity)
            for (i, _), recs in zip(members, scored, strict=True):
                results[i] = recs
        except Exception as e:  # noqa: BLE001 - isolate the request(s) at fault
            if len(members) == 1:
                results[members[0][0]] = _failure(e)
                continue
            for i, examples in members:
                try:
                    results[i] = _score_group(first.box, [examples], [jobs[i].template], first.generate,
                                              first.perplexity)[0]
                except Exception as e1:  # noqa: BLE001
                    results[i] = _failure(e1)
    return results  # type: ignore[return-value]
