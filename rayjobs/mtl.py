"""Multi-task learning job with hard parameter sharing (paper 003, sections 3 and 5).

    transferlab run configs/mtl_minilm.yaml [--results DIR] [--smoke] [KEY=VALUE ...]
    ray job submit --working-dir . -- python -m rayjobs.mtl --config configs/mtl_minilm.yaml

The config lists task groups by grouping (`transferlab groups` writes the PVI ones):

    groups: {pvi: [[cb, copa], [mrpc, qqp, snli]], dissimilar: [[cb, qqp]], single: [[cb], [copa]]}

Per (setup, distinct sorted group, seed) one run of kind `mtl` trains one model, a shared encoder with
one classification head per member (rayjobs/models/multihead.py), on `sizes.train` examples of every
member, with the one training loop (`train_loop.fit`). Each optimiser batch holds one task's examples;
which task comes next is drawn per step (`sampling`):

  proportional  all of an epoch's per-task batches, shuffled together (MT-DNN): every example once per
                epoch, task t chosen at a step with probability ~ n_t (its share of the batches);
  temperature   task t drawn independently per step with p_t ~ n_t^(1/T) (`temperature: T`; T = 1 is
                proportional in expectation, larger T flattens towards uniform), each task cycling through
                its reshuffled batches; an epoch has as many steps as proportional sampling would.

Each member is evaluated with its own head on its own held-out pool (predictions rows with
`task` = the member, split `eval`); the run's `score` is the mean of the members' scores. A group of
one is the single-task baseline (sampling plays no part in it or its run key). Which grouping asked
for which run is upserted into the `mtl_groups` table before the runs start; a group named by several
groupings trains once.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from analysis.errors import AnalysisError
from analysis.store.duck import registered
from analysis.store.results import ResultStore
from rayjobs.config import ConfigError, JobConfig, SetupSpec
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setup
from rayjobs.engine.smoke import has_local_data, smoke_setup
from rayjobs.job import Job, Plan, task_spec
from rayjobs.models.loading import ModelError
from rayjobs.plan import TrialSpec, prompt_identity, trial_key
from rayjobs.pvi import TaskSizes
from rayjobs.tasks.registry import Example, TaskError, TaskRegistry
from rayjobs.tasks.templates import render_train, resolve

GROUPINGS = ("pvi", "dissimilar", "all", "random", "single", "embedding")
Grouping = Literal["pvi", "dissimilar", "all", "random", "single", "embedding"]
#: adaptation methods the multi-head model supports (prompt/prefix tuning need a peft task type)
MTL_METHODS = {"full", "bitfit", "lora", "adapter"}


class MtlConfig(JobConfig):
    """Groups of tasks trained together, by grouping, with the per-step task sampling."""

    job: Literal["mtl"] = "mtl"
    groups: dict[Grouping, list[list[str]]] = Field(min_length=1)
    sizes: TaskSizes = TaskSizes()  # type: ignore[assignment]
    sampling: Literal["proportional", "temperature"] = "proportional"
    temperature: float = Field(default=2.0, gt=0, description="T of temperature sampling, p_t ~ n_t^(1/T)")

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
        for grouping, groups in v.items():
            for i, g in enumerate(groups):
                if not g:
                    raise ValueError(f"groups.{grouping}.{i} is empty")
                if len(set(g)) != len(g):
                    raise ValueError(f"groups.{grouping}.{i} names a task twice: {g}")
        return v

    @model_validator(mode="after")
    def _some_group(self) -> MtlConfig:
        if not any(self.groups.values()):
            raise ValueError("`groups` holds no group")
        return self

    @property
    def sampling_id(self) -> str:
        return "proportional" if self.sampling == "proportional" else f"temperature={self.temperature:g}"


# -- batches: one task per batch, the task drawn per step ------------------------------------------------
class TaskBatcher:
    """`train_loop.fit`'s batcher for multi-task learning (see the module docstring)."""

    def __init__(self, sampling: str = "proportional"):
        kind, _, t = sampling.partition("=")
        if kind not in ("proportional", "temperature") or (kind == "temperature") != bool(t):
            raise ValueError(f"sampling {sampling!r}: expected proportional or temperature=<T>")
        self.kind, self.temperature = kind, float(t) if t else 1.0

    def weights(self, sizes: list[int]) -> list[float]:
        """Per-step task probabilities of temperature sampling: n_t^(1/T), normalised."""
        w = [n ** (1.0 / self.temperature) for n in sizes]
        return [x / sum(w) for x in w]

    def __call__(self, examples: list[Example], size: int, rng: random.Random | None) -> list[list[Example]]:
        rng = rng or random.Random(0)
        by_task: dict[str, list[Example]] = {}
        for e in examples:
            by_task.setdefault(getattr(e, "task", ""), []).append(e)
        chunks = {t: self._chunks(exs, size, rng) for t, exs in by_task.items()}
        if self.kind == "proportional":
            out = [c for cs in chunks.values() for c in cs]
            rng.shuffle(out)
            return out
        names = list(chunks)
        p = self.weights([len(by_task[t]) for t in names])
        queues = {t: list(chunks[t]) for t in names}
        out = []
        for _ in range(sum(len(c) for c in chunks.values())):
            t = rng.choices(names, weights=p)[0]
            if not queues[t]:
                queues[t] = self._chunks(by_task[t], size, rng)
            out.append(queues[t].pop(0))
        return out

    @staticmethod
    def _chunks(exs: list[Example], size: int, rng: random.Random) -> list[list[Example]]:
        order = list(exs)
        rng.shuffle(order)
        return [order[i:i + size] for i in range(0, len(order), size)]


# -- plan ------------------------------------------------------------------------------------------------
def check_mtl(cfg: MtlConfig, registry: TaskRegistry) -> list[str]:
    """Every member a classification task with data; encoder setups the multi-head model supports."""
    where = cfg.source_file
    tasks = list(dict.fromkeys(t for groups in cfg.groups.values() for g in groups for t in g))
    for t in tasks:
        spec = task_spec(registry, t, where, "groups")
        if spec.answer_type != "choice" or not spec.choices:
            raise ConfigError(f"{where}: field `groups`: task {t!r} has no fixed label set; hard parameter sharing "
                              "gives each member a classification head over its labels")
    for i, setup in enumerate(cfg.setups):
        if setup.model.family != "encoder":
            raise ConfigError(f"{where}: field `setups.{i}.model.family`: MTL with task heads needs an encoder "
                              f"(got {setup.model.family}; text-to-text multi-task training is `job: multitask`)")
        if setup.adaptation.method not in MTL_METHODS:
            raise ConfigError(f"{where}: field `setups.{i}.adaptation.method`: {setup.adaptation.method} does not "
                              f"fit the multi-head model (use one of {sorted(MTL_METHODS)})")
        if setup.resources.workers > 1 or setup.deepspeed is not None:
            raise ConfigError(f"{where}: field `setups.{i}`: an MTL run is one process (drop `deepspeed` and "
                              "`resources.workers`)")
        try:
            check_setup(setup, tasks, registry)
        except (ModelError, TaskError) as e:
            raise ConfigError(f"{where}: field `setups.{i}`: {e}") from None
    return tasks


def expand_mtl(cfg: MtlConfig, registry: TaskRegistry, results_dir: str) -> tuple[list[TrialSpec], list[dict]]:
    """One trial per distinct (setup, sorted group, seed); one `mtl_groups` row per (grouping, group, setup, seed)."""
    sz = cfg.sizes
    split = dict(n_eval=sz.eval, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed)
    trials: dict[str, TrialSpec] = {}
    rows: list[dict] = []
    for setup in cfg.setups:
        for grouping, groups in cfg.groups.items():
            for group in groups:
                members = sorted(group)
                for seed in cfg.seeds:
                    key = _key(setup, members, seed, cfg, registry)
                    if key not in trials:
                        trials[key] = TrialSpec(
                            run_key=key, experiment=cfg.name, kind="mtl", executor="rayjobs.mtl:train_and_evaluate_mtl", setup=setup,
                            hparams=setup.train, train_task="+".join(members), eval_task="+".join(members),
                            params={"sampling": cfg.sampling_id if len(members) > 1 else "proportional"},
                            sources=members, seed=seed, n_train=sz.train, data_root=cfg.data_root,
                            task_files=list(cfg.task_files), results_dir=results_dir, **split)
                    rows.append({"experiment": cfg.name, "grouping": grouping, "group_id": "+".join(members),
                                 "members": members, "run_key": key, "seed": seed})
    return list(trials.values()), rows


def _key(setup: SetupSpec, members: list[str], seed: int, cfg: MtlConfig, registry: TaskRegistry) -> str:
    sz = cfg.sizes
    data = ";".join(f"{registry.origin(t)}|{prompt_identity(setup, registry.get(t))}" for t in members)
    if len(members) > 1:
        data += f"|sampling={cfg.sampling_id}"
    return trial_key(kind="mtl", setup=setup, hparams=setup.train, train_task="+".join(members), train_origin=data,
                     eval_task="+".join(members), eval_origin=data, seed=seed, n_train=sz.train, n_eval=sz.eval,
                     eval_fraction=sz.eval_fraction, split_seed=sz.split_seed, sources=members)


MTL_GROUP_COLUMNS = ["experiment", "grouping", "group_id", "members", "run_key", "seed"]


def record_groups(store: ResultStore, rows: list[dict]) -> None:
    """Add the rows not stored yet to `mtl_groups` (re-running a config adds nothing)."""
    if not rows:
        return


    cols = ", ".join(MTL_GROUP_COLUMNS)
    table = pa.Table.from_pylist(rows, schema=pa.schema([("experiment", pa.string()), ("grouping", pa.string()),
                                                         ("group_id", pa.string()), ("members", pa.list_(pa.string())),
                                                         ("run_key", pa.string()), ("seed", pa.int32())]))
    with store.connect() as con, registered(con, "_groups", table):
        con.execute(f"INSERT INTO mtl_groups ({cols}) SELECT {cols} FROM "
                    f"(SELECT DISTINCT {cols} FROM _groups EXCEPT SELECT {cols} FROM mtl_groups)")


# -- the trial's executor (TrialSpec.executor) ------------------------------------------------------
def _member_data(trial: TrialSpec, members: list[str]
                 ) -> tuple[list[Example], dict[str, list[Example]], dict[str, Any], list[str]]:
    """Each member's data, tagged with its task: the rendered training examples of all members, each member's
    held-out pool, each member's task spec, and the origins for the run row."""
    from rayjobs.models.multihead import tag  # lazy: torch stays out of CLI start-up
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    fam = trial.setup.model.family
    train: list[Example] = []
    evals: dict[str, list[Example]] = {}
    specs, origins = {}, []
    for m in members:
        data = registry.load_data(m, trial.n_train, trial.n_eval, seed=trial.seed, eval_fraction=trial.eval_fraction,
                                  split_seed=trial.split_seed)
        specs[m] = data.spec
        origins.append(f"{m}={data.origin}(n={len(data.train)})")
        train.extend(render_train(tag(data.train, m), resolve(data.spec, trial.setup.prompts.train, fam), trial.seed))
        evals[m] = tag(data.eval, m)
    return train, evals, specs, origins


def train_and_evaluate_mtl(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    """Train the shared encoder and every member's head with `fit`; evaluate each member on its held-out pool."""
    import torch  # lazy: torch stays out of CLI start-up

    from rayjobs.models.adaptation import apply_adaptation  # lazy: torch stays out of CLI start-up
    from rayjobs.models.multihead import MultiHeadModel  # lazy: torch stays out of CLI start-up
    from rayjobs.train.loop import (  # lazy: the train loop (scipy) only in the trial's worker
        EvalResult,
        TrialData,
        begin_trial,
        evaluate_prompts,
        fit,
        result_row,
        trial_device,
    )

    t0 = time.time()
    ctx = begin_trial(trial, ctx)
    members, sampling = list(trial.sources or []), trial.params.get("sampling", "proportional")
    fam = trial.setup.model.family
    train, evals, specs, origins = _member_data(trial, members)
    torch.manual_seed(trial.seed)  # head initialisation
    tm = apply_adaptation(MultiHeadModel(trial.setup.model, specs), trial.setup.adaptation, fam)
    device = trial_device(trial, ctx)
    ctx = replace(ctx, device=device)
    tm.module.to(device)
    fitted = fit(tm, train, trial, ctx, batcher=TaskBatcher(sampling))
    tm = fitted.backend.model_for_eval()
    scores, per, rows = {}, {}, []
    for m in members:
        templates = resolve(specs[m], trial.setup.prompts.eval, fam)
        scores[m], per[m], r = evaluate_prompts(tm.member(m), evals[m], templates, trial.hparams.eval_batch_size,
                                                device)
        rows.extend(r)
    rows = _unique_ids(rows)
    first = specs[members[0]]
    data = TrialData(first, first, train, [e for m in members for e in evals[m]], [], origins)
    ev_score = float(np.mean(list(scores.values())))
    ev = EvalResult(ev_score, {"member_scores": scores, "members": per}, rows)
    row = result_row(trial, data, tm, fitted, ev, None, ctx, t0)
    metrics = {specs[m].metric for m in members}
    row["metric"] = metrics.pop() if len(metrics) == 1 else "mean"
    row["hparams"] = {**row["hparams"], "sampling": sampling if len(members) > 1 else None,
                      "n_train_per_task": {m: sum(getattr(e, "task", "") == m for e in train) for m in members}}
    return row


def _unique_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions are keyed by (run, example_id, template): where two members share example ids (HF
    splits number their rows `validation:<i>`), every id of the run becomes `<task>/<id>`."""
    seen: dict[tuple[str, str], str] = {}
    clash = False
    for r in rows:
        k = (r["example_id"], r["template"])
        if seen.setdefault(k, r["task"]) != r["task"]:
            clash = True
            break
    if not clash:
        return rows
    return [{**r, "example_id": f"{r['task']}/{r['example_id']}"} for r in rows]


# -- job -------------------------------------------------------------------------------------------------
def member_lines(store: ResultStore, cfg: MtlConfig) -> list[str]:
    """Paper 003 Tables 3-6: each member's accuracy and macro-F1 (mean over seeds +- 95% CI) next to its
    single-task baseline (the `mtl_comparison` view)."""
    from analysis.pvi.grouping import comparison_table  # lazy: scipy only for the closing report

    with store.connect() as con:
        try:
            rows = comparison_table(con, cfg.name)
        except AnalysisError:
            return []

    def cell(v: float | None, ci: float | None = None) -> str:
        return "-" if v is None else f"{v:.3f}" + (f"+-{ci:.3f}" if ci is not None and ci == ci else "")

    lines = ["MTL members (mean over seeds +- 95% CI; single = the task's group of one; diff = MTL - single):",
             f"{'grouping':10s} {'group':28s} {'task':10s} {'seeds':>5s} {'accuracy':>14s} {'macro-F1':>14s} "
             f"{'single F1':>9s} {'diff F1':>8s}"]
    for r in rows:
        diff = "-" if r["diff_macro_f1"] is None else f"{r['diff_macro_f1']:+.3f}"
        lines.append(f"{r['grouping']:10s} {r['group_id']:28s} {r['task']:10s} {r['n_seeds']:5d} "
                     f"{cell(r['accuracy'], r['ci_accuracy']):>14s} {cell(r['macro_f1'], r['ci_macro_f1']):>14s} "
                     f"{cell(r['single_macro_f1']):>9s} {diff:>8s}")
    return lines


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: Any) -> Any:
    """Per grouping its first group whose members all have local data (else its first), cut to 2 members;
    single-task groups only for the members kept; 24 + 24 examples per task, one seed."""
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    groups: dict[str, list[list[str]]] = {}
    for grouping, gs in cfg.groups.items():
        if grouping == "single" or not gs:
            continue
        local = [g for g in gs if all(has_local_data(registry, t) for t in g)]
        groups[grouping] = [(local or gs)[0][:2]]
    kept = list(dict.fromkeys(t for gs in groups.values() for g in gs for t in g))
    singles = [g for g in cfg.groups.get("single", []) if len(g) == 1 and g[0] in kept]
    if singles or not groups:
        groups["single"] = singles or [g[:1] for g in cfg.groups.get("single", [])[:1]]
    sizes = cfg.sizes.model_copy(update={"train": 24, "eval": 24})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1], "sizes": sizes,
                                  "groups": groups, "setups": [smoke_setup(s) for s in cfg.setups]})


class MtlJob(Job, kind="mtl", config=MtlConfig):
    def plan(self, cfg: MtlConfig, store: ResultStore) -> Plan:
        registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
        check_mtl(cfg, registry)
        trials, rows = expand_mtl(cfg, registry, str(store.root))
        return Plan(trials, summary=f"{len(rows)} (grouping, group, setup, seed) cells -> {len(trials)} distinct runs",
                    view="mtl_comparison", before_run=[lambda st: record_groups(st, rows)])

    def report(self, cfg: MtlConfig, store: ResultStore) -> list[str]:
        return member_lines(store, cfg)


JOB = MtlJob()
main = module_entry(JOB.kind, __name__)
