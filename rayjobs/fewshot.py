"""Few-shot LLM baseline (paper 003, section 4.2 and Tables 7-8): k-shot prompting, no training.

    transferlab run configs/fewshot_llama2.yaml [--results DIR] [--smoke] [KEY=VALUE ...]

Per (setup, task, seed) one run of kind `fewshot`: k demonstrations drawn with the seed from the
task's training sample (the same `sizes.train` sample a fine-tuned run of that seed trains on, so
never from the held-out pool) are written before every held-out example, each rendered with the
evaluation template and followed by its verbalised answer, separated by `separator`. The model
scores the prompt by rank classification (`TaskModel.score` of a seq2seq or causal model: every
choice's log-likelihood given the prompt) and the rows go to `predictions` like a fine-tuned run's.

`shots: classes` is the paper's choice (shots = number of classes): one demonstration per class, the
first of that class in the seeded sample, in label order (the order of the paper's Table 17);
`shots: k` takes the first k of the seeded sample, whatever their labels.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from analysis.store.results import ResultStore
from rayjobs.config import AdaptationSpec, ConfigError, JobConfig
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setup
from rayjobs.engine.smoke import shrink_per_task
from rayjobs.job import Job, Plan, check_choice_tasks
from rayjobs.models.loading import ModelError
from rayjobs.plan import TrialSpec, prompt_identity, trial_key
from rayjobs.pvi import TaskSizes
from rayjobs.tasks.registry import Example, TaskError, TaskRegistry, TaskSpec
from rayjobs.tasks.templates import PromptTemplate, resolve

Shots = int | Literal["classes"]


class FewshotConfig(JobConfig):
    """Tasks scored k-shot by every setup (a seq2seq or causal LM, used as it is) and seed."""

    job: Literal["fewshot"] = "fewshot"
    tasks: list[str] = Field(min_length=1)
    shots: Shots = Field(default="classes", description="`classes`: one per class (the paper); k: k drawn by seed")
    separator: str = Field(default="\n\n", description="between demonstrations, and before the query")
    sizes: TaskSizes = TaskSizes()  # type: ignore[assignment]

    @field_validator("shots")
    @classmethod
    def _positive(cls, v: Shots) -> Shots:
        if isinstance(v, int) and v < 0:
            raise ValueError("shots must be `classes` or a number >= 0")
        return v


class FewShotTemplate(PromptTemplate):
    """A template whose rendering starts with the demonstrations (`prefix`)."""

    prefix: str = ""

    def render(self, ex: Example) -> Example:
        r = super().render(ex)
        return dataclasses.replace(r, text=self.prefix + r.text)


def pick_demos(pool: list[Example] | tuple[Example, ...], shots: Shots, spec: TaskSpec) -> list[Example]:
    """The demonstrations: one per class in label order (`classes`), or the first k of the seeded pool."""
    if shots == "classes":
        if not spec.choices:
            raise TaskError(f"task {spec.name!r} has no fixed label set: `shots: classes` needs one (give a number)")
        first = {}
        for e in pool:
            first.setdefault(e.label, e)
        missing = [spec.choices[i] for i in range(len(spec.choices)) if i not in first]
        if missing:
            raise TaskError(f"task {spec.name!r}: no training example of class {missing} in the sample to show "
                            "(raise sizes.train)")
        return [first[i] for i in range(len(spec.choices))]
    if shots > len(pool):
        raise TaskError(f"task {spec.name!r}: {shots} shots asked for, the training sample has {len(pool)}")
    return list(pool[:shots])


def fewshot_template(template: PromptTemplate, demos: list[Example], separator: str) -> FewShotTemplate:
    """`template` with the demonstrations, each rendered by it and answered with its verbalised gold choice."""
    shown = [template.render(d) for d in demos]
    prefix = "".join(f"{r.text} {r.target_text}{separator}" for r in shown)
    return FewShotTemplate(**template.model_dump(), prefix=prefix)


# -- plan ------------------------------------------------------------------------------------------------
def check_fewshot(cfg: FewshotConfig, registry: TaskRegistry) -> None:
    where = cfg.source_file
    specs = check_choice_tasks(where, cfg.tasks, registry, "the few-shot baseline ranks answer choices")
    for t, spec in specs.items():
        if cfg.shots == "classes" and not spec.choices:
            raise ConfigError(f"{where}: field `shots`: task {t!r} has no fixed label set; give a number of shots")
    for i, setup in enumerate(cfg.setups):
        if setup.model.family == "encoder":
            raise ConfigError(f"{where}: field `setups.{i}.model.family`: few-shot prompting needs a language model "
                              "(seq2seq or causal)")
        if setup.adaptation.method != "full" or setup.adaptation.params:
            raise ConfigError(f"{where}: field `setups.{i}.adaptation`: a few-shot baseline trains nothing; leave "
                              "the adaptation out")
        if setup.resources.workers > 1 or setup.deepspeed is not None:
            raise ConfigError(f"{where}: field `setups.{i}`: a few-shot run is one process (drop `deepspeed` and "
                              "`resources.workers`)")
        try:
            check_setup(setup, list(cfg.tasks), registry)
        except (ModelError, TaskError) as e:
            raise ConfigError(f"{where}: field `setups.{i}`: {e}") from None


def expand_fewshot(cfg: FewshotConfig, registry: TaskRegistry, results_dir: str) -> list[TrialSpec]:
    sz = cfg.sizes
    split = dict(n_eval=sz.eval, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed)
    trials = []
    for setup in cfg.setups:
        for task in cfg.tasks:
            data = f"{registry.origin(task)}|{prompt_identity(setup, registry.get(task))}"
            shown = f"{data}|shots={cfg.shots}|separator={cfg.separator!r}"
            for seed in cfg.seeds:
                key = trial_key(kind="fewshot", setup=setup, hparams=setup.train, train_task=task, train_origin=shown,
                                eval_task=task, eval_origin=data, seed=seed, n_train=sz.train, **split)
                trials.append(TrialSpec(run_key=key, experiment=cfg.name, kind="fewshot", executor="rayjobs.fewshot:score_fewshot",
                                        setup=setup, hparams=setup.train, train_task=task, eval_task=task,
                                        target=task, seed=seed, n_train=sz.train, data_root=cfg.data_root,
                                        task_files=list(cfg.task_files), results_dir=results_dir,
                                        params={"shots": cfg.shots, "separator": cfg.separator}, **split))
    return trials


# -- the trial's executor (TrialSpec.executor) ------------------------------------------------------
def score_fewshot(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    """Build the model, score the held-out pool k-shot under every evaluation template; nothing is trained."""
    import torch  # lazy: torch stays out of CLI start-up

    from rayjobs.models import build_task_model  # lazy: torch stays out of CLI start-up
    from rayjobs.train.loop import (  # lazy: the train loop (scipy) only in the trial's worker
        EvalResult,
        FitResult,
        TrialData,
        begin_trial,
        evaluate_prompts,
        result_row,
        trial_device,
    )

    t0 = time.time()
    ctx = begin_trial(trial, ctx)
    task, shots, separator = trial.eval_task, trial.params["shots"], trial.params["separator"]
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    data = registry.load_data(task, trial.n_train, trial.n_eval, seed=trial.seed, eval_fraction=trial.eval_fraction,
                              split_seed=trial.split_seed)
    demos = pick_demos(data.train, shots, data.spec)
    setup = trial.setup
    tm = build_task_model(setup.model, AdaptationSpec(), data.spec)
    device = trial_device(trial, ctx)
    tm.module.to(device=device, dtype=getattr(torch, setup.model.dtype))
    ctx = dataclasses.replace(ctx, device=device)
    templates = [fewshot_template(t, demos, separator) for t in resolve(data.spec, setup.prompts.eval,
                                                                        setup.model.family)]
    score, mets, rows = evaluate_prompts(tm, list(data.eval), templates, trial.hparams.eval_batch_size, device)
    fitted = FitResult(backend=None, steps=0, micro_batch=0, losses=[], train_time_s=0.0)
    with warnings.catch_warnings():  # no training loss: its mean over nothing is NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        row = result_row(trial, TrialData(data.spec, data.spec, demos, list(data.eval), templates, [data.origin]),
                         tm, fitted, EvalResult(float(score), mets, rows), None, ctx, t0)
    row.update(adaptation="none", trainable_params=0)  # used as it is
    row["metrics"] = {k: v for k, v in row["metrics"].items() if k != "final_train_loss"}
    row["metrics"]["demos"] = [d.uid for d in demos]
    row["metrics"].update(accuracy_and_macro_f1(rows, len(data.spec.choices or [])))
    row["hparams"] = {**row["hparams"], "shots": shots, "separator": separator}
    return row


def accuracy_and_macro_f1(rows: list[dict[str, Any]], n_classes: int) -> dict[str, float]:
    """Paper 003 reports both for every task (Tables 7-8): accuracy and macro-F1 (`rayjobs.tasks.metrics.f1`) over
    the labelled held-out rows, per template and then averaged over the templates."""
    from rayjobs.tasks import metrics  # lazy: scipy only when a trial scores

    by_tpl: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        if r.get("gold") is not None and r.get("prediction") is not None:
            by_tpl.setdefault(r["template"], []).append((int(r["prediction"]), int(r["gold"])))
    if not by_tpl or n_classes < 2:
        return {}
    acc, mf1 = [], []
    for pairs in by_tpl.values():
        p, g = np.array([x for x, _ in pairs]), np.array([y for _, y in pairs])
        acc.append(float(np.mean(p == g)))
        mf1.append(metrics.f1(p.tolist(), g.tolist(), "macro"))  # over the classes present, as sklearn
    return {"accuracy": float(np.mean(acc)), "macro_f1": float(np.mean(mf1))}


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: Any) -> Any:
    """2 tasks (local data first), demonstrations from 24 training examples, 16 held-out, one seed."""
    return shrink_per_task(cfg, train=24, eval=16)


class FewshotJob(Job, kind="fewshot", config=FewshotConfig):
    def plan(self, cfg: FewshotConfig, store: ResultStore) -> Plan:
        registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
        check_fewshot(cfg, registry)
        trials = expand_fewshot(cfg, registry, str(store.root))
        return Plan(trials, summary=f"{len(trials)} runs", view="runs")

    def report(self, cfg: FewshotConfig, store: ResultStore) -> list[str]:
        with store.connect(read_only=True) as con:
            rows = con.execute("SELECT setup, target, count(*), avg(score), avg((metrics->>'$.accuracy')::DOUBLE), "
                               "avg((metrics->>'$.macro_f1')::DOUBLE) FROM runs WHERE kind = 'fewshot' AND "
                               "status = 'ok' AND experiment = ? GROUP BY ALL ORDER BY ALL", [cfg.name]).fetchall()
        if not rows:
            return []

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        return ["Few-shot scores (mean over seeds): task metric, accuracy, macro-F1 (paper 003 reports both):",
                *(f"{setup:24s} {task:12s} seeds={n} {fmt(score)} acc={fmt(acc)} macro_f1={fmt(f1)}"
                  for setup, task, n, score, acc, f1 in rows)]


JOB = FewshotJob()
main = module_entry(JOB.kind, __name__)
