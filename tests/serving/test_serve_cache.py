"""The sentence scorer's bounded cache of verbalised-choice embeddings (issue 23.2): scores equal a direct
SentenceTransformer computation with the cache, without it and on a cache hit; a hit encodes only the
inputs (observed by wrapping the real model's `encode`, which still runs); the LRU never holds more than
its bound and evicts the least recently used choice first."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rayjobs.models.loading import ModelError
from rayjobs.models.sentence_zero_shot import DEFAULT_TEMPERATURE, ChoiceCache, SentenceZeroShot
from rayjobs.tasks.registry import Example, LocalSource, TaskSpec

TASK = TaskSpec(name="adhoc", choices=["a", "b"], local=LocalSource(path="-"))
TEXTS = ["Review: a warm, funny and moving film. Sentiment?", "Review: two hours I will not get back. Sentiment?",
         "Review: the music was lovely, the plot was not. Sentiment?"]
CHOICES = ("negative", "positive")


@pytest.fixture(scope="module")
def st() -> Any:
    """The same MiniLM loaded on its own: the independent reference."""
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    return SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")


@pytest.fixture(scope="module")
def model() -> SentenceZeroShot:
    return SentenceZeroShot("builtin:minilm", TASK)


@pytest.fixture()
def encoded(model: SentenceZeroShot) -> Iterator[list[list[str]]]:
    """The texts of every call to the real model's encode (the call itself goes through unchanged)."""
    calls: list[list[str]] = []
    real = model.encoder.encode

    def spy(texts: list[str], *a: Any, **kw: Any) -> Any:
        calls.append(list(texts))
        return real(texts, *a, **kw)

    model.encoder.encode = spy  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del model.encoder.encode  # the class's method again


def _examples(choices_of: list[tuple[str, ...]]) -> list[Example]:
    return [Example(uid=str(i), text=TEXTS[i % len(TEXTS)], choices=c, label=0) for i, c in enumerate(choices_of)]


def _direct(st: Any, examples: list[Example]) -> list[list[float]]:
    """log-softmax(cos / T) over each example's choices, every text embedded by the reference model alone."""
    out = []
    for e in examples:
        emb = st.encode([e.text, *e.choices], normalize_embeddings=True, convert_to_tensor=True).double()
        out.append(torch.log_softmax((emb[1:] @ emb[0]) / DEFAULT_TEMPERATURE, -1).tolist())
    return out


def _score(model: SentenceZeroShot, examples: list[Example]) -> list[list[float]]:
    return [r["logprobs"] for r in model.score(model.collate(examples))]


def test_cached_and_uncached_scores_equal_a_direct_computation(model: SentenceZeroShot, st: Any) -> None:
    examples = _examples([CHOICES, CHOICES, ("bad", "good", "so-so")])
    want = _direct(st, examples)
    model.choice_cache = ChoiceCache(16)
    first, hit = _score(model, examples), _score(model, examples)  # misses, then every choice from the cache
    assert (model.choice_cache.misses, model.choice_cache.hits) == (5, 5)
    model.choice_cache = ChoiceCache(0)  # no cache at all
    uncached = _score(model, examples)
    assert len(model.choice_cache) == 0
    for got in (first, hit, uncached):
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4)
    assert hit == first  # the same tensors: not even rounding differs


def test_a_cache_hit_encodes_only_the_inputs(model: SentenceZeroShot, encoded: list[list[str]]) -> None:
    model.choice_cache = ChoiceCache(16)
    examples = _examples([CHOICES, CHOICES])
    _score(model, examples)
    assert sorted(t for call in encoded for t in call) == sorted([e.text for e in examples] + list(CHOICES))
    encoded.clear()
    _score(model, _examples([CHOICES, CHOICES, CHOICES]))  # a later batch, same template
    assert encoded == [TEXTS], encoded  # one call, the inputs alone
    encoded.clear()
    _score(model, _examples([("negative", "neutral")]))  # one new choice: only it is encoded with the input
    assert sorted(t for call in encoded for t in call) == sorted([TEXTS[0], "neutral"])


def test_the_bound_holds_and_the_least_recently_used_goes_first(model: SentenceZeroShot,
                                                                encoded: list[list[str]]) -> None:
    bound = 5
    model.choice_cache = ChoiceCache(bound)
    sizes = []
    for k in range(12):  # 24 distinct choices through a cache of 5
        _score(model, _examples([(f"label {k}a", f"label {k}b")]))
        sizes.append(len(model.choice_cache))
    assert max(sizes) == bound and sizes[:2] == [2, 4]
    # the newest are kept: label 11a/11b, 10a/10b and 9b (9a went first: sorted misses are stored in order)
    encoded.clear()
    _score(model, _examples([("label 11a", "label 10b")]))
    assert encoded == [[TEXTS[0]]]
    _score(model, _examples([("label 0a", "label 11b")]))  # long evicted: encoded again
    assert encoded[1:] == [[TEXTS[0]], ["label 0a"]]
    assert len(model.choice_cache) == bound


def test_a_batch_with_more_new_choices_than_the_bound_is_still_scored_whole(model: SentenceZeroShot,
                                                                            st: Any) -> None:
    model.choice_cache = ChoiceCache(2)
    examples = _examples([("one", "two", "three"), ("four", "five", "six")])
    for g, w in zip(_score(model, examples), _direct(st, examples), strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert len(model.choice_cache) == 2


def test_the_cache_is_per_instance_copies_start_empty_and_a_bad_bound_is_refused(model: SentenceZeroShot) -> None:
    model.choice_cache = ChoiceCache(8)
    _score(model, _examples([CHOICES]))
    copy = pickle.loads(pickle.dumps(model.choice_cache))
    assert len(copy) == 0 and copy.max_entries == 8 and len(model.choice_cache) == 2
    with pytest.raises(ModelError, match="choice_cache_size must be >= 0"):
        ChoiceCache(-1)
