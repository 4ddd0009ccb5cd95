"""PVI job (paper 003, Algorithm 1; Ethayarajh et al., 2022): the two fine-tunings behind every PVI estimate.

    transferlab run configs/pvi_minilm.yaml [--results DIR] [--smoke] [KEY=VALUE ...]
    ray job submit --working-dir . -- python -m rayjobs.pvi --config configs/pvi_minilm.yaml

Per (setup, task, seed) two runs with the same base model, hyperparameters and training sample:
g' (kind `pvi_x`) fine-tuned on (x, y), and g (kind `pvi_null`) fine-tuned on (null, y), the input
replaced by the null template (rayjobs/tasks/templates.py: the whole input, both segments of a pair, becomes
one fixed text; the answer choices stay). Both score the task's held-out evaluation pool (split
`eval`: fixed by `sizes.split_seed`, never in any training sample), so
PVI(x -> y) = -log2 g[null](y) + log2 g'[x](y) is read from their stored `predictions` (probs of the
gold choice). The `pvi_x` row names its `pvi_null` run in `baseline_run_key`; the PVI statistics and
the task grouping are SQL over those rows (views `pvi`, `pvi_tasks`; `transferlab groups`).
"""

from __future__ import annotations

from typing import Any, Literal

import duckdb
from pydantic import BaseModel, ConfigDict, Field, field_validator

from analysis.store.results import ResultStore
from rayjobs.config import ConfigError, JobConfig, PromptSpec, SetupSpec
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setup
from rayjobs.engine.smoke import shrink_per_task
from rayjobs.job import Job, Plan, check_choice_tasks
from rayjobs.models.loading import ModelError
from rayjobs.plan import TrialSpec, prompt_identity, trial_key
from rayjobs.tasks.registry import TaskError, TaskRegistry
from rayjobs.tasks.templates import NULL


class TaskSizes(BaseModel):
    """Examples per task: a training sample drawn with the run's seed from the training pool, and the
    held-out evaluation pool (`eval_fraction` of a local file, fixed by `split_seed`; None = all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int | None = Field(default=1000, gt=0, description="training examples per task (None: all)")
    eval: int | None = Field(default=1000, gt=0, description="held-out examples scored per task (None: all)")
    eval_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of a local file held out")
    split_seed: int = 0


class PviConfig(JobConfig):
    """Tasks whose PVI is estimated, under every setup (model family) and seed."""

    job: Literal["pvi"] = "pvi"
    tasks: list[str] = Field(min_length=1)
    sizes: TaskSizes = TaskSizes()  # type: ignore[assignment]

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must be unique, got {v}")
        return v


def null_setup(setup: SetupSpec) -> SetupSpec:
    """g's setup: g''s model and hyperparameters, trained and evaluated on the null input (the null
    version of the template g' trains with, so both score the same verbalised answers)."""
    base = setup.prompts.train
    choice = NULL if base == "default" else f"{NULL}:{base}"
    return setup.model_copy(update={"prompts": PromptSpec(train=choice, eval=choice)})


def check_pvi(cfg: PviConfig, registry: TaskRegistry) -> None:
    """Tasks with a choice among answers (PVI needs g(y) of the gold choice), models that fit them."""
    where = cfg.source_file
    check_choice_tasks(where, cfg.tasks, registry,
                       "PVI needs the probability of the gold choice, so only choice tasks have one")
    for i, setup in enumerate(cfg.setups):
        if setup.resources.workers > 1 or setup.deepspeed is not None:
            raise ConfigError(f"{where}: field `setups.{i}`: a PVI run is one process (drop `deepspeed` and "
                              "`resources.workers`)")
        for s in (setup, null_setup(setup)):
            try:
                check_setup(s, list(cfg.tasks), registry)
            except (ModelError, TaskError) as e:
                raise ConfigError(f"{where}: field `setups.{i}`: {e}") from None


def expand_pvi(cfg: PviConfig, registry: TaskRegistry, results_dir: str) -> list[TrialSpec]:
    """A `pvi_null` and a `pvi_x` trial per (setup, task, seed), the latter naming the former."""
    sz = cfg.sizes
    split = dict(n_eval=sz.eval, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed)
    common = dict(experiment=cfg.name, data_root=cfg.data_root, task_files=list(cfg.task_files),
                  results_dir=results_dir, n_train=sz.train, **split)
    trials: list[TrialSpec] = []
    for setup in cfg.setups:
        g_null = null_setup(setup)
        for task in cfg.tasks:
            spec, origin = registry.get(task), registry.origin(task)
            for seed in cfg.seeds:
                keys = {}
                for kind, s in (("pvi_null", g_null), ("pvi_x", setup)):
                    data = f"{origin}|{prompt_identity(s, spec)}"
                    keys[kind] = trial_key(kind=kind, setup=s, hparams=s.train, train_task=task, train_origin=data,
                                           eval_task=task, eval_origin=data, seed=seed, n_train=sz.train, **split)
                    trials.append(TrialSpec(run_key=keys[kind], kind=kind, setup=s, hparams=s.train, train_task=task,
                                            eval_task=task, target=task, seed=seed,
                                            baseline_run_key=keys["pvi_null"] if kind == "pvi_x" else None,
                                            **common))
    return trials


def v_information_lines(store: ResultStore, cfg: PviConfig) -> list[str]:
    """Per (setup, task): the mean PVI over held-out instances (the `pvi_tasks` view), when it exists."""

    with store.connect(read_only=True) as con:
        try:
            rows = con.execute("SELECT setup, task, n_seeds, n_instances, v_info, sd_pvi FROM pvi_tasks "
                               "WHERE list_contains($tasks, task) ORDER BY setup, v_info DESC",
                               {"tasks": list(cfg.tasks)}).fetchall()
        except duckdb.CatalogException:
            return ["(this checkout has no `pvi_tasks` view: PVI statistics come with analysis/pvi_grouping)"]
    setups = {s.key for s in cfg.setups}
    lines = ["V-information (mean PVI in bits over held-out instances, all seeds):",
             f"{'setup':24s} {'task':12s} {'seeds':>5s} {'n':>6s} {'V-info':>8s} {'sd PVI':>8s}"]
    for setup, task, n_seeds, n, v, sd in rows:
        if setup in setups:
            lines.append(f"{setup:24s} {task:12s} {n_seeds:5d} {n:6d} {v:8.3f} {sd if sd is not None else 0:8.3f}")
    return lines if len(lines) > 2 else []


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: Any) -> Any:
    """2 tasks (local data first), 24 training and 24 held-out examples each, one seed."""
    return shrink_per_task(cfg, train=24, eval=24)


class PviJob(Job, kind="pvi", config=PviConfig):
    def plan(self, cfg: PviConfig, store: ResultStore) -> Plan:
        registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
        check_pvi(cfg, registry)
        trials = expand_pvi(cfg, registry, str(store.root))
        return Plan(trials, summary=f"{len(trials) // 2} (setup, task, seed) PVI pairs -> {len(trials)} runs",
                    view="pvi_tasks")

    def report(self, cfg: PviConfig, store: ResultStore) -> list[str]:
        return v_information_lines(store, cfg)


JOB = PviJob()
main = module_entry(JOB.kind, __name__)
