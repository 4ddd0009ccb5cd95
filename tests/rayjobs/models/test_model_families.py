"""Every model family x adaptation method on real task data: what trains, what a checkpoint holds,
how choices are scored, and how templates render.

Expected parameter sets come from naming rules written here (biases end in `.bias`, LoRA adds
`lora_A/lora_B`, adapters `.adapter.`, prompt methods `prompt_encoder`), not from `requires_grad`,
which is what the code under test sets. Rank classification is checked against a direct,
unbatched computation of each choice's log-likelihood.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayjobs.config import AdaptationSpec, ModelSpec, SetupSpec
from rayjobs.engine.preflight import check_setup
from rayjobs.engine.smoke import TINY
from rayjobs.models import ModelError, build_task_model
from rayjobs.models.text_to_text import CausalModel, Seq2SeqModel
from rayjobs.tasks.registry import Example, TaskRegistry, TaskSpec
from rayjobs.tasks.templates import PromptTemplate, render_train, resolve

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

METHODS = {"encoder": ["full", "bitfit", "lora", "adapter", "prompt_tuning"],
           "seq2seq": ["full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"],
           "causal": ["full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"]}
CASES = [(f, m) for f, ms in METHODS.items() for m in ms]
PARAMS = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
          "lora": {"r": 4, "lora_alpha": 8}, "adapter": {"reduction_factor": 4}}
ADDED = {"lora": ("lora_A", "lora_B"), "adapter": (".adapter.",), "prompt_tuning": ("prompt_encoder",),
         "prefix_tuning": ("prompt_encoder",)}


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry.load(data_root=DATA)


def tiny(family: str, max_length: int = 64) -> ModelSpec:
    return ModelSpec(name=f"tiny-{family}", config=dict(TINY[family]), family=family, max_length=max_length)


def expected_to_train(family: str, method: str, name: str) -> bool:
    """Which parameters an adaptation may change, from their names alone."""
    head = family == "encoder" and ".classifier." in f".{name}"  # encoders get a fresh task head
    if method == "full":
        return True
    if method == "bitfit":
        return name.endswith(".bias") or head
    return any(tag in name for tag in ADDED[method]) or head


def train_steps(tm, examples: list[Example], steps: int = 4) -> None:
    opt = torch.optim.AdamW([p for p in tm.module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    tm.module.train()
    for i in range(steps):
        chunk = examples[(i * 8) % len(examples):][:8]
        tm.loss(tm.collate(chunk)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("family", "method"), CASES)
def test_adaptation_changes_exactly_its_parameters(registry: TaskRegistry, family: str, method: str) -> None:
    data = registry.load_data("snli", 32, 16, seed=3)
    torch.manual_seed(0)
    tm = build_task_model(tiny(family), AdaptationSpec(method=method, params=PARAMS.get(method, {})), data.spec)
    before = {n: p.detach().clone() for n, p in tm.module.named_parameters()}
    examples = render_train(data.train, resolve(data.spec, "default", family), seed=3)
    train_steps(tm, examples)
    after = dict(tm.module.named_parameters())
    changed = {n for n in after if not torch.equal(before[n], after[n].detach())}
    allowed = {n for n in after if expected_to_train(family, method, n)}
    assert changed, "nothing trained"
    assert changed <= allowed, f"{method} changed parameters it must not: {sorted(changed - allowed)[:5]}"
    if method == "full":
        assert changed == set(after), f"full fine-tuning left {sorted(set(after) - changed)[:5]} unchanged"
    elif method in ADDED:  # every added parameter trains (the adapters' down-projections from step 2 on)
        added = {n for n in after if any(tag in n for tag in ADDED[method])}
        assert added and added <= changed, sorted(added - changed)[:5]
    else:  # bitfit: the biases (T5 has none of its own: zero biases are added and trained)
        biases = {n for n in after if n.endswith(".bias")}
        assert biases and biases <= changed, sorted(biases - changed)[:5]
    trainable, total = tm.param_counts()
    assert trainable == sum(after[n].numel() for n in allowed if after[n].requires_grad)
    assert (trainable == total) == (method == "full")


@pytest.mark.parametrize(("family", "method"), [("encoder", "lora"), ("encoder", "prompt_tuning"),
                                                ("seq2seq", "adapter"), ("seq2seq", "prefix_tuning"),
                                                ("causal", "lora"), ("causal", "bitfit")])
def test_peft_source_checkpoint_holds_only_trained_params_and_reloads(
        registry: TaskRegistry, tmp_path: Path, family: str, method: str) -> None:
    spec, adapt = tiny(family), AdaptationSpec(method=method, params=PARAMS.get(method, {}))
    src = registry.load_data("snli", 32, 8, seed=1)
    torch.manual_seed(0)
    tm = build_task_model(spec, adapt, src.spec)
    train_steps(tm, render_train(src.train, resolve(src.spec, "default", family), seed=1), steps=2)
    tm.save(tmp_path / "ckpt")
    saved = {n for n, p in tm.module.named_parameters() if p.requires_grad}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ckpt" / "trained.safetensors"))
    assert set(state) == saved
    assert sum(t.numel() for t in state.values()) == tm.param_counts()[0] < tm.param_counts()[1]

    # the transfer stage: same setup, another task (a 3-way label set: a fresh encoder head)
    tgt = registry.get("anli_r3")
    torch.manual_seed(1)
    tm2 = build_task_model(spec, adapt, tgt)
    n = tm2.load(tmp_path / "ckpt")
    own = dict(tm2.module.named_parameters())
    body = [k for k in state if not tm2.is_head(k)]
    assert n == len(body) > 0
    for k in body:
        assert torch.equal(own[k].detach(), state[k]), k
    for k in state:
        if tm2.is_head(k):  # the task head is never transferred
            assert own[k].shape != state[k].shape or not torch.equal(own[k].detach(), state[k])


def direct_loglik(tm, prompt: str, cont: str, per_token: bool = False) -> float:
    """One sequence at a time, no padding: sum (or mean) of log p(answer token | everything before it)."""
    tok = tm.tokenizer
    if isinstance(tm, CausalModel):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(" " + cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(tm.module(input_ids=ids).logits[0].float(), -1)
        terms = [logp[len(p) + i - 1, t] for i, t in enumerate(c)]
    else:
        enc = tok(prompt, return_tensors="pt")
        labels = tok(text_target=cont, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(tm.module(**enc, labels=labels).logits[0].float(), -1)
        terms = [logp[i, t] for i, t in enumerate(labels[0])]
    return float(sum(terms) / (len(terms) if per_token else 1))


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_rank_classification_matches_a_direct_loglikelihood(registry: TaskRegistry, family: str) -> None:
    data = registry.load_data("anli_r3", 8, 6, seed=0)
    torch.manual_seed(0)
    tm = build_task_model(tiny(family, max_length=512), AdaptationSpec(), data.spec)  # nothing truncated
    assert isinstance(tm, Seq2SeqModel if family == "seq2seq" else CausalModel)
    tm.module.eval()
    tpl = resolve(data.spec, "default", family)[0]
    examples = [tpl.render(e) for e in data.eval]  # prompts of different lengths: padding is exercised
    with torch.no_grad():
        direct = torch.tensor([[direct_loglik(tm, e.text, c) for c in e.choices] for e in examples])
        direct_mean = torch.tensor([[direct_loglik(tm, e.text, c, per_token=True) for c in e.choices]
                                    for e in examples])
        batched = tm._score([e.text for e in examples for _ in e.choices],
                            [c for e in examples for c in e.choices])[0].view(len(examples), -1)
        preds = tm.predict(tm.collate(examples))
        records = tm.score(tm.collate(examples))
    assert torch.allclose(batched, direct, atol=1e-4), (batched - direct).abs().max()
    assert preds == direct.argmax(-1).tolist()
    # the scoring interface: summed and per-token log-likelihoods, softmax over choices, in label order
    got = torch.tensor([r["logprobs"] for r in records], dtype=torch.float)
    got_mean = torch.tensor([r["logprobs_mean"] for r in records], dtype=torch.float)
    probs = torch.tensor([r["probs"] for r in records], dtype=torch.float)
    assert torch.allclose(got, direct, atol=1e-4) and torch.allclose(got_mean, direct_mean, atol=1e-4)
    assert torch.allclose(probs, torch.softmax(direct.double(), -1).float(), atol=1e-5)
    assert [r["choices"] for r in records] == [list(e.choices) for e in examples]


def test_generation_answers_free_text_and_regression(registry: TaskRegistry) -> None:
    """A seq2seq model trained on one answer learns to generate it; a score task parses numbers."""
    spec = TaskSpec(name="echo", answer_type="text", metric="exact_match", local={"path": "x.jsonl"})
    torch.manual_seed(0)
    tm = build_task_model(tiny("seq2seq"), AdaptationSpec(), spec)
    examples = [Example(f"question {i}", (), -1, answer="blue sky") for i in range(8)]
    opt = torch.optim.AdamW(tm.module.parameters(), lr=3e-3)
    for _ in range(40):
        tm.module.train()
        tm.loss(tm.collate(examples)).backward()
        opt.step()
        opt.zero_grad()
    tm.module.eval()
    assert tm.predict(tm.collate(examples[:2])) == ["blue sky", "blue sky"]

    from rayjobs.models.text_to_text import parse_number

    assert parse_number("3.8") == 3.8 and parse_number("score: -1.5 or so") == -1.5 and parse_number("none") == 0.0


def test_templates_render_options_and_verbalised_labels(registry: TaskRegistry) -> None:
    ex = Example("Sentence 1: a Sentence 2: b", ("C", "N"), 1)
    t = PromptTemplate(name="x", input="{input}\nOptions:{options_list}\nPick one of {options}:",
                       answer_choices=["contradiction", "neutral"])
    out = t.render(ex)
    assert out.text == "Sentence 1: a Sentence 2: b\nOptions:\n- contradiction\n- neutral\nPick one of " \
                       "contradiction, neutral:"
    assert out.choices == ("contradiction", "neutral") and out.target_text == "neutral" and out.label == 1
    snli = registry.get("snli")
    assert resolve(snli, "default", "encoder")[0].input == "{input}"  # encoders see the base rendering
    assert resolve(snli, "default", "seq2seq") == [snli.prompts[0]]
    assert len(resolve(snli, "all", "causal")) == len(snli.prompts) >= 2
    # `all` gives each training example a seeded template: reproducible, and every template is used
    train = registry.load_data("snli", 40, 4, seed=5).train
    a, b = render_train(train, snli.prompts, 5), render_train(train, snli.prompts, 5)
    assert a == b and {e.choices for e in a} == {tuple(p.answer_choices) for p in snli.prompts}
    with pytest.raises(ValueError, match="unknown fields"):
        PromptTemplate(name="bad", input="{input} {premise}")
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplate(name="bad", input="no input here")


@pytest.mark.parametrize(("family", "method", "task", "message"), [
    ("encoder", "prefix_tuning", "snli", "does not fit a encoder model"),
    ("encoder", "prompt_tuning", "piqa", "multiple-choice head"),
    ("encoder", "full", "squad_v2", "free-text answers"),
])
def test_adaptations_that_do_not_fit_fail_in_preflight(registry: TaskRegistry, family: str, method: str,
                                                       task: str, message: str) -> None:
    setup = SetupSpec(model=tiny(family), adaptation=AdaptationSpec(method=method))
    with pytest.raises(ModelError, match=message):
        check_setup(setup, [task], registry)


def test_unknown_prompt_and_bad_adaptation_params_are_clear(registry: TaskRegistry) -> None:
    setup = SetupSpec(model=tiny("seq2seq"), prompts={"train": "nosuch"})
    with pytest.raises(ModelError, match=r"prompts.train: task 'snli' has no prompt template 'nosuch'"):
        check_setup(setup, ["snli"], registry)
    with pytest.raises(ModelError, match="adaptation lora: bad params"):
        build_task_model(tiny("causal"), AdaptationSpec(method="lora", params={"rank": 4}), registry.get("snli"))
    with pytest.raises(ModelError, match="adapter style must be houlsby or pfeiffer"):
        build_task_model(tiny("encoder"), AdaptationSpec(method="adapter", params={"style": "x"}),
                         registry.get("snli"))


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_training_loop_with_gradient_checkpointing_trains_lora(tmp_path: Path, family: str) -> None:
    """The one loop, source stage, LoRA + gradient checkpointing: LoRA's B matrices start at zero
    (peft's init), so non-zero B in the saved checkpoint means gradients reached every adapter."""
    from safetensors.torch import load_file

    from rayjobs.config import PairwiseConfig
    from rayjobs.plan import expand_pairwise
    from rayjobs.train.loop import train_and_evaluate

    cfg = PairwiseConfig.model_validate({
        "name": "gc", "data_root": str(DATA), "tasks": {"sources": ["copa"], "targets": ["cb"]}, "seeds": [1],
        "sizes": {"source_train": 16, "target_train": 8, "eval": 8},
        "setups": [{"model": tiny(family).model_dump(), "adaptation": {"method": "lora", "params": {"r": 4}},
                    "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "gradient_checkpointing": True}}]})
    src = next(t for t in expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp_path)) if t.kind == "source")
    row = train_and_evaluate(src)
    state = load_file(str(Path(row["checkpoint"]) / "trained.safetensors"))
    b = {k: v for k, v in state.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values())
    assert row["trainable_params"] == sum(v.numel() for v in state.values())
    assert row["hparams"]["gradient_checkpointing"] is True and 0 <= row["score"] <= 1
