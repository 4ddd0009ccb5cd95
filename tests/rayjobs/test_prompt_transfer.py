"""Soft prompt transfer (Lin et al. 2024): a transfer's prompt starts as its source's learned prompt (the
task head never transfers), sources and targets train with separate seed lists and every transfer is
paired with the baseline of its own target seed, periodic validation keeps the best step, Adafactor."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rayjobs.config import ConfigError, PairwiseConfig, TrainSpec, load_config
from rayjobs.engine.trial import execute
from rayjobs.models import checkpoint
from rayjobs.plan import TrialSpec, expand_pairwise, identity_dump
from rayjobs.tasks.registry import Example, TaskRegistry
from rayjobs.train.loop import TrainContext, evaluate, fit, prepare_data, prepare_model, validation_split
from tests.conftest import DATA, REPO, TINY_BERT, TINY_T5, needs_data

PROMPT = "prompt_encoder.default.embedding.weight"


def _prompt_name(state: dict[str, Any]) -> str:
    names = [n for n in state if n.endswith(PROMPT)]
    assert len(names) == 1, list(state)
    return names[0]


def _config(family: str, sources: list[str], targets: list[str], seeds: Any, train: dict[str, Any],
            **extra: Any) -> PairwiseConfig:
    model = {"name": "tiny", "family": family, "config": TINY_T5 if family == "seq2seq" else TINY_BERT,
             "max_length": 48, "max_target_length": 4}
    # T5: the prompt goes before the encoder input only (Lester et al.); peft's default for seq2seq keeps a
    # second, decoder-side block of prompt rows that prompt tuning never uses (so never trains)
    params = {"num_virtual_tokens": 4, **({"num_transformer_submodules": 1} if family == "seq2seq" else {})}
    return PairwiseConfig.model_validate({
        "name": "pt", "data_root": str(DATA), "tasks": {"sources": sources, "targets": targets}, "seeds": seeds,
        "sizes": {"source_train": 16, "target_train": 16, "eval": 8},
        "setups": [{"model": model, "adaptation": {"method": "prompt_tuning", "params": params},
                    "train": {"epochs": 2, "max_steps": 3, "batch_size": 8, "learning_rate": 0.3, **train}}],
        **extra})


# -- prompt initialisation from the source ------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize(("family", "source", "target"), [("seq2seq", "scitail", "cb"), ("encoder", "scitail", "mrpc")])
def test_transfer_starts_from_the_source_prompt_and_a_fresh_head(tmp_path: Path, family: str, source: str,
                                                                 target: str) -> None:
    cfg = _config(family, [source], [target], {"source": [5], "target": [7]},
                  {"eval_every": 2, "validation": {"n": 4}}, save_target_checkpoints=True)
    trials = expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp_path))
    by_kind = {t.kind: t for t in trials}
    src_row = execute(by_kind["source"])
    src_state = checkpoint.read_state(src_row["checkpoint"])
    name = _prompt_name(src_state)
    heads = [n for n in src_state if ".classifier." in f".{n}"]
    assert (family == "encoder") == bool(heads)  # the encoder's head trains (and is saved), T5 has none

    transfer, baseline = by_kind["transfer"], by_kind["target"]
    x_model = prepare_model(transfer, prepare_data(transfer))  # the transfer before its first step
    b_model = prepare_model(baseline, prepare_data(baseline))  # the target-only run, same target seed
    x_state, b_state = x_model.trainable_state(), b_model.trainable_state()
    assert torch.equal(x_state[name], src_state[name])  # the source's learned prompt, exactly
    assert not torch.allclose(b_state[name], src_state[name])  # which is not what a fresh prompt is
    for h in heads:  # the head is the target's own fresh one, as in the baseline, not the source's
        assert torch.equal(x_state[h], b_state[h]) and not torch.allclose(x_state[h], src_state[h])

    # the whole chain: the transfer trains from there and records both seeds; the baseline keeps its prompt
    x_row, b_row = execute(transfer), execute(baseline)
    assert (x_row["seed"], x_row["hparams"]["source_seed"], src_row["seed"]) == (7, 5, 5)
    assert x_row["baseline_run_key"] == b_row["run_key"] and b_row["seed"] == 7
    assert b_row["checkpoint"] and _prompt_name(checkpoint.read_state(b_row["checkpoint"]))
    from analysis.selection.prompt_similarity import load_soft_prompt

    assert load_soft_prompt(b_row["checkpoint"]).shape[0] == 4  # the selectors read the target's own prompt
    assert src_row["metrics"]["best_step"] in (2, 3) and [s for s, _ in src_row["metrics"]["validation_curve"]] == [2, 3]


# -- separate seed lists --------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("pairing", ["cross", "zip"])
def test_separate_seed_lists_plan_and_pairing(tmp_path: Path, pairing: str) -> None:
    src_seeds, tgt_seeds = [42, 150, 386], [112, 28, 52]
    cfg = _config("encoder", ["snli", "scitail"], ["mrpc", "cb"], {"source": src_seeds, "target": tgt_seeds,
                                                                   "pairing": pairing}, {})
    trials = expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp_path))
    sources = {t.run_key: t for t in trials if t.kind == "source"}
    baselines = {t.run_key: t for t in trials if t.kind == "target"}
    transfers = [t for t in trials if t.kind == "transfer"]
    assert sorted((t.source, t.seed) for t in sources.values()) == sorted(
        (s, seed) for s in ["snli", "scitail"] for seed in src_seeds)
    assert sorted((t.target, t.seed) for t in baselines.values()) == sorted(
        (t, seed) for t in ["mrpc", "cb"] for seed in tgt_seeds)
    want_pairs = ({(s, t) for s in src_seeds for t in tgt_seeds} if pairing == "cross"
                  else {(42, 112), (150, 28), (386, 52)})
    assert len(transfers) == 2 * 2 * len(want_pairs) and len({t.run_key for t in transfers}) == len(transfers)
    assert len({t.label for t in transfers}) == len(transfers)  # logs tell the source seeds apart
    for (s, t) in [(s, t) for s in ["snli", "scitail"] for t in ["mrpc", "cb"]]:
        cell = [x for x in transfers if (x.source, x.target) == (s, t)]
        assert {(x.source_seed, x.seed) for x in cell} == want_pairs
    for x in transfers:
        src, base = sources[x.source_run_key], baselines[x.baseline_run_key]
        assert (src.source, src.seed) == (x.source, x.source_seed)
        assert (base.target, base.seed) == (x.target, x.seed)  # the baseline of the transfer's target seed
    assert all(not b.save_checkpoint for b in baselines.values())  # only with save_target_checkpoints


@needs_data
def test_a_plain_seed_list_pairs_each_seed_with_itself_and_seed_lists_are_checked(tmp_path: Path) -> None:
    reg = TaskRegistry.load(data_root=DATA)
    plain = expand_pairwise(_config("encoder", ["snli"], ["mrpc"], [3, 4], {}), reg, str(tmp_path))
    same = expand_pairwise(_config("encoder", ["snli"], ["mrpc"], {"source": [3, 4], "target": [3, 4],
                                                                    "pairing": "zip"}, {}), reg, str(tmp_path))
    # seeds: [3, 4] is seeds {source: [3, 4], target: [3, 4], pairing: zip}: the same trials, the same keys
    assert [(t.kind, t.seed, t.run_key) for t in plain] == [(t.kind, t.seed, t.run_key) for t in same]
    assert all(t.source_seed == t.seed for t in plain if t.kind == "transfer")
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntasks: {sources: [snli]}\nseeds: {source: [1, 2], target: [3], pairing: zip}\n"
                 "setups: [{model: {name: m, config: {model_type: bert}}}]\n")
    with pytest.raises(ConfigError, match=r"seeds.*zip needs as many source as target seeds \(2 vs 1\)"):
        load_config(p)
    p.write_text(p.read_text().replace("target: [3], pairing: zip", "target: [3, 3]"))
    with pytest.raises(ConfigError, match=r"seeds.target must be unique"):
        load_config(p)


# -- best-step selection --------------------------------------------------------------------------------------
def _trial(task: str, hp: dict[str, Any], tmp_path: Path, model: dict[str, Any] | None = None,
           method: str = "full") -> TrialSpec:
    setup = {"model": model or {"name": "tiny", "config": TINY_BERT, "max_length": 48},
             "adaptation": {"method": method}}
    return TrialSpec.model_validate({
        "run_key": "k", "experiment": "e", "kind": "target", "setup": setup, "hparams": hp, "train_task": task,
        "eval_task": task, "target": task, "seed": 11, "n_train": 24, "n_eval": 8, "eval_fraction": 0.2,
        "split_seed": 0, "data_root": str(DATA), "results_dir": str(tmp_path)})


@needs_data
def test_best_validation_step_is_restored(tmp_path: Path) -> None:
    """A hand-built case where validation improves, then worsens: a one-word cue ('good' -> 1, 'bad' -> 0) is
    learnt while the warmup lr is small and destroyed once it is large. Full-batch steps (one per epoch),
    so the per-epoch progress hook sees the state after every step: the state left after fit is exactly
    the one of the first best step on the recorded curve, and it scores the held-out examples as recorded."""
    hp = {"epochs": 20, "batch_size": 64, "learning_rate": 0.3, "warmup_ratio": 0.5, "max_grad_norm": None,
          "eval_every": 1, "validation": {"n": 16, "from": "train"}}
    trial = _trial("scitail", hp, tmp_path, model={"name": "tiny", "config": TINY_BERT, "max_length": 16})
    data = prepare_data(trial)
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "table", "green", "music", "paper"]
    examples = [Example(text=("good " if i % 2 else "bad ") + " ".join(rng.choice(words) for _ in range(4)),
                        choices=data.train[0].choices, label=i % 2, uid=str(i)) for i in range(48)]
    tm = prepare_model(trial, data)
    states: dict[int, dict[str, torch.Tensor]] = {}

    def progress(d: dict[str, Any]) -> None:
        states[d["step"]] = {n: p.detach().clone() for n, p in tm.module.named_parameters()}

    fitted = fit(tm, examples, trial, TrainContext(progress=progress))
    v = fitted.validation
    curve = v["validation_curve"]
    assert [s for s, _ in curve] == list(range(1, 21)) and fitted.steps == 20 and v["n_validation"] == 16
    scores = [sc for _, sc in curve]
    best = scores.index(max(scores)) + 1  # the first step with the highest validation score
    assert v["best_step"] == best and v["best_validation_score"] == max(scores) == 1.0
    assert scores[0] < 1.0 and scores[-1] < 1.0  # improved, then got worse again
    assert scores[best] == 1.0  # a later step ties: the first one is kept
    now = dict(tm.module.named_parameters())
    assert all(torch.equal(now[n], states[best][n]) for n in now)
    for later in (best + 1, 20):
        assert not all(torch.equal(now[n], states[later][n]) for n in now)
    # the restored model scores the held-out examples as the curve says
    train, held = validation_split(examples, trial)
    assert len(held) == 16 and len(train) == 32 and not {e.uid for e in held} & {e.uid for e in train}
    assert evaluate(tm, held, 64)[0] == 1.0


def test_validation_options_are_checked() -> None:
    with pytest.raises(ValueError, match="`eval_every` and `validation` go together"):
        TrainSpec(eval_every=10)
    with pytest.raises(ValueError, match="give `n`"):
        TrainSpec.model_validate({"eval_every": 10, "validation": {"from": "train"}})
    with pytest.raises(ValueError, match="validation.from"):
        TrainSpec.model_validate({"eval_every": 10, "validation": {"n": 5, "from": "eval"}})
    spec = TrainSpec.model_validate({"eval_every": 10, "validation": {"n": 50, "fraction": 0.1}}).validation
    assert spec is not None and (spec.size(200), spec.size(2000)) == (20, 50)  # the smaller cap


@needs_data
def test_a_validation_split_that_leaves_nothing_to_train_on_is_an_error(tmp_path: Path) -> None:
    trial = _trial("scitail", {"eval_every": 1, "validation": {"n": 24}}, tmp_path)
    data = prepare_data(trial)
    with pytest.raises(ValueError, match="holds out 24 of 24 training examples of 'scitail'"):
        fit(prepare_model(trial, data), data.train, trial, TrainContext())


# -- Adafactor ------------------------------------------------------------------------------------------------
@needs_data
def test_adafactor_first_step_is_lr_times_sign_and_it_trains(tmp_path: Path) -> None:
    """With relative_step/scale_parameter off, Adafactor's first update of a vector is lr * g / sqrt(g^2 + 1e-30)
    = lr * sign(g) (second moment = g^2, RMS 1 so no clipping); a relative step would use min(1e-2, 1/sqrt(t))
    and parameter scaling would multiply by RMS(p)."""
    from transformers.optimization import Adafactor

    from rayjobs.train.backend import make_optimizer

    lr = 0.3
    trial = _trial("scitail", {"optimizer": "adafactor", "learning_rate": lr}, tmp_path)
    data = prepare_data(trial)
    tm = prepare_model(trial, data)
    opt = make_optimizer(tm, trial.hparams)
    assert isinstance(opt, Adafactor)
    tm.module.train()
    tm.loss(tm.collate(data.train[:8])).backward()
    vectors = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in tm.module.named_parameters()
               if p.dim() == 1 and p.grad is not None and p.grad.abs().min() > 0}
    assert vectors
    opt.step()
    now = dict(tm.module.named_parameters())
    for n, (before, g) in vectors.items():
        assert torch.allclose(now[n].detach(), before - lr * torch.sign(g), atol=1e-6), n

    hp = {"optimizer": "adafactor", "learning_rate": 1e-2, "epochs": 30, "batch_size": 8, "max_grad_norm": None}
    trial = _trial("scitail", hp, tmp_path)
    data = prepare_data(trial)
    data.train = data.train[:8]  # one fixed batch: the loss on it must fall
    fitted = fit(prepare_model(trial, data), data.train, trial, TrainContext())
    assert fitted.steps == 30 and not any(map(math.isnan, fitted.losses))
    assert fitted.losses[-1] < 0.5 * fitted.losses[0]


def test_new_train_options_enter_run_keys_only_when_chosen() -> None:
    plain = identity_dump(TrainSpec())
    assert not {"optimizer", "eval_every", "validation"} & set(plain)
    assert identity_dump(TrainSpec(optimizer="adafactor"))["optimizer"] == "adafactor"
    chosen = identity_dump(TrainSpec.model_validate({"eval_every": 5, "validation": {"n": 3}}))
    assert chosen["eval_every"] == 5 and chosen["validation"] == {"n": 3, "fraction": None, "from": "train"}


# -- the paper's configuration ------------------------------------------------------------------------------
@needs_data
def test_t5base_config_is_the_papers_setup() -> None:
    cfg = load_config(REPO / "configs" / "its_t5base_prompt.yaml")
    (setup,) = cfg.setups
    assert setup.model.path == "google-t5/t5-base" and setup.key == "prompt_tuning:t5b" and setup.model.family == "seq2seq"
    assert setup.adaptation.method == "prompt_tuning" and setup.adaptation.params["num_virtual_tokens"] == 100
    for hp, lr in ((setup.source_hparams, 0.5), (setup.train, 2.0)):
        assert (hp.optimizer, hp.learning_rate, hp.batch_size, hp.max_steps, hp.eval_every) == (
            "adafactor", lr, 32, 30000, 500)
    assert not isinstance(cfg.seeds, list)
    assert (cfg.seeds.source, cfg.seeds.target) == ([42, 150, 386], [112, 28, 52])
    assert cfg.save_target_checkpoints
    reg = TaskRegistry.load(cfg.task_files, cfg.data_root)
    assert all(reg.get(t) for t in cfg.tasks.sources + cfg.tasks.target_list)
