"""Score several requests in one model call: what the scoring deployment's `@serve.batch` runs.

Requests that share a black box and options (and whose examples all have choices, or all lack them) are
rendered with their own templates, concatenated and scored by one `BlackBox.score_many` call with one
`TaskModel.score` batch, so N concurrent requests cost one forward pass instead of N. The records
are those of `BlackBox.score` on each request alone: rank classification scores every example's own
choices and an encoder head its own label set, so batching changes no number beyond float rounding.
A group whose joint call fails is retried request by request, so one bad request (a template whose
choices do not fit a classifier head) fails alone with its own message. Rendering is the request's own
input, so anything it raises (not only `ValueError`) is that request's 4xx, never the batch's fault.

The joint call is `BlackBox.score_many`, the same path as `BlackBox.score`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rayjobs.models.loading import ModelError
from rayjobs.scoring.blackbox import BlackBox, adhoc_task, render
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate

log = logging.getLogger("ray.serve")


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


def internal_error(e: BaseException, where: str) -> Failure:
    """A server-side fault: the traceback goes to the replica log under a request id, the caller gets the id."""
    rid = uuid.uuid4().hex[:16]
    log.error("request %s: %s failed", rid, where, exc_info=(type(e), e, e.__traceback__))
    return Failure(500, f"internal error (request id {rid}; details in the replica log)", "server_error")


def request_failure(e: BaseException) -> Failure:
    """What a request's own input raised (rendering, building its examples): its 4xx, whatever the type."""
    if isinstance(e, (MemoryError, OverflowError, RecursionError)):
        return Failure(413, f"the request is too large to render: {type(e).__name__}", "request_too_large")
    return Failure(422, str(e) if isinstance(e, ValueError) else f"the request cannot be rendered: "
                                                                 f"{type(e).__name__}")


def _failure(e: Exception) -> Failure:
    if isinstance(e, (ValueError, ModelError)):  # a request that does not fit the model
        return Failure(422, str(e))
    return internal_error(e, "scoring")


def score_jobs(jobs: Sequence[ScoreJob]) -> list[list[dict[str, Any]] | Failure]:
    """Predictions records per job (in the job's example order), or its Failure; one model call per
    group of compatible jobs."""
    results: list[list[dict[str, Any]] | Failure | None] = [None] * len(jobs)
    groups: dict[tuple, list[tuple[int, list[Example]]]] = {}
    for i, job in enumerate(jobs):
        try:
            kind = adhoc_task(job.template, render(job.template, job.examples)).answer_type
        except Exception as e:  # noqa: BLE001 - the request's own input: it fails alone
            results[i] = request_failure(e)
            continue
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
