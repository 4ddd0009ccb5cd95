"""Encoder models (BERT/RoBERTa/MiniLM style) with a sequence-classification or multiple-choice head.

Classification tasks (a fixed label set) get a `num_labels` head; tasks whose choices vary per
example get a multiple-choice head that scores each (input, choice) pair. Regression tasks (STS-B)
use a one-output head with MSE loss.
"""

from __future__ import annotations

from typing import Any

import torch

from rayjobs.config import ModelSpec
from rayjobs.models.base import TaskModel, choice_record
from rayjobs.models.loading import ModelError, from_pretrained_or_config, load_tokenizer
from rayjobs.tasks.registry import Example, TaskSpec


def _head_prefixes(module: torch.nn.Module) -> tuple[str, ...]:
    base = getattr(module, "base_model_prefix", "")
    tops = {n.split(".")[0] for n, _ in module.named_parameters()}
    return tuple(sorted(f"{t}." for t in tops if t != base))


class EncoderClassifier(TaskModel):
    def __init__(self, spec: ModelSpec, task: TaskSpec):
        from transformers import (  # lazy: transformers loads only when a model is built
            AutoModelForSequenceClassification,  # lazy: transformers loads only when a model is built
        )

        if task.answer_type == "text":
            raise ModelError(f"task {task.name!r} has free-text answers; an encoder head cannot generate them "
                             "(use a seq2seq or causal model)")
        self.task = task
        self.max_length = spec.max_length
        self.tokenizer = load_tokenizer(spec)
        n = 1 if task.regression else len(task.choices or [])
        kwargs: dict[str, Any] = {"num_labels": n}
        if task.regression:
            kwargs["problem_type"] = "regression"
        self.module = from_pretrained_or_config(AutoModelForSequenceClassification, spec, self.tokenizer, **kwargs)
        self.head_prefixes = _head_prefixes(self.module)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        enc = self.tokenizer([e.text for e in examples], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        if self.task.regression:
            enc["labels"] = torch.tensor([e.value for e in examples], dtype=torch.float)
        else:
            enc["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return {**enc, "examples": examples}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.module(**{k: v for k, v in batch.items() if k != "examples"}).loss

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        """Label log-probabilities = log-softmax of the head's logits (summed = mean: one 'token')."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "examples")}
        logits = self.module(**inputs).logits.float()
        if self.task.regression:
            return [{"pred_value": float(v)} for v in logits.squeeze(-1).tolist()]
        lp = torch.log_softmax(logits, -1)
        return [choice_record(e.choices, row, row) for e, row in zip(batch["examples"], lp, strict=True)]


class EncoderMultipleChoice(TaskModel):
    def __init__(self, spec: ModelSpec, task: TaskSpec):
        from transformers import (  # lazy: transformers loads only when a model is built
            AutoModelForMultipleChoice,  # lazy: transformers loads only when a model is built
        )

        if task.answer_type != "choice":
            raise ModelError(f"task {task.name!r} is not a multiple-choice task")
        self.task = task
        self.max_length = spec.max_length
        self.tokenizer = load_tokenizer(spec)
        self.module = from_pretrained_or_config(AutoModelForMultipleChoice, spec, self.tokenizer)
        self.head_prefixes = _head_prefixes(self.module)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        n_choices = max(len(e.choices) for e in examples)
        first, second, valid = [], [], []
        for e in examples:
            for j in range(n_choices):
                first.append(e.text)
                second.append(e.choices[j] if j < len(e.choices) else "")
                valid.append(j < len(e.choices))
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        out = {k: v.view(len(examples), n_choices, -1) for k, v in enc.items()}
        out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        out["choice_mask"] = torch.tensor(valid).view(len(examples), n_choices)
        return {**out, "examples": examples}

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_mask", "examples")}
        logits = self.module(**inputs).logits
        return logits.masked_fill(~batch["choice_mask"], float("-inf"))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self._logits(batch), batch["labels"])

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        """Choice log-probabilities = log-softmax over the (input, choice) pair scores of the example."""
        lp = torch.log_softmax(self._logits(batch).float(), -1)
        return [choice_record(e.choices, row[:len(e.choices)], row[:len(e.choices)])
                for e, row in zip(batch["examples"], lp, strict=True)]
