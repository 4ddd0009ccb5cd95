"""A sentence-embedding zero-shot black box: the prompt-filled input and each verbalised choice are
embedded (MiniLM by default, mean pooling, L2-normalised) and the choices are scored by cosine similarity.

Why it exists: it is the one pretrained, prompt-sensitive scorer available offline on a CPU, so prompt
selection and FUTE's model task embeddings can be exercised without an LLM. Its "log-likelihood" of a
choice is log-softmax(cos / temperature) over the choices (summed = mean: one unit per choice), a
calibrated stand-in for an LM's choice distribution; `temperature` (default 0.05) is part of its identity.
It has no trainable head and is not trained by the jobs.
"""

from __future__ import annotations

from typing import Any

import torch

from rayjobs.models.base import TaskModel, choice_record
from rayjobs.models.loading import ModelError, resolve_path
from rayjobs.tasks.registry import Example, TaskSpec

DEFAULT_TEMPERATURE = 0.05


class SentenceZeroShot(TaskModel):
    def __init__(self, path: str, task: TaskSpec, temperature: float = DEFAULT_TEMPERATURE, max_length: int = 256):
        from sentence_transformers import SentenceTransformer

        if temperature <= 0:
            raise ModelError(f"sentence zero-shot temperature must be positive, got {temperature}")
        self.task = task
        self.temperature = temperature
        try:
            self.encoder = SentenceTransformer(resolve_path(path), device="cpu")
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load sentence-embedding model {path}: {e}") from None
        self.encoder.max_seq_length = max_length
        self.module = self.encoder

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return {"examples": examples}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        raise ModelError("the sentence-embedding zero-shot scorer is a fixed black box; it is not trained")

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_tensor=True,
                                   show_progress_bar=False).float().cpu()

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        examples: list[Example] = batch["examples"]
        if any(not e.choices for e in examples):
            raise ModelError("the sentence-embedding zero-shot scorer needs answer choices for every example")
        inputs = self._embed([e.text for e in examples])
        choices = sorted({c for e in examples for c in e.choices})
        cemb = dict(zip(choices, self._embed(choices), strict=True))
        out = []
        for e, x in zip(examples, inputs, strict=True):
            cos = torch.stack([cemb[c] for c in e.choices]) @ x
            lp = torch.log_softmax(cos.double() / self.temperature, -1)
            out.append(choice_record(e.choices, lp, lp))
        return out
