"""The one training and evaluation loop, for every model family, adaptation method and stage.

A plain torch loop rather than HF Trainer: it is a few dozen lines we fully control (seeding and
data order for CPU determinism, exactly-which-parameters-train, adapter-only checkpoints), it runs
unchanged inside a Ray Train worker, and DeepSpeed plugs in as an engine that replaces
backward/step (see `backend.py`) instead of through Trainer's own integration.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rayjobs.config import SetupSpec, TrainSpec
from rayjobs.models import TaskModel, build_task_model
from rayjobs.models.base import answer
from rayjobs.plan import TrialSpec
from rayjobs.tasks import metrics
from rayjobs.tasks.registry import Example, TaskRegistry, TaskSpec
from rayjobs.tasks.templates import BASE, PromptTemplate, render_train, resolve
from rayjobs.train.backend import TorchBackend
from rayjobs.train.deepspeed_backend import DeepSpeedBackend, load_into_partitioned, model_init_context
from rayjobs.train.mixture import load_mixture


@dataclass
class TrainContext:
    """Where the loop runs: a single process, or one rank of a Ray Train / DeepSpeed group."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    progress: Any = None  # callable(dict) for per-epoch reports (Tune/Train), optional
    #: callable(dict) after each periodic validation (`train.eval_every`): Tune's intermediate results;
    #: it raises `rayjobs.engine.trial.TrialStopped` when the scheduler stopped the trial
    report: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # every device's generator
    torch.use_deterministic_algorithms(True, warn_only=True)


# -- process state of a warm worker (rayjobs/engine/pool.py) ----------------------------------------------------
@dataclass(frozen=True)
class ProcessState:
    """Process-wide settings a trial may change and a later trial in the same process would inherit.
    RNGs are not here: every trial seeds them first (`seed_everything`)."""

    threads: int
    deterministic: bool
    deterministic_warn_only: bool
    fill_uninitialized_memory: bool
    default_dtype: torch.dtype
    grad_enabled: bool
    cwd: str


def capture_process_state() -> ProcessState:
    return ProcessState(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled(),
                        torch.utils.deterministic.fill_uninitialized_memory, torch.get_default_dtype(),
                        torch.is_grad_enabled(), os.getcwd())


def restore_process_state(state: ProcessState) -> None:
    """Back to `state` (taken when the worker started), before the next trial."""
    torch.set_num_threads(state.threads)
    torch.use_deterministic_algorithms(state.deterministic, warn_only=state.deterministic_warn_only)
    # the DeepSpeed backend turns the fill off; a later trial must not inherit that
    torch.utils.deterministic.fill_uninitialized_memory = state.fill_uninitialized_memory
    torch.set_default_dtype(state.default_dtype)
    torch.set_grad_enabled(state.grad_enabled)
    os.chdir(state.cwd)


def release_memory() -> None:
    """Free what the last trial left (reference cycles in models/optimisers, cached allocator blocks) and
    hand freed heap back to the OS, so a warm worker does not grow from trial to trial."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _batches(examples: list[Example], size: int, rng: random.Random | None) -> list[list[Example]]:
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [[examples[i] for i in order[j:j + size]] for j in range(0, len(order), size)]


#: how one epoch's examples become global batches: (examples, batch size, rng) -> batches (hook of `fit`)
Batcher = Callable[[list[Example], int, "random.Random | None"], list[list[Example]]]


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


# -- evaluation: the one scoring path, with per-example outputs ------------------------------------------
def score_examples(tm: TaskModel, examples: list[Example], batch_size: int, device: str = "cpu",
                   generate: bool = False) -> list[dict[str, Any]]:
    """Predictions records of `examples` (rendered already), in order, through `TaskModel.score`."""
    tm.module.eval()
    out: list[dict[str, Any]] = []
    for chunk in _batches(examples, batch_size, None):
        batch = _to(tm.collate(chunk), device)
        out.extend(tm.score(batch, generate=generate))
    return out


def prediction_rows(task: str, template: str, split: str, examples: list[Example],
                    records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored records joined with the examples' ids and gold answers: rows of the `predictions` table."""
    rows = []
    for e, r in zip(examples, records, strict=True):
        gold = e.label if e.answer is None and e.value is None and e.label >= 0 else None
        row = {**r, "example_id": e.uid, "template": template, "task": task, "split": split, "gold": gold,
               "gold_text": e.answer, "gold_value": e.value}
        if gold is not None and r.get("prediction") is not None:
            row["correct"] = r["prediction"] == gold
        elif e.answer is not None and r.get("pred_text") is not None:
            row["correct"] = metrics.normalise_text(r["pred_text"]) == metrics.normalise_text(e.answer)
        rows.append(row)
    return rows


def evaluate(tm: TaskModel, examples: list[Example], batch_size: int, device: str = "cpu") -> tuple[float, dict]:
    """(p, metrics) of rendered examples."""
    score, mets, _ = evaluate_template(tm, examples, batch_size, device)
    return score, mets


def evaluate_template(tm: TaskModel, examples: list[Example], batch_size: int, device: str = "cpu",
                      template: str = BASE, split: str = "eval") -> tuple[float, dict, list[dict[str, Any]]]:
    records = score_examples(tm, examples, batch_size, device)
    spec = tm.task
    score, mets = metrics.compute(spec, [answer(r) for r in records], TaskModel.gold(examples))
    return score, mets, prediction_rows(spec.name, template, split, examples, records)


def evaluate_prompts(tm: TaskModel, examples: list[Example], templates: list[PromptTemplate], batch_size: int,
                     device: str = "cpu") -> tuple[float, dict, list[dict[str, Any]]]:
    """The mean score over the templates (zero-shot evaluation averages over prompts), each template's
    score and metrics kept in the run's metrics, and every (example, template)'s predictions row."""
    per = [evaluate_template(tm, [t.render(e) for e in examples], batch_size, device, template=t.name)
           for t in templates]
    means = {k: float(np.mean([m[k] for _, m, _ in per])) for k in per[0][1]}
    rows = [r for _, _, rs in per for r in rs]
    return float(np.mean([s for s, _, _ in per])), {**means, "prompts": [t.name for t in templates],
                                                    "prompt_scores": [s for s, _, _ in per],
                                                    "prompt_metrics": [m for _, m, _ in per]}, rows


# -- recipe steps ----------------------------------------------------------------------------------------
@dataclass
class TrialData:
    """What one trial trains and evaluates on, rendered with its prompt templates."""

    train_spec: TaskSpec
    eval_spec: TaskSpec
    train: list[Example]  # rendered with the training template(s)
    eval: list[Example]  # raw: rendered per evaluation template
    eval_templates: list[PromptTemplate]
    origins: list[str]


@dataclass
class FitResult:
    backend: Any
    steps: int
    micro_batch: int
    losses: list[float]
    train_time_s: float
    #: periodic evaluation (train.eval_every): n_validation, validation_curve [[step, score], ...],
    #: best_step, best_validation_score; empty when off
    validation: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    score: float
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


def prepare_data(trial: TrialSpec) -> TrialData:
    """Step 1: the trial's training sample and evaluation pool (deterministic in seed and split seed)."""
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    split = dict(seed=trial.seed, eval_fraction=trial.eval_fraction, split_seed=trial.split_seed)
    fam = trial.setup.model.family
    train_tpl = trial.setup.prompts.train
    if trial.sources:  # multi-task: n_train examples from each source; the target is evaluated zero-shot
        train_data = load_mixture(registry, trial.sources, trial.eval_task, trial.n_train, **split,
                                  render=lambda spec, exs: render_train(exs, resolve(spec, train_tpl, fam), trial.seed))
        train = list(train_data.train)
    else:
        train_data = registry.load_data(trial.train_task, trial.n_train, trial.n_eval, **split)
        train = render_train(train_data.train, resolve(train_data.spec, train_tpl, fam), trial.seed)
    eval_data = train_data if trial.eval_task == trial.train_task else registry.load_data(
        trial.eval_task, 0, trial.n_eval, **split)
    return TrialData(train_data.spec, eval_data.spec, train, list(eval_data.eval),
                     resolve(eval_data.spec, trial.setup.prompts.eval, fam), [train_data.origin, eval_data.origin])


def prepare_model(trial: TrialSpec, data: TrialData, ctx: TrainContext | None = None) -> TaskModel:
    """Step 2: the model with its adaptation, initialised from the source checkpoint for a transfer.

    A ZeRO-3 trial's pretrained model is built partitioned across the ranks (`zero.Init`, see
    `deepspeed_backend.model_init_context`), so no worker holds it whole."""
    setup = trial.setup
    torch.manual_seed(trial.seed)  # head initialisation
    with _model_init_context(trial, ctx or TrainContext()) as partitioned:
        tm = build_task_model(setup.model, setup.adaptation, data.train_spec)
        if trial.source_run_key:
            from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

            folder = ResultStore(trial.results_dir).checkpoint_dir(trial.source_run_key)
            if partitioned:
                load_into_partitioned(tm.module, folder, skip=tm.is_head)
            else:
                tm.load(folder)
    if trial.hparams.gradient_checkpointing and hasattr(tm.module, "gradient_checkpointing_enable"):
        # non-reentrant (transformers 5's default, explicit for 4.x): with a frozen embedding (PEFT
        # methods) the reentrant variant drops the gradients of trainable parameters in checkpointed blocks
        tm.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tm


def _model_init_context(trial: TrialSpec, ctx: TrainContext) -> Any:
    if trial.setup.deepspeed is None or trial.setup.deepspeed.stage != 3:
        return contextlib.nullcontext(False)

    return model_init_context(trial, ctx)


def validation_split(examples: list[Example], trial: TrialSpec) -> tuple[list[Example], list[Example]]:
    """(training, validation): `train.validation`'s examples held out of the training sample, drawn with
    the trial's seed (a transfer and its baseline hold out the same ones); the rest keep their order."""
    spec = trial.hparams.validation
    if spec is None:
        return examples, []
    n = spec.size(len(examples))
    if n >= len(examples):
        raise ValueError(f"train.validation holds out {n} of {len(examples)} training examples of "
                         f"{trial.train_task!r}: none would be left to train on")
    order = list(range(len(examples)))
    random.Random(f"validation:{trial.seed}").shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class _BestStep:
    """The validation curve and the trainable state of its best step (the first of equal scores)."""

    def __init__(self, tm: TaskModel, examples: list[Example], batch_size: int, device: str):
        self.tm, self.examples, self.batch_size, self.device = tm, examples, batch_size, device
        self.curve: list[list[float]] = []
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, step: int, backend: Any) -> None:
        score, _ = evaluate(self.tm, self.examples, self.batch_size, self.device)
        self.tm.module.train()
        self.curve.append([step, float(score)])
        if not math.isnan(score) and (self.best_score is None or score > self.best_score):
            self.best_step, self.best_score, self.state = step, float(score), backend.snapshot()

    def summary(self) -> dict[str, Any]:
        return {"n_validation": len(self.examples), "validation_curve": self.curve, "best_step": self.best_step,
                "best_validation_score": self.best_score}



def make_backend(tm: TaskModel, hp: TrainSpec, setup: SetupSpec, ctx: Any, total_steps: int, micro: int) -> Any:
    if setup.deepspeed is not None or getattr(ctx, "world_size", 1) > 1:
        unsupported = [f for f, v in (("optimizer: adafactor", hp.optimizer == "adafactor"),
                                      ("eval_every", hp.eval_every is not None)) if v]
        if unsupported:
            raise ValueError(f"setup {setup.key!r}: train {' and '.join(unsupported)} run in a single process "
                             "only, not under DeepSpeed / several workers (its engine owns the optimiser and "
                             "shards the parameters)")
    if setup.deepspeed is not None:
        return DeepSpeedBackend(tm, hp, setup.deepspeed, ctx, total_steps, micro)

    return TorchBackend(tm, hp, total_steps)


def fit(tm: TaskModel, examples: list[Example], trial: TrialSpec, ctx: TrainContext,
        batcher: Batcher | None = None) -> FitResult:
    """Step 3: the optimisation loop.

    `batcher` makes each epoch's global batches (default: the shuffled list cut in order); multi-task
    learning passes one that keeps every batch within one task (rayjobs/mtl.py).

    Sharding: every rank shuffles the whole list with the same seed and takes its slice of each
    global micro-batch (micro * world_size examples), so an optimiser step sees the same global
    batch for any world size; with world_size 1 this is exactly the single-process order. A last
    global batch smaller than world_size is dropped (every rank must run the same number of passes).

    Periodic evaluation (`train.eval_every` with `train.validation`): every N optimiser steps and after
    the last one, the task metric on examples held out of the training sample; the state of the best
    step is restored at the end, so the evaluation and the checkpoint are those of the best step.
    """

    hp = trial.hparams
    examples, held_out = validation_split(examples, trial)
    micro = max(1, hp.batch_size // (ctx.world_size * hp.grad_accum_steps))
    steps_per_epoch = math.ceil(len(examples) / (micro * ctx.world_size * hp.grad_accum_steps))
    total_steps = max(1, math.ceil(steps_per_epoch * hp.epochs))
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    backend = make_backend(tm, hp, trial.setup, ctx, total_steps, micro)
    validate = _BestStep(tm, held_out, hp.eval_batch_size, ctx.device) if hp.eval_every else None

    rng = random.Random(trial.seed)
    step, losses, t_train = 0, [], time.time()
    epoch = 0
    while step < total_steps:
        tm.module.train()
        batches = [g[len(g) * ctx.rank // ctx.world_size:len(g) * (ctx.rank + 1) // ctx.world_size]
                   for g in (batcher or _batches)(examples, micro * ctx.world_size, rng) if len(g) >= ctx.world_size]
        for i, chunk in enumerate(batches):
            loss = tm.loss(_to(tm.collate(chunk), ctx.device)) / hp.grad_accum_steps
            backend.backward(loss)
            losses.append(float(loss.detach()) * hp.grad_accum_steps)
            if (i + 1) % hp.grad_accum_steps == 0 or i == len(batches) - 1:
                backend.step()
                step += 1
                if validate is not None and hp.eval_every and step % hp.eval_every == 0:
                    validate(step, backend)
                    if ctx.report and ctx.rank == 0:
                        ctx.report({"step": step, "epoch": epoch, "validation_score": validate.curve[-1][1],
                                    "validation_curve": list(validate.curve)})
                if step >= total_steps:
                    break
        epoch += 1
        if ctx.progress:
            ctx.progress({"epoch": epoch, "step": step, "loss": float(np.mean(losses[-len(batches):]))})
    if validate is None:
        return FitResult(backend, step, micro, losses, time.time() - t_train)
    if not validate.curve or validate.curve[-1][0] != step:
        validate(step, backend)
    if validate.state is not None and validate.best_step != step:
        backend.restore(validate.state)
    return FitResult(backend, step, micro, losses, time.time() - t_train, validation=validate.summary())


def evaluate_trial(tm: TaskModel, data: TrialData, trial: TrialSpec, ctx: TrainContext) -> EvalResult:
    """Step 4: the evaluation pool under every evaluation template, with one predictions row each."""
    score, mets, rows = evaluate_prompts(tm, data.eval, data.eval_templates, trial.hparams.eval_batch_size,
                                         ctx.device)
    return EvalResult(float(score), mets, rows)


def save_checkpoint(fitted: FitResult, trial: TrialSpec, data: TrialData, ctx: TrainContext) -> str | None:
    """Step 5: the trained parameters of a source run (every rank takes part under ZeRO-3; rank 0 writes)."""
    if not trial.save_checkpoint:
        return None
    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

    folder = ResultStore(trial.results_dir).checkpoint_dir(trial.run_key)
    setup = trial.setup
    # enough to rebuild the model from the checkpoint alone (serving a stored run, embeddings)
    meta = {"run_key": trial.run_key, "task": trial.train_task, "setup": setup.key,
            "adaptation": setup.adaptation.method, "setup_spec": setup.model_dump(mode="json"),
            "task_spec": data.train_spec.model_dump(mode="json")}
    saved = fitted.backend.save(folder, meta if ctx.rank == 0 else None)
    return str(saved) if ctx.rank == 0 else None


def result_row(trial: TrialSpec, data: TrialData, tm: TaskModel, fitted: FitResult, ev: EvalResult,
               checkpoint: str | None, ctx: TrainContext, t0: float) -> dict[str, Any]:
    """Step 6: the `runs` row (plus the loss curve and predictions, which the trial stores apart)."""
    setup, hp = trial.setup, trial.hparams
    trainable, total = tm.param_counts()
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": trial.kind, "setup": setup.key,
        "model": setup.model.name, "adaptation": setup.adaptation.method,
        "source": trial.source, "target": trial.target, "sources": trial.sources, "seed": trial.seed,
        "source_run_key": trial.source_run_key, "baseline_run_key": trial.baseline_run_key,
        "n_train": len(data.train) - fitted.validation.get("n_validation", 0), "n_eval": len(data.eval),
        "hparams": {**hp.model_dump(), "world_size": ctx.world_size, "micro_batch": fitted.micro_batch,
                    "steps": fitted.steps, "data": data.origins,
                    **({"source_seed": trial.source_seed} if trial.source_seed is not None else {})},
        "metric": data.eval_spec.metric,
        "score": ev.score, "metrics": {**ev.metrics, "final_train_loss": float(np.mean(fitted.losses[-10:])),
                                       **fitted.validation},
        "trainable_params": trainable, "total_params": total,
        "train_time_s": fitted.train_time_s, "wall_time_s": time.time() - t0,
        "host": socket.gethostname(), "checkpoint": checkpoint, "status": "ok",
        "loss_curve": fitted.losses, "predictions": ev.predictions,
    }


def begin_trial(trial: TrialSpec, ctx: TrainContext | None) -> TrainContext:
    """An executor's first step: every RNG seeded from the trial; the context it was given, or one process's."""
    seed_everything(trial.seed)
    return ctx or TrainContext()


def trial_device(trial: TrialSpec, ctx: Any) -> str:
    """The GPU when the setup asks for one and the worker has it, else the context's device (a Ray Train
    worker's context already names its GPU)."""
    if str(ctx.device) == "cpu" and trial.setup.resources.gpu > 0 and torch.cuda.is_available():
        return "cuda"
    return str(ctx.device)


def train_and_evaluate(trial: TrialSpec, ctx: TrainContext | None = None) -> dict[str, Any]:
    """Train one stage and evaluate it; returns the result row (without bookkeeping columns)."""
    ctx = ctx or TrainContext()
    ctx = dataclasses.replace(ctx, device=trial_device(trial, ctx))
    t0 = time.time()
    seed_everything(trial.seed)
    data = prepare_data(trial)
    tm = prepare_model(trial, data, ctx)
    if trial.setup.deepspeed is None:  # DeepSpeed's engine places (and partitions) the model itself
        tm.module.to(ctx.device)
    fitted = fit(tm, data.train, trial, ctx)
    tm_eval = fitted.backend.model_for_eval()
    ev = evaluate_trial(tm_eval, data, trial, ctx)
    ckpt = save_checkpoint(fitted, trial, data, ctx)
    return result_row(trial, data, tm, fitted, ev, ckpt, ctx, t0)
