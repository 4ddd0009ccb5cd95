"""Bulk scoring job: black boxes (model + prompt) over a task split or an unlabelled pool, per-example rows.

    transferlab run configs/score_minilm_prompts.yaml [--results DIR] [--smoke] [KEY=VALUE ...]

One trial per (model, task, template, seed), keyed by everything that fixes its output (the model
reference, the template's content, the task data, the split and sample); each writes one `predictions`
row per example and a `runs` row of kind 'score' (score = accuracy over the labelled examples, the task
metric where one applies). The prompt-selection baselines, FUTE's model task embeddings and PVI read
these rows; nothing computes a second inference path. Re-running skips stored keys.

Splits: `eval` (the task's held-out pool), `train` (a seeded sample of the training pool), `pool` (the
same sample with labels dropped: an unlabelled probe pool; `gold` is NULL in its rows).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from analysis.store.results import ResultStore
from rayjobs.config import ConfigError, JobConfig, ModelSpec, ResourceSpec, SetupSpec, _Strict
from rayjobs.engine.driver import module_entry
from rayjobs.engine.smoke import has_local_data
from rayjobs.job import Job, Plan
from rayjobs.plan import TrialSpec, run_key
from rayjobs.tasks.registry import TaskError, TaskRegistry
from rayjobs.tasks.templates import BASE, IDENTITY, PromptTemplate, coerce_templates, task_templates


class BlackBoxSpec(_Strict):
    """A model to score with; see rayjobs/scoring/blackbox.py for the reference forms."""

    name: str = Field(description="name in results (runs.model)")
    ref: str = Field(description="builtin:minilm | sentence:<path> | run:<key> | http(s)://.../v1#model | hub id/folder")
    temperature: float | None = Field(default=None, gt=0, description="sentence scorer: softmax temperature")
    max_length: int = Field(default=512, gt=0)


class ScoreConfig(JobConfig):
    job: Literal["score"] = "score"
    models: list[BlackBoxSpec] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    templates: str | list[PromptTemplate] = Field(
        default="all", description="'all' / 'input' / a template name of every task, or a list of templates")
    split: Literal["eval", "train", "pool"] = "eval"
    n: int | None = Field(default=200, gt=0, description="examples per task (None: the whole split)")
    generate: bool = Field(default=False, description="also store greedy generations (pred_text)")
    perplexity: bool = Field(default=False, description="also store each rendered prompt's perplexity (SPELL)")
    self_select: bool = Field(default=False, description="also ask each model through a meta-prompt which of the "
                                                         "templates to use (Self-Select, rayjobs/scoring/self_select.py)")
    results_store: str | None = Field(default=None, description="results folder holding run:<key> checkpoints "
                                                                "(default: this job's results folder)")
    resources: ResourceSpec = ResourceSpec()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    input_paths: ClassVar[tuple[str, ...]] = ("data_root", "task_files", "results_store")

    @field_validator("templates", mode="before")
    @classmethod
    def _coerce(cls, v: Any) -> Any:
        return coerce_templates(v)


def _templates(cfg: ScoreConfig, spec: Any) -> list[PromptTemplate]:
    if isinstance(cfg.templates, list):
        return list(cfg.templates)
    if cfg.templates == "all":
        return task_templates(spec)
    if cfg.templates == BASE:
        return [IDENTITY]
    named = [t for t in task_templates(spec) if t.name == cfg.templates]
    if not named:
        raise ValueError(f"task {spec.name!r} has no template {cfg.templates!r}")
    return named


def expand_score(cfg: ScoreConfig, registry: TaskRegistry, results_dir: str) -> list[TrialSpec]:
    trials = []
    sz = cfg.sizes
    store = cfg.results_store or results_dir
    for m in cfg.models:
        setup = SetupSpec(name=m.name, model=ModelSpec(name=m.name, path=m.ref, max_length=m.max_length),
                          resources=cfg.resources)
        for task in cfg.tasks:
            spec = registry.get(task)
            origin = registry.origin(task)
            for tpl in _templates(cfg, spec):
                for seed in cfg.seeds:
                    params = {"ref": m.ref, "temperature": m.temperature, "max_length": m.max_length,
                              "template": tpl.model_dump(), "split": cfg.split, "n": cfg.n,
                              "generate": cfg.generate, "perplexity": cfg.perplexity}
                    key = run_key({"kind": "score", "params": params, "task": [task, origin], "seed": seed,
                                   "split": [sz.eval_fraction, sz.split_seed]})
                    trials.append(_scoring_trial(cfg, "score", "rayjobs.score:score_trial", key, setup, task, seed,
                                                 params, str(store)))
            if cfg.self_select:
                trials += _self_select_trials(cfg, m, setup, task, origin, _templates(cfg, spec), str(store))
    return trials


def _scoring_trial(cfg: ScoreConfig, kind: str, executor: str, key: str, setup: SetupSpec, task: str, seed: int,
                   params: dict[str, Any], store: str) -> TrialSpec:
    """A trial that scores `task`'s split with a black box (no training): `cfg.n` examples of `cfg.split`."""
    sz = cfg.sizes
    return TrialSpec(run_key=key, experiment=cfg.name, kind=kind, executor=executor, setup=setup,
                     hparams=setup.train, train_task=task, eval_task=task, target=task, seed=seed,
                     n_train=cfg.n if cfg.split != "eval" else 0, n_eval=cfg.n if cfg.split == "eval" else None,
                     eval_fraction=sz.eval_fraction, split_seed=sz.split_seed, data_root=cfg.data_root,
                     task_files=list(cfg.task_files), results_dir=store, params=params)


def _self_select_trials(cfg: ScoreConfig, m: BlackBoxSpec, setup: SetupSpec, task: str, origin: Any,
                        templates: list[PromptTemplate], store: str) -> list[TrialSpec]:
    """One Self-Select trial per seed: the model picks among all the task's templates (rayjobs.scoring.self_select)."""
    sz = cfg.sizes
    params = {"ref": m.ref, "temperature": m.temperature, "max_length": m.max_length,
              "templates": [t.model_dump() for t in templates], "split": cfg.split, "n": cfg.n}
    out = []
    for seed in cfg.seeds:
        key = run_key({"kind": "self_select", "params": params, "task": [task, origin], "seed": seed,
                       "split": [sz.eval_fraction, sz.split_seed]})
        out.append(_scoring_trial(cfg, "self_select", "rayjobs.scoring.self_select:self_select_trial", key, setup,
                                  task, seed, params, store))
    return out


def split_examples(trial: TrialSpec) -> tuple[Any, list[Any]]:
    """The task data and the examples a scoring trial reads: its task's eval split, or its training pool (`split` other than
    eval), drawn with the trial's seeds like a training trial's."""
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    split = trial.params["split"]
    data = registry.load_data(trial.eval_task, trial.n_train if split != "eval" else 0, trial.n_eval,
                              seed=trial.seed, eval_fraction=trial.eval_fraction, split_seed=trial.split_seed)
    return data, list(data.eval if split == "eval" else data.train)


def score_trial(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    """Executor of one score trial: load the black box, score the split, return the run row + predictions."""
    from rayjobs.models.base import answer  # lazy: torch stays out of score planning
    from rayjobs.scoring.blackbox import open_black_box  # lazy: torch stays out of score planning
    from rayjobs.tasks import metrics  # lazy: scipy (the metrics) stays out of score planning
    from rayjobs.train.loop import begin_trial, prediction_rows, trial_device  # lazy: torch, scipy

    t0 = time.time()
    p = trial.params
    ctx = begin_trial(trial, ctx)
    data, examples = split_examples(trial)
    template = PromptTemplate.model_validate(p["template"])
    box = open_black_box(p["ref"], results=trial.results_dir, temperature=p.get("temperature"),
                         max_length=p.get("max_length", 512)).to(trial_device(trial, ctx))
    records = box.score(template, examples, generate=p["generate"], perplexity=p["perplexity"])
    rows = prediction_rows(data.spec.name, template.name, p["split"], [template.render(e) for e in examples], records)
    if p["split"] == "pool":  # an unlabelled probe pool: the labels were never there
        for r in rows:
            r.update(gold=None, gold_text=None, gold_value=None, correct=None)
        score, mets = None, {}
    else:
        score, mets = metrics.compute(data.spec, [answer(r) for r in records], [
            e.answer if e.answer is not None else (e.value if e.value is not None else e.label) for e in examples])
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": "score", "setup": trial.setup.key,
        "model": trial.setup.model.name, "adaptation": "none", "target": trial.eval_task, "seed": trial.seed,
        "n_train": 0, "n_eval": len(examples), "hparams": {**p, "data": data.origin}, "metric": data.spec.metric,
        "score": score, "metrics": {**mets, "template": template.name, "split": p["split"], "black_box": box.kind},
        "train_time_s": 0.0, "wall_time_s": time.time() - t0, "host": socket.gethostname(), "status": "ok",
        "predictions": rows,
    }


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: Any) -> Any:
    """A few examples of at most two local tasks; models that need a hub become the offline MiniLM scorer."""
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    tasks = sorted(cfg.tasks, key=lambda t: not has_local_data(registry, t))[:2]
    offline = ("builtin:", "sentence:builtin:", "run:", "http://", "https://", "/", ".", "~")
    models = [m if m.ref.startswith(offline) else m.model_copy(update={"ref": "builtin:minilm"}) for m in cfg.models]
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1], "n": 8, "tasks": tasks,
                                  "models": models[:2]})


class ScoreJob(Job, kind="score", config=ScoreConfig):
    def plan(self, cfg: ScoreConfig, store: ResultStore) -> Plan:
        registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
        for i, t in enumerate(cfg.tasks):
            try:
                registry.origin(t)
            except TaskError as e:
                raise ConfigError(f"{cfg.source_file}: field `tasks.{i}`: {e}") from None
        for i, m in enumerate(cfg.models):
            _check_ref(m.ref, cfg, f"models.{i}.ref")
        try:
            trials = expand_score(cfg, registry, str(store.root))
        except ValueError as e:
            raise ConfigError(f"{cfg.source_file}: field `templates`: {e}") from None
        return Plan(trials, view="predictions")

    def report(self, cfg: ScoreConfig, store: ResultStore) -> list[str]:
        with store.connect(read_only=True) as con:
            rows = con.execute("""SELECT model, target, metrics->>'$.template' AS template, round(avg(score), 4)
                                  FROM runs WHERE kind = 'score' AND experiment = ? AND status = 'ok'
                                  GROUP BY ALL ORDER BY ALL""", [cfg.name]).fetchall()
        if not rows or all(r[3] is None for r in rows):
            return [f"scored {len(rows)} (model, task, template) cells; rows in table `predictions`"]
        return ["model / task / template: score (the task metric)"] + [f"  {m} / {t} / {tp}: {s}" for m, t, tp, s in rows]


def _check_ref(ref: str, cfg: ScoreConfig, field: str) -> None:
    """Model references that cannot resolve fail before Ray starts (a stored run must exist)."""


    if ref.startswith("run:") and cfg.results_store:
        folder = ResultStore(cfg.results_store).checkpoint_dir(ref[4:])
        if not folder.is_dir():
            raise ConfigError(f"{cfg.source_file}: field `{field}`: no stored checkpoint {folder}")
    elif ref.startswith((".", "/", "~")) and not Path(ref).expanduser().is_dir():
        raise ConfigError(f"{cfg.source_file}: field `{field}`: model folder {ref} does not exist")


JOB = ScoreJob()
main = module_entry(JOB.kind, __name__)
