"""A sentence-embedding zero-shot black box: the prompt-filled input and each verbalised choice are
embedded (MiniLM by default, mean pooling, L2-normalised) and the choices are scored by cosine similarity.

Why it exists: it is the one pretrained, prompt-sensitive scorer available offline on a CPU, so prompt
selection and FUTE's model task embeddings can be exercised without an LLM. Its "log-likelihood" of a
choice is log-softmax(cos / temperature) over the choices (summed = mean: one unit per choice), a
calibrated stand-in for an LM's choice distribution; `temperature` (default 0.05) is part of its identity.
It has no trainable head and is not trained by the jobs.

The verbalised choices are the same for every request of a template (a served model sees the same few
again and again), so their embeddings are kept per instance in a bounded LRU (`ChoiceCache`, at most
`choice_cache_size` texts, default 4096, ~1.5 kB each for MiniLM): a batch encodes only its inputs and the
choices not seen lately. Cached and fresh embeddings come from the same `encode` path of the same
(fixed) encoder, so the scores are those of embedding every choice anew, up to float rounding of padding.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from rayjobs.models.base import TaskModel, choice_record
from rayjobs.models.loading import ModelError, resolve_path
from rayjobs.tasks.registry import Example, TaskSpec

DEFAULT_TEMPERATURE = 0.05
#: choice texts whose embeddings one scorer keeps (LRU); 0 turns the cache off
DEFAULT_CHOICE_CACHE = 4096


class ChoiceCache:
    """A bounded LRU of text -> embedding, safe to share between scoring threads; copies (pickles) start empty."""

    def __init__(self, max_entries: int):
        if max_entries < 0:
            raise ModelError(f"choice_cache_size must be >= 0 (0: no cache), got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return ChoiceCache, (self.max_entries,)

    def get(self, key: Any) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return value

    def put(self, key: Any, value: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class SentenceZeroShot(TaskModel):
    def __init__(self, path: str, task: TaskSpec, temperature: float = DEFAULT_TEMPERATURE, max_length: int = 256,
                 choice_cache_size: int = DEFAULT_CHOICE_CACHE):
        from sentence_transformers import (  # lazy: sentence-transformers only when embedding
            SentenceTransformer,  # lazy: sentence-transformers only when embedding
        )

        if temperature <= 0:
            raise ModelError(f"sentence zero-shot temperature must be positive, got {temperature}")
        self.choice_cache = ChoiceCache(choice_cache_size)
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

    def _choice_embeddings(self, choices: set[str]) -> dict[str, torch.Tensor]:
        """Each choice's embedding, from the cache where it is there; the others encoded in one call and kept.
        The key holds the token limit too: a longer limit would embed a long choice differently."""
        limit = self.encoder.max_seq_length
        out: dict[str, torch.Tensor] = {}
        for c in choices:
            hit = self.choice_cache.get((limit, c))
            if hit is not None:
                out[c] = hit
        missing = sorted(choices - out.keys())
        if missing:
            for c, emb in zip(missing, self._embed(missing), strict=True):
                emb = emb.clone()  # its own storage: a cached row does not hold the whole batch's tensor
                out[c] = emb
                self.choice_cache.put((limit, c), emb)
        return out

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        examples: list[Example] = batch["examples"]
        if any(not e.choices for e in examples):
            raise ModelError("the sentence-embedding zero-shot scorer needs answer choices for every example")
        inputs = self._embed([e.text for e in examples])
        cemb = self._choice_embeddings({c for e in examples for c in e.choices})
        out = []
        for e, x in zip(examples, inputs, strict=True):
            cos = torch.stack([cemb[c] for c in e.choices]) @ x
            lp = torch.log_softmax(cos.double() / self.temperature, -1)
            out.append(choice_record(e.choices, lp, lp))
        return out
