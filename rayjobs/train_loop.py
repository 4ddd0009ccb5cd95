"""The one training and evaluation loop, for every model family, adaptation method and stage.

A plain torch loop rather than HF Trainer: it is a few dozen lines we fully control (seeding and
data order for CPU determinism, exactly-which-parameters-train, adapter-only checkpoints), it runs
unchanged inside a Ray Train worker, and DeepSpeed plugs in as an engine that replaces
backward/step (see `backend.py`) instead of through Trainer's own integration.
"""

from __future__ import annotations

import math
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rayjobs import metrics
from rayjobs.mixture import load_mixture
from rayjobs.models import TaskModel, build_task_model
from rayjobs.plan import TrialSpec
from rayjobs.tasks import Example, TaskRegistry
from rayjobs.templates import PromptTemplate, render_train, resolve


@dataclass
class TrainContext:
    """Where the loop runs: a single process, or one rank of a Ray Train / DeepSpeed group."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    progress: Any = None  # callable(dict) for per-epoch reports (Tune/Train), optional
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _batches(examples: list[Example], size: int, rng: random.Random | None) -> list[list[Example]]:
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [[examples[i] for i in order[j:j + size]] for j in range(0, len(order), size)]


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def evaluate(tm: TaskModel, examples: list[Example], batch_size: int, device: str = "cpu") -> tuple[float, dict]:
    tm.module.eval()
    preds: list[Any] = []
    for chunk in _batches(examples, batch_size, None):
        preds.extend(tm.predict(_to(tm.collate(chunk), device)))
    spec = tm.task  # type: ignore[attr-defined]
    return metrics.compute(spec, preds, TaskModel.gold(examples))


def evaluate_prompts(tm: TaskModel, examples: list[Example], templates: list[PromptTemplate], batch_size: int,
                     device: str = "cpu") -> tuple[float, dict]:
    """The mean score over the templates (zero-shot evaluation averages over prompts), each template's
    score and metrics kept in the run's metrics."""
    per = [evaluate(tm, [t.render(e) for e in examples], batch_size, device) for t in templates]
    means = {k: float(np.mean([m[k] for _, m in per])) for k in per[0][1]}
    return float(np.mean([s for s, _ in per])), {**means, "prompts": [t.name for t in templates],
                                                 "prompt_scores": [s for s, _ in per],
                                                 "prompt_metrics": [m for _, m in per]}


def train_and_evaluate(trial: TrialSpec, ctx: TrainContext | None = None) -> dict[str, Any]:
    """Train one stage and evaluate it; returns the result row (without bookkeeping columns)."""
    ctx = ctx or TrainContext()
    t0 = time.time()
    seed_everything(trial.seed)
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    split = dict(seed=trial.seed, eval_fraction=trial.eval_fraction, split_seed=trial.split_seed)
    setup = trial.setup
    fam = setup.model.family
    if trial.sources:  # multi-task: n_train examples from each source; the target is evaluated zero-shot
        train_data = load_mixture(registry, trial.sources, trial.eval_task, trial.n_train, **split,
                                  render=lambda spec, exs: render_train(exs, resolve(spec, setup.prompts.train, fam),
                                                                        trial.seed))
    else:
        train_data = registry.load_data(trial.train_task, trial.n_train, trial.n_eval, **split)
    eval_data = train_data if trial.eval_task == trial.train_task else registry.load_data(
        trial.eval_task, 0, trial.n_eval, **split)
    eval_examples = list(eval_data.eval)

    torch.manual_seed(trial.seed)  # head initialisation
    tm = build_task_model(setup.model, setup.adaptation, train_data.spec)
    if trial.source_run_key:
        from analysis.store import ResultStore

        tm.load(ResultStore(trial.results_dir).checkpoint_dir(trial.source_run_key))
    if trial.hparams.gradient_checkpointing and hasattr(tm.module, "gradient_checkpointing_enable"):
        # non-reentrant (transformers 5's default, explicit for 4.x): with a frozen embedding (PEFT
        # methods) the reentrant variant drops the gradients of trainable parameters in checkpointed blocks
        tm.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    from rayjobs.backend import make_backend

    hp = trial.hparams
    examples = list(train_data.train) if trial.sources else render_train(
        train_data.train, resolve(train_data.spec, setup.prompts.train, fam), trial.seed)
    # Sharding: every rank shuffles the whole list with the same seed and takes its slice of each
    # global micro-batch (micro * world_size examples), so an optimiser step sees the same global
    # batch for any world size; with world_size 1 this is exactly the single-process order. A last
    # global batch smaller than world_size is dropped (every rank must run the same number of passes).
    micro = max(1, hp.batch_size // (ctx.world_size * hp.grad_accum_steps))
    steps_per_epoch = math.ceil(len(examples) / (micro * ctx.world_size * hp.grad_accum_steps))
    total_steps = max(1, math.ceil(steps_per_epoch * hp.epochs))
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    backend = make_backend(tm, hp, setup, ctx, total_steps, micro)

    rng = random.Random(trial.seed)
    step, losses, t_train = 0, [], time.time()
    epoch = 0
    while step < total_steps:
        tm.module.train()
        batches = [g[len(g) * ctx.rank // ctx.world_size:len(g) * (ctx.rank + 1) // ctx.world_size]
                   for g in _batches(examples, micro * ctx.world_size, rng) if len(g) >= ctx.world_size]
        for i, chunk in enumerate(batches):
            loss = tm.loss(_to(tm.collate(chunk), ctx.device)) / hp.grad_accum_steps
            backend.backward(loss)
            losses.append(float(loss.detach()) * hp.grad_accum_steps)
            if (i + 1) % hp.grad_accum_steps == 0 or i == len(batches) - 1:
                backend.step()
                step += 1
                if step >= total_steps:
                    break
        epoch += 1
        if ctx.progress:
            ctx.progress({"epoch": epoch, "step": step, "loss": float(np.mean(losses[-len(batches):]))})
    train_time = time.time() - t_train

    score, all_metrics = evaluate_prompts(backend.model_for_eval(), eval_examples,
                                          resolve(eval_data.spec, setup.prompts.eval, fam), hp.eval_batch_size,
                                          ctx.device)
    checkpoint = None
    if trial.save_checkpoint:
        from analysis.store import ResultStore

        folder = ResultStore(trial.results_dir).checkpoint_dir(trial.run_key)
        if ctx.rank == 0:
            checkpoint = str(backend.save(folder, {"run_key": trial.run_key, "task": trial.train_task,
                                                   "setup": setup.key, "adaptation": setup.adaptation.method}))
        else:
            backend.save(folder, None)
    trainable, total = tm.param_counts()
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": trial.kind, "setup": setup.key,
        "model": setup.model.name, "adaptation": setup.adaptation.method,
        "source": trial.source, "target": trial.target, "sources": trial.sources, "seed": trial.seed,
        "source_run_key": trial.source_run_key, "baseline_run_key": trial.baseline_run_key,
        "n_train": len(examples), "n_eval": len(eval_examples),
        "hparams": {**hp.model_dump(), "world_size": ctx.world_size, "micro_batch": micro, "steps": step,
                    "data": [train_data.origin, eval_data.origin]},
        "metric": eval_data.spec.metric,
        "score": float(score), "metrics": {**all_metrics, "final_train_loss": float(np.mean(losses[-10:]))},
        "trainable_params": trainable, "total_params": total,
        "train_time_s": train_time, "wall_time_s": time.time() - t0,
        "host": socket.gethostname(), "checkpoint": checkpoint, "status": "ok",
        "loss_curve": losses,
    }

