"""Hard parameter sharing (paper 003, section 3 and Figure 1): one shared encoder, one head per task.

Every member task has its own label set and its own classification head (RoBERTa's: dense, tanh,
dropout, projection, over the first token's hidden state); all lower layers are shared. A batch holds
examples of one task (`TaskExample.task`; rayjobs/mtl.py's batcher makes such batches), its loss and
scores go through that task's head only, so a step on task A's batch gives head B no gradient and
the optimiser (AdamW skips parameters without a gradient) leaves it as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rayjobs.config import ModelSpec
from rayjobs.models.base import TaskModel, choice_record
from rayjobs.models.loading import ModelError, from_pretrained_or_config, load_tokenizer
from rayjobs.tasks.registry import Example, TaskSpec

HEADS = "heads"


@dataclass(frozen=True)
class TaskExample(Example):
    """An example that knows its task (templates render it with `dataclasses.replace`, which keeps it)."""

    task: str = ""


def tag(examples: list[Example] | tuple[Example, ...], task: str) -> list[TaskExample]:
    return [TaskExample(**{f: getattr(e, f) for f in Example.__dataclass_fields__}, task=task) for e in examples]


class ClassificationHead(nn.Module):
    """RoBERTa's sequence-classification head, one per task."""

    def __init__(self, hidden: int, n_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, n_labels)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(first_token)))
        return self.out_proj(self.dropout(x))


class MultiHeadModule(nn.Module):
    """Shared encoder + `heads[task]`; `forward(..., task=...)` returns that task's logits."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # peft / adapters read the model type from it
        self.heads = nn.ModuleDict(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.heads[task](hidden[:, 0])


class MultiHeadModel(TaskModel):
    """A TaskModel over several classification tasks; `member(task)` is the same model seen as one task
    (its `task` spec drives metrics and predictions rows, untagged examples go to its head)."""

    head_prefixes = (f"{HEADS}.",)

    def __init__(self, spec: ModelSpec, tasks: dict[str, TaskSpec]):
        from transformers import AutoModel  # lazy: transformers loads only when a model is built

        if not tasks:
            raise ModelError("a multi-head model needs at least one task")
        for name, t in tasks.items():
            if t.answer_type != "choice" or not t.choices:
                raise ModelError(f"task {name!r} has no fixed label set (answer type {t.answer_type}); a "
                                 "multi-head model gives each task a classification head over its labels")
            if "." in name or not name:
                raise ModelError(f"task name {name!r} cannot name a head (no dots)")
        self.tasks = dict(tasks)
        self.task = next(iter(self.tasks.values()))
        self.max_length = spec.max_length
        self.tokenizer = load_tokenizer(spec)
        encoder = from_pretrained_or_config(AutoModel, spec, self.tokenizer)
        cfg = encoder.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if hidden is None:
            raise ModelError(f"model {spec.name!r}: no hidden size in its config; a multi-head model needs an encoder")
        dropout = getattr(cfg, "classifier_dropout", None)
        dropout = getattr(cfg, "hidden_dropout_prob", 0.1) if dropout is None else dropout
        heads = {name: ClassificationHead(hidden, len(t.choices or ()), dropout) for name, t in self.tasks.items()}
        self.module = MultiHeadModule(encoder, heads)

    def member(self, task: str) -> MultiHeadModel:
        """This model (same parameters) as a single-task model of `task`."""
        if task not in self.tasks:
            raise ModelError(f"no head for task {task!r} (heads: {sorted(self.tasks)})")
        view = copy.copy(self)
        view.task = self.tasks[task]
        return view

    def _route(self, examples: list[Example]) -> str:
        names = {getattr(e, "task", "") or self.task.name for e in examples}
        if len(names) != 1:
            raise ModelError(f"a multi-head batch must hold one task's examples, got {sorted(names)}")
        name = names.pop()
        if name not in self.tasks:
            raise ModelError(f"no head for task {name!r} (heads: {sorted(self.tasks)})")
        return name

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        task = self._route(examples)
        enc = self.tokenizer([e.text for e in examples], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        return {**enc, "labels": torch.tensor([e.label for e in examples], dtype=torch.long), "task": task,
                "examples": examples}

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "examples")}
        return self.module(**inputs)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self._logits(batch).float(), batch["labels"])

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        """Label log-probabilities from the batch's task head (log-softmax of its logits)."""
        lp = torch.log_softmax(self._logits(batch).float(), -1)
        return [choice_record(e.choices, row, row) for e, row in zip(batch["examples"], lp, strict=True)]
