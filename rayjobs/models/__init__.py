"""Model factory: (model spec, adaptation, task) -> a TaskModel ready for the one training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rayjobs.config import AdaptationSpec, ModelSpec
from rayjobs.models.loading import ModelError
from rayjobs.tasks.registry import TaskSpec

if TYPE_CHECKING:
    from rayjobs.models.base import TaskModel

__all__ = ["ModelError", "TaskModel", "build_task_model", "encoder_head"]


def __getattr__(name: str) -> Any:
    """`TaskModel` resolves on first use, so importing the package (for `ModelError`) leaves torch unloaded."""
    if name == "TaskModel":
        from rayjobs.models.base import TaskModel  # lazy: torch stays out of CLI start-up

        return TaskModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def encoder_head(spec: ModelSpec, task: TaskSpec) -> str:
    """A fixed label set gets a classification head, per-example choices a multiple-choice head."""
    if spec.head != "auto":
        return spec.head
    return "classification" if (task.choices or task.answer_type != "choice") else "multiple_choice"


def build_task_model(spec: ModelSpec, adaptation: AdaptationSpec, task: TaskSpec) -> TaskModel:
    if spec.family == "encoder":
        from rayjobs.models.encoder import (  # lazy: torch stays out of CLI start-up
            EncoderClassifier,
            EncoderMultipleChoice,
        )

        multiple_choice = encoder_head(spec, task) == "multiple_choice"
        tm: TaskModel = EncoderMultipleChoice(spec, task) if multiple_choice else EncoderClassifier(spec, task)
    elif spec.family == "seq2seq":
        from rayjobs.models.text_to_text import Seq2SeqModel  # lazy: torch stays out of CLI start-up

        tm = Seq2SeqModel(spec, task)
    elif spec.family == "causal":
        from rayjobs.models.text_to_text import CausalModel  # lazy: torch stays out of CLI start-up

        tm = CausalModel(spec, task)
    else:  # pragma: no cover - the config validates the family
        raise ModelError(f"unknown model family {spec.family!r}")
    from rayjobs.models.adaptation import apply_adaptation  # lazy: torch stays out of CLI start-up

    return apply_adaptation(tm, adaptation, spec.family)
