"""What the training loop and every scorer need from a model, whatever its family.

A `TaskModel` wraps an `nn.Module` with the task-specific pieces: how a batch of `Example`s is
tensorised, the training loss, and `score`: the one scoring interface. `score` returns per example
the log-likelihood of every answer choice (summed and length-normalised), the choice probabilities
(softmax over the choices of the scores used to predict), the prediction, and for free-text /
regression answers the generated text or value. Training-time evaluation, bulk scoring jobs and the
Serve app all go through it, so a served prediction equals the stored one. Scores are raw model
scores from one forward pass: no generation settings (repetition penalty, sampling) touch them.

Checkpoints hold only the parameters that were trained (all of them for full fine-tuning, biases for
BitFit, the added modules for PEFT methods), so the same save/load serves every adaptation method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayjobs.models import checkpoint
from rayjobs.tasks.registry import Example

CKPT_WEIGHTS = checkpoint.WEIGHTS
CKPT_META = checkpoint.META


def choice_record(choices: tuple[str, ...], summed: torch.Tensor, mean: torch.Tensor, use_mean: bool = False
                  ) -> dict[str, Any]:
    """One example's scored choices (1-D tensors over its valid choices) as a predictions record."""
    used = (mean if use_mean else summed).double()
    probs = torch.softmax(used, -1)
    return {"choices": list(choices), "logprobs": summed.double().tolist(), "logprobs_mean": mean.double().tolist(),
            "probs": probs.tolist(), "prediction": int(used.argmax())}


class TaskModel(ABC):
    module: nn.Module
    #: parameter-name prefixes of the task head; re-initialised per task, never transferred
    head_prefixes: tuple[str, ...] = ()
    task: Any

    @abstractmethod
    def collate(self, examples: list[Example]) -> dict[str, Any]: ...

    @abstractmethod
    def loss(self, batch: dict[str, Any]) -> torch.Tensor: ...

    @abstractmethod
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        """Per example a predictions record: choices, logprobs, logprobs_mean, probs, prediction (choice
        tasks); pred_text (free text) or pred_value (regression)."""

    def prompt_perplexity(self, texts: list[str]) -> list[float | None]:
        """Perplexity of each rendered prompt under the model (SPELL); None where the family has no LM."""
        return [None] * len(texts)

    def predict(self, batch: dict[str, Any]) -> list[Any]:
        """Predictions comparable with `gold()`: choice indices, answer strings or floats."""
        return [answer(r) for r in self.score(batch)]

    @staticmethod
    def gold(examples: list[Example]) -> list[Any]:
        ex = examples[0] if examples else None
        if ex is not None and ex.answer is not None:
            return [e.answer for e in examples]
        if ex is not None and ex.value is not None:
            return [e.value for e in examples]
        return [e.label for e in examples]

    # -- parameters and checkpoints ---------------------------------------------------------------
    def param_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.module.parameters())
        return trainable, total

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if p.requires_grad}

    def is_head(self, name: str) -> bool:
        return any(name.startswith(p) or f".{p}" in name for p in self.head_prefixes)

    def save(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        return checkpoint.save(folder, self.trainable_state(), meta)

    def load(self, folder: str | Path, skip_head: bool = True) -> int:
        """Load trained parameters from a source checkpoint; the target's task head stays fresh."""
        return checkpoint.load_into(self.module, folder, skip=self.is_head if skip_head else (lambda _: False))


def answer(record: dict[str, Any]) -> Any:
    """The answer of a predictions record in the form the task metric compares with the gold."""
    if record.get("prediction") is not None:
        return record["prediction"]
    if record.get("pred_value") is not None:
        return record["pred_value"]
    return record.get("pred_text")
