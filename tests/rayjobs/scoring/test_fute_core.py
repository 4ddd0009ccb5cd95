"""FUTE's model-facing half (paper 004): TaskEmb's Eq. 3 and FUTE's code's variant on hand-checkable
cases and against an independent per-example backward pass; TuPaTE's layer average; the soft-label loss;
one canonical label order between the scoring path and the surrogate; the probe pool kept disjoint from
every target; the prompt never shown to the surrogate; space definitions that cannot work refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rayjobs.config import AdaptationSpec, ModelSpec, TrainSpec
from rayjobs.models import build_task_model
from rayjobs.models.base import TaskModel
from rayjobs.models.loading import ModelError
from rayjobs.scoring.fute_data import PoolSpec, build_pool, mte_examples, one_hot, prompted_examples
from rayjobs.scoring.fute_embeddings import (
    SoftLabelModel,
    SpaceSpec,
    build_surrogate,
    choice_logprobs,
    choice_task,
    fisher_embedding,
    soft_cross_entropy,
    tupate_embedding,
)
from rayjobs.tasks.registry import Example, TaskError
from tests.conftest import TINY_BERT, TINY_T5, needs_data


class LinearChoice(TaskModel):
    """log p(c | x) = log softmax(W x): grad_W log p(y | x) = (e_y - p) x^T, checkable by hand."""

    head_prefixes = ()

    def __init__(self, w: list[list[float]]):
        self.module = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.module.weight.copy_(torch.tensor(w))
        self.task = choice_task("lin", ["a", "b"])

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return {"x": torch.tensor([[float(v) for v in e.text.split()] for e in examples]), "examples": examples}

    def choice_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.module(batch["x"])

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:  # pragma: no cover - not trained here
        raise NotImplementedError

    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


def ex(text: str, label: int, uid: str = "") -> Example:
    return Example(text, ("a", "b"), label, uid=uid or text)


def test_eq3_and_the_square_of_the_mean_gradient_on_a_hand_computed_case() -> None:
    """W = 0, so p = (1/2, 1/2) for every x. x1 = (1, 2), y1 = a: g1 = (1/2, -1/2)^T (1, 2) = [[.5, 1], [-.5, -1]];
    x2 = (3, 0), y2 = b: g2 = (-1/2, 1/2)^T (3, 0) = [[-1.5, 0], [1.5, 0]].
    Eq. 3: (g1^2 + g2^2) / 2 = [[1.25, .5], [1.25, .5]]; FUTE's code: ((g1 + g2) / 2)^2 = [[.25, .25], [.25, .25]]."""
    tm = LinearChoice([[0, 0], [0, 0]])
    data = [ex("1 2", 0), ex("3 0", 1)]
    q = one_hot(data)
    eq3, info = fisher_embedding(tm, data, q, variant="fisher_eq3")
    assert eq3 == pytest.approx([1.25, 0.5, 1.25, 0.5])
    assert info["params"] == [["weight", 4]] and info["n_fisher"] == 2
    sq_mean, _ = fisher_embedding(tm, data, q, variant="fisher_sq_mean")
    assert sq_mean == pytest.approx([0.25, 0.25, 0.25, 0.25])
    soft_loss, _ = fisher_embedding(tm, data, q, labels="soft_loss")
    assert soft_loss == pytest.approx(eq3)  # one-hot labels: both readings of Eq. 3 agree


def test_eq3_with_soft_labels_expected_vs_soft_loss_gradient() -> None:
    """x = (1, 2), q = (1/4, 3/4), W = 0 so p = (1/2, 1/2).
    expected: sum_c q_c g_c^2 with g_a = (1/2, -1/2) x, g_b = (-1/2, 1/2) x: both square to [[.25, 1], [.25, 1]];
    soft_loss: (sum_c q_c g_c)^2 = ((q - p) x)^2 = ((-1/4, 1/4) x)^2 = [[1/16, 1/4], [1/16, 1/4]]."""
    tm = LinearChoice([[0, 0], [0, 0]])
    data = [ex("1 2", 1)]
    expected, _ = fisher_embedding(tm, data, [[0.25, 0.75]], labels="expected")
    assert expected == pytest.approx([0.25, 1.0, 0.25, 1.0])
    soft, _ = fisher_embedding(tm, data, [[0.25, 0.75]], labels="soft_loss")
    assert soft == pytest.approx([1 / 16, 1 / 4, 1 / 16, 1 / 4])


def test_eq3_on_a_nonzero_weight_matches_the_closed_form() -> None:
    """W = [[1, 0], [0, -1]], x = (2, 1): logits (2, -1), p_a = 1 / (1 + e^-3); y = a: g = (1 - p_a, -p_b) x."""
    tm = LinearChoice([[1, 0], [0, -1]])
    pa = 1 / (1 + math.exp(-3))
    g = np.outer([1 - pa, -(1 - pa)], [2, 1])
    vec, _ = fisher_embedding(tm, [ex("2 1", 0)], [[1.0, 0.0]])
    assert vec == pytest.approx((g ** 2).reshape(-1), rel=1e-5)


def _space(head: str = "classification", **kw: Any) -> SpaceSpec:
    return SpaceSpec(name="t", surrogate=ModelSpec(name="tiny", config=TINY_BERT, family="encoder", head=head,
                                                   max_length=32),
                     **{"train": TrainSpec(epochs=1, batch_size=4, max_steps=2), **kw})


EXAMPLES = [Example("the cat sat on the mat", ("yes", "no", "maybe"), 0, uid="0"),
            Example("a dog barked at night", ("yes", "no", "maybe"), 2, uid="1"),
            Example("it rained all day long", ("yes", "no", "maybe"), 1, uid="2")]


@pytest.mark.parametrize("head", ["classification", "multiple_choice"])
def test_eq3_on_a_tiny_bert_equals_an_independent_per_example_backward(head: str) -> None:
    """Reference: for each example, zero the grads, backpropagate -log p(y|x) from the TaskModel's own scoring
    forward (`.backward()`, all parameters live), square, average. The head is never part of the vector."""
    tm = build_surrogate(_space(head), choice_task("t", ["yes", "no", "maybe"]), seed=1)
    pats = [r"encoder\.layer\.0\.output\.dense"]
    vec, info = fisher_embedding(tm, EXAMPLES, one_hot(EXAMPLES), pats)
    named = [(n, p) for n, p in tm.module.named_parameters() if "encoder.layer.0.output.dense" in n]
    assert [n for n, _ in named] == [n for n, _ in info["params"]] and len(named) == 2
    acc = [torch.zeros_like(p) for _, p in named]
    tm.module.eval()
    for e in EXAMPLES:
        tm.module.zero_grad()
        batch = tm.collate([e])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "examples", "choice_mask")}
        logits = tm.module(**inputs).logits.reshape(1, -1)
        (-torch.log_softmax(logits, -1)[0, e.label]).backward()
        for a, (_, p) in zip(acc, named, strict=True):
            a += p.grad ** 2
    ref = torch.cat([(a / len(EXAMPLES)).reshape(-1) for a in acc]).numpy()
    assert vec == pytest.approx(ref, rel=1e-4, abs=1e-12)
    everything, info_all = fisher_embedding(tm, EXAMPLES[:1], one_hot(EXAMPLES[:1]))
    assert not any(tm.is_head(n) for n, _ in info_all["params"])
    assert everything.size == sum(p.numel() for n, p in tm.module.named_parameters() if not tm.is_head(n))


def test_soft_cross_entropy_is_cross_entropy_on_one_hot_and_kl_plus_entropy_on_soft() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, float("-inf")]])
    logp = torch.log_softmax(logits, -1)
    hard = soft_cross_entropy(logp, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert hard.tolist() == pytest.approx(
        nn.functional.cross_entropy(logits, torch.tensor([1, 0]), reduction="none").tolist())
    q = torch.tensor([0.2, 0.5, 0.3])
    p = logp[0].exp()
    kl_plus_h = float((q * (q / p).log()).sum() - (q * q.log()).sum())
    assert float(soft_cross_entropy(logp[:1], q[None])[0]) == pytest.approx(kl_plus_h)


@pytest.mark.parametrize("family", ["seq2seq", "encoder-mc", "encoder-cls"])
def test_surrogate_distribution_is_the_scoring_paths_probs_in_canonical_order(family: str) -> None:
    """exp(choice_logprobs) of the training path equals `TaskModel.score`'s stored `probs`, choice by choice."""
    if family == "seq2seq":
        spec = ModelSpec(name="t5", config=TINY_T5, family="seq2seq", max_length=32)
    else:
        spec = ModelSpec(name="b", config=TINY_BERT, family="encoder", max_length=32,
                         head="multiple_choice" if family == "encoder-mc" else "classification")
    torch.manual_seed(0)
    tm = build_task_model(spec, AdaptationSpec(), choice_task("t", ["yes", "no", "maybe"]))
    tm.module.eval()
    batch = tm.collate(EXAMPLES)
    with torch.no_grad():
        got = choice_logprobs(tm, batch).exp()
    stored = [r["probs"] for r in tm.score(tm.collate(EXAMPLES))]
    assert got.tolist() == [pytest.approx(p, abs=1e-5) for p in stored]


def test_soft_label_model_trains_through_the_loop_toward_the_targets() -> None:
    from rayjobs.config import SetupSpec
    from rayjobs.plan import TrialSpec
    from rayjobs.train.loop import TrainContext, fit

    space = _space(train=TrainSpec(epochs=60, batch_size=3, learning_rate=2e-2), trainable=[r"encoder\."])
    tm = build_surrogate(space, choice_task("t", ["yes", "no", "maybe"]), seed=0)
    targets = {"0": [0.7, 0.2, 0.1], "1": [0.1, 0.1, 0.8], "2": [0.3, 0.4, 0.3]}
    model = SoftLabelModel(tm, targets)
    trial = TrialSpec(run_key="k", experiment="e", kind="embed", setup=SetupSpec(model=space.surrogate),
                      hparams=space.train, train_task="t", eval_task="t", seed=0, n_train=3, n_eval=None,
                      eval_fraction=0.2, split_seed=0, results_dir="/tmp")
    with torch.no_grad():
        before = float(model.loss(model.collate(EXAMPLES)))
    fit(model, list(EXAMPLES), trial, TrainContext())
    tm.module.eval()
    with torch.no_grad():
        after_p = choice_logprobs(tm, tm.collate(EXAMPLES)).exp()
        after = float(model.loss(model.collate(EXAMPLES)))
    entropy = -sum(sum(v * math.log(v) for v in q) for q in targets.values()) / 3
    # soft CE = KL(q || p) + H(q): training drives it toward its minimum H(q), p toward q
    assert after - entropy < 0.4 * (before - entropy)
    assert after_p[1].tolist() == pytest.approx([0.1, 0.1, 0.8], abs=0.15)


def test_tupate_averages_the_prefix_over_layers() -> None:
    """peft's prefix row layout is [layer0 key, layer0 value, layer1 key, ...] x hidden; TuPaTE averages the
    layers: entry (t, kv, h) = mean_l W[t, (2 l + kv) * H + h]."""
    space = SpaceSpec(name="p", surrogate=ModelSpec(name="t5", config=TINY_T5, family="seq2seq", max_length=32),
                      method="tupate", adaptation=AdaptationSpec(method="prefix_tuning", params={"num_virtual_tokens": 3}))
    tm = build_surrogate(space, choice_task("t", ["yes", "no"]), seed=0)
    w = tm.module.prompt_encoder["default"].embedding.weight
    layers, hidden = 2, 32
    with torch.no_grad():
        w.copy_(torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape))
    vec, info = tupate_embedding(tm)
    want = [np.mean([float(w[t, (2 * layer + kv) * hidden + h]) for layer in range(layers)])
            for t in range(3) for kv in range(2) for h in range(hidden)]
    assert info == {"variant": "tupate_prefix_layer_mean", "shape": [3, 2, hidden]}
    assert vec.tolist() == pytest.approx(want)


def test_tupate_prompt_tuning_on_an_encoder_is_the_soft_prompt() -> None:
    space = SpaceSpec(name="p", surrogate=ModelSpec(name="b", config=TINY_BERT, family="encoder",
                                                    head="classification", max_length=32),
                      method="tupate", adaptation=AdaptationSpec(method="prompt_tuning", params={"num_virtual_tokens": 2}))
    tm = build_surrogate(space, choice_task("t", ["yes", "no"]), seed=0)
    vec, info = tupate_embedding(tm)
    w = tm.module.prompt_encoder["default"].embedding.weight.detach()
    assert info["variant"] == "tupate_prompt" and vec.tolist() == pytest.approx(w.reshape(-1).tolist())


def test_space_definitions_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="adaptation must be `full`"):
        _space(adaptation=AdaptationSpec(method="lora"))
    with pytest.raises(ValueError, match="tupate needs adaptation prefix_tuning or prompt_tuning"):
        _space(method="tupate")
    with pytest.raises(ValueError, match="computes tupate_prompt"):
        _space(method="tupate", adaptation=AdaptationSpec(method="prompt_tuning"), variant="fisher_eq3")
    with pytest.raises(ValueError, match="bad parameter-name pattern"):
        _space(fisher_params=["(unclosed"])
    with pytest.raises(ModelError, match="head: classification"):
        build_surrogate(_space("auto"), choice_task("t", ["a", "b"]), 0)
    with pytest.raises(ModelError, match="fixed label set"):
        build_surrogate(_space("classification"), choice_task("t", None), 0)
    with pytest.raises(ModelError, match="matches no parameter"):
        build_surrogate(_space(trainable=["nothing-like-this"]), choice_task("t", ["a", "b"]), 0)


# -- data: probe pool, prompt hidden from the surrogate, canonical order ------------------------------------
@needs_data
def test_probe_pool_is_disjoint_from_targets_seeded_and_described(registry: Any) -> None:
    reg = registry
    spec = PoolSpec(tasks=["cb", "copa"], prompted_tasks=["imdb", "rte"], n_per_task=6, seed=3)
    with pytest.raises(TaskError, match="cb are evaluation targets"):
        build_pool(spec, reg, targets=["cb", "scitail"])
    pool = build_pool(spec, reg, targets=["scitail", "snli"])
    again = build_pool(spec, reg, targets=["scitail", "snli"])
    assert [e.uid for e in pool.examples] == [e.uid for e in again.examples] and pool.digest == again.digest
    assert pool.composition["counts"] == {"cb": 6, "copa": 6, "prompted/imdb": 6, "prompted/rte": 6}
    assert pool.composition["excluded_targets"] == ["scitail", "snli"]
    assert all(e.label == -1 and e.choices == () for e in pool.examples)
    target_texts = {e.text for t in ("scitail", "snli") for e in (*reg.load_data(t, None, None, 0).train,
                                                                  *reg.load_data(t, None, None, 0).eval)}
    assert not target_texts & {e.text for e in pool.examples}
    other = build_pool(spec.model_copy(update={"seed": 4}), reg, targets=["scitail"])
    assert other.digest != pool.digest


def test_mte_examples_show_the_surrogate_the_probe_text_and_canonical_choices_only() -> None:
    from rayjobs.scoring.fute_data import ProbePool

    pool = ProbePool((Example("probe one", (), -1, uid="p:1"), Example("probe two", (), -1, uid="p:2")),
                     {"digest": "d"})
    rows = [{"example_id": "p:2", "choices": ["definitely", "maybe", "never"], "probs": [0.2, 0.5, 0.3],
             "template": "some prompt"},
            {"example_id": "p:1", "choices": ["definitely", "maybe", "never"], "probs": [0.6, 0.3, 0.1],
             "template": "some prompt"}]
    examples, q = mte_examples(pool, rows, ["Entailment", "Neutral", "Contradiction"])
    assert [e.text for e in examples] == ["probe one", "probe two"]  # not rendered with the black box's prompt
    assert all(e.choices == ("Entailment", "Neutral", "Contradiction") for e in examples)
    assert q == [pytest.approx([0.6, 0.3, 0.1]), pytest.approx([0.2, 0.5, 0.3])] and [e.label for e in examples] == [0, 1]
    with pytest.raises(ValueError, match="no predictions row"):
        mte_examples(pool, rows[:1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="expected 2 choice probabilities"):
        mte_examples(pool, rows, ["a", "b"])
    with pytest.raises(ValueError, match="scored twice"):
        mte_examples(pool, rows + rows[:1], ["a", "b", "c"])


@needs_data
def test_prompted_rows_become_choice_examples_with_in_task_distractors_for_free_text() -> None:
    mc, origin = prompted_examples(None, "copa", None, seed=0)
    assert origin.startswith("prompted_examples_32.jsonl#") and len(mc) == 384
    assert all(e.choices[e.label] for e in mc) and all(2 <= len(e.choices) for e in mc)
    sts, _ = prompted_examples(None, "stsb", 10, seed=1, free_text_choices=3)
    assert len(sts) == 10 and all(len(e.choices) == 3 and len(set(e.choices)) == 3 for e in sts)
    again, _ = prompted_examples(None, "stsb", 10, seed=1, free_text_choices=3)
    assert [(e.text, e.choices, e.label) for e in again] == [(e.text, e.choices, e.label) for e in sts]
