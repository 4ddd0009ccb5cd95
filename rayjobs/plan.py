"""Expand an experiment config into trials with deterministic run keys.

Pairwise transfer runs in stages so nothing is trained twice: one source model per
(setup, source, source seed), one target-only baseline per (setup, target, target seed), and one
transfer per (setup, source, target, seed pair) that starts from its source checkpoint and is paired
with the baseline of its target seed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from rayjobs.config import AdaptationSpec, ModelSpec, PairwiseConfig, SetupSpec, TrainSpec
from rayjobs.search_space import SearchPoint, configurations, group_id
from rayjobs.tasks.registry import TaskRegistry, TaskSpec
from rayjobs.tasks.templates import identity, resolve

# Bump when the training/evaluation semantics change so old results are not reused.
RUN_KEY_VERSION = 2

Kind = str  # source | target | transfer | multitask | ... (one per stage of a job kind)


class TrialSpec(BaseModel):
    """Everything one trial needs, JSON-serialisable so it travels to any Ray worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_key: str
    experiment: str
    kind: Kind
    setup: SetupSpec
    hparams: TrainSpec
    train_task: str
    eval_task: str
    source: str | None = None
    target: str | None = None
    sources: list[str] | None = None
    seed: int
    source_seed: int | None = None  # a transfer's: the seed of the source run it starts from
    n_train: int | None
    n_eval: int | None
    eval_fraction: float
    split_seed: int
    data_root: str | None = None
    task_files: list[str] = []
    source_run_key: str | None = None
    baseline_run_key: str | None = None
    save_checkpoint: bool = False
    results_dir: str
    #: a remote results location (s3://..., analysis.store.remote): `results_dir` is then the driver's mirror
    #: and each trial works in its node's own; not part of the run's identity
    results_uri: str | None = None
    after: list[str] = []  # run keys this trial needs besides its source (not part of its identity)
    #: what runs the trial, "module:function(trial, ctx) -> result row": the job kind's own executor
    executor: str = "rayjobs.train.loop:train_and_evaluate"
    params: dict[str, Any] = {}  # the executor's own inputs (a score trial's model reference and template)
    #: a source / baseline configuration of a search (rayjobs.search_space): its place in the search
    search: SearchPoint | None = None
    #: a transfer over searched stages: it starts from the best of these source configurations ...
    source_candidates: list[str] = []
    #: ... and trains with the hyperparameters of the best of these baseline configurations, paired with it
    baseline_candidates: dict[str, TrainSpec] = {}

    @property
    def required(self) -> list[str]:
        """Run keys that must be stored `ok` before this trial can start."""
        return [k for k in [self.source_run_key, *self.after] if k]

    @property
    def candidate_groups(self) -> list[list[str]]:
        """Groups of run keys that must all be decided (ok or stopped early), at least one ok, to start."""
        return [g for g in (list(self.source_candidates), list(self.baseline_candidates)) if g]

    @property
    def depends_on(self) -> list[str]:
        """Run keys that must be stored before this trial can start."""
        return [*self.required, *(k for g in self.candidate_groups for k in g)]

    def stopped_out(self, stopped: set[str]) -> bool:
        """Will never run because runs it needs were stopped early: a required one, or every candidate of
        a group (a decided outcome, not a failure)."""
        return (any(d in stopped for d in self.required)
                or any(all(k in stopped for k in g) for g in self.candidate_groups))

    @property
    def label(self) -> str:
        what = {"source": f"{self.source}", "target": f"{self.target} (baseline)",
                "transfer": f"{self.source}->{self.target}"}.get(self.kind)
        if what is None:  # multi-task sets, MTL groups, scoring, PVI, embeddings: what it trains on or scores
            what = f"{'+'.join(self.sources)}->{self.target}" if self.sources else (self.target or self.train_task)
        seed = self.seed if self.source_seed in (None, self.seed) else f"{self.source_seed}->{self.seed}"
        values = "".join(f" {k}={v}" for k, v in self.search.values.items()) if self.search else ""
        return f"{self.kind} {self.setup.key} {what} seed={seed}{values}"


def run_key(payload: dict[str, Any]) -> str:
    """Hash of everything that determines a run's result (not resources, not locations)."""
    blob = json.dumps({"v": RUN_KEY_VERSION, **payload}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


#: fields each spec had when RUN_KEY_VERSION 2 was set; a field added later enters the run key only when
#: it differs from its default, so adding an option never changes the keys of stored runs
V2_FIELDS: dict[type[BaseModel], set[str]] = {
    ModelSpec: {"path", "family", "config", "tokenizer", "max_length", "head", "dtype", "choice_scoring",
                "max_target_length"},
    AdaptationSpec: {"method", "params"},
    TrainSpec: {"epochs", "learning_rate", "batch_size", "weight_decay", "warmup_ratio", "grad_accum_steps",
                "max_grad_norm", "max_steps", "gradient_checkpointing"},
}


def identity_dump(spec: BaseModel, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """`spec` as it enters a run key: v2 fields always, later fields only where they are not the default."""
    known = V2_FIELDS[type(spec)]
    out = {}
    for name, field in type(spec).model_fields.items():
        if name in exclude:
            continue
        value = getattr(spec, name)
        if name in known or value != field.get_default(call_default_factory=True):
            out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def _setup_identity(setup: SetupSpec, hparams: TrainSpec, train_identity: Any = None) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "model": identity_dump(setup.model, {"name"}),
        "adaptation": identity_dump(setup.adaptation),
        "train": identity_dump(hparams, {"eval_batch_size"}) if train_identity is None else train_identity,
    }
    if setup.deepspeed is not None:  # numerics, not placement, change results
        ident["precision"] = setup.deepspeed.precision
    if setup.simulate is not None:  # a benchmark's simulated runs (rayjobs.engine.simulate) are other runs
        ident["simulate"] = setup.simulate.model_dump()
    return ident


def prompt_identity(setup: SetupSpec, spec: TaskSpec) -> str:
    """The content of the templates a setup trains and evaluates a task with (editing one retrains)."""
    fam = setup.model.family
    return (f"prompts={identity(resolve(spec, setup.prompts.train, fam))}"
            f"/{identity(resolve(spec, setup.prompts.eval, fam))}")


def trial_key(*, kind: str, setup: SetupSpec, hparams: TrainSpec, train_task: str, train_origin: str,
              eval_task: str, eval_origin: str, seed: int, n_train: int | None, n_eval: int | None,
              eval_fraction: float, split_seed: int, source_run_key: str | dict[str, Any] | None = None,
              sources: list[str] | None = None, train_identity: Any = None) -> str:
    """`source_run_key` / `train_identity` of a transfer over searched stages: which candidates it takes the
    best of (rayjobs.search_space), in place of one source key / its hyperparameters."""
    return run_key({
        "kind": kind, "setup": _setup_identity(setup, hparams, train_identity),
        "train": [train_task, train_origin], "eval": [eval_task, eval_origin],
        "seed": seed, "n_train": n_train, "n_eval": n_eval,
        "split": [eval_fraction, split_seed], "init": source_run_key, "sources": sources,
    })


def best_of_identity(keys: list[str]) -> dict[str, Any]:
    """The identity of "the validation-best of these runs" (a transfer's init or hyperparameters)."""
    return {"best_of": sorted(keys), "on": "best_validation_score"}


def expand_pairwise(cfg: PairwiseConfig, registry: TaskRegistry, results_dir: str) -> list[TrialSpec]:
    """All trials of a pairwise config, sources and baselines first, transfers last.

    A transfer trains its target with a target seed from the source run of its source seed
    (`cfg.seed_pairs()`; the same seed for a plain `seeds` list) and is paired with the baseline of its
    target seed; `runs.seed` is the target seed, `hparams.source_seed` the source's.
    """
    tasks = dict.fromkeys(cfg.tasks.sources + cfg.tasks.target_list)
    origins = {t: registry.origin(t) for t in tasks}  # raises TaskError on unknown tasks / missing data
    sz = cfg.sizes
    common = dict(experiment=cfg.name, n_eval=sz.eval, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed,
                  data_root=cfg.data_root, task_files=list(cfg.task_files), results_dir=results_dir)
    key_common = dict(n_eval=sz.eval, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed)
    sources: list[TrialSpec] = []
    baselines: list[TrialSpec] = []
    transfers: list[TrialSpec] = []
    search = dict(num_samples=cfg.run.num_samples, seed=cfg.run.search.seed, algorithm=cfg.run.search.algorithm)
    for setup in cfg.setups:
        data = {t: f"{origins[t]}|{prompt_identity(setup, registry.get(t))}" for t in tasks}
        src_cfgs = configurations(setup.source_hparams, setup.source_space, **search)
        tgt_cfgs = configurations(setup.train, setup.train_space, **search)
        # (task, seed) -> the run keys of its configurations, in configuration order
        src_keys: dict[tuple[str, int], list[str]] = {}
        for seed in cfg.source_seeds:
            for s in cfg.tasks.sources:
                group = _stage("source", setup, s, seed, sz.source_train, data[s], src_cfgs, True, key_common, common)
                src_keys[s, seed] = [t.run_key for t in group]
                sources += _searched(group, src_cfgs, setup.source_space)
        base_keys: dict[tuple[str, int], dict[str, TrainSpec]] = {}
        for seed in cfg.target_seeds:
            for t in cfg.tasks.target_list:
                group = _stage("target", setup, t, seed, sz.target_train, data[t], tgt_cfgs,
                               cfg.save_target_checkpoints, key_common, common)
                base_keys[t, seed] = {b.run_key: b.hparams for b in group}
                baselines += _searched(group, tgt_cfgs, setup.train_space)
        for src_seed, seed in cfg.seed_pairs():
            for s in cfg.tasks.sources:
                for t in cfg.tasks.target_list:
                    if s == t and cfg.tasks.exclude_self:
                        continue
                    transfers.append(_transfer(setup, s, t, src_seed, seed, src_keys[s, src_seed],
                                               base_keys[t, seed], data[t], sz.target_train, key_common, common))
    trials = sources + baselines + transfers  # a setup with `simulate:` runs the benchmark's executor
    return [t.model_copy(update={"executor": "rayjobs.engine.simulate:simulate_trial"}) if t.setup.simulate else t
            for t in trials]


def _stage(kind: str, setup: SetupSpec, task: str, seed: int, n_train: int | None, data: str,
           configs: list[tuple[dict[str, Any], Any]], save: bool, key_common: dict[str, Any],
           common: dict[str, Any]) -> list[TrialSpec]:
    """One task's source runs (kind "source") or target baselines ("target"): one per configuration of the
    stage's search; `TrialSpec.source` or `.target` names the task."""
    return [TrialSpec(run_key=trial_key(kind=kind, setup=setup, hparams=hp, train_task=task, train_origin=data,
                                        eval_task=task, eval_origin=data, seed=seed, n_train=n_train, **key_common),
                      kind=kind, setup=setup, hparams=hp, train_task=task, eval_task=task, seed=seed,
                      n_train=n_train, save_checkpoint=save, **{kind: task}, **common) for _, hp in configs]


def _transfer(setup: SetupSpec, s: str, t: str, src_seed: int, seed: int, srcs: list[str],
              bases: dict[str, TrainSpec], data: str, n_train: int | None, key_common: dict[str, Any],
              common: dict[str, Any]) -> TrialSpec:
    """One transfer s -> t: from the source run (the best of `srcs` when the source stage is searched),
    with the baseline's hyperparameters (the best of `bases` when the target stage is searched)."""
    # one candidate each (no spaces): the keys of before search spaces existed
    init = srcs[0] if len(srcs) == 1 else None
    base = next(iter(bases)) if len(bases) == 1 else None
    hp = bases[base] if base else next(iter(bases.values()))  # resolved when it starts
    k = trial_key(kind="transfer", setup=setup, hparams=hp, train_task=t, train_origin=data, eval_task=t,
                  eval_origin=data, seed=seed, n_train=n_train, source_run_key=init or best_of_identity(srcs),
                  train_identity=None if base else best_of_identity(list(bases)), **key_common)
    return TrialSpec(run_key=k, kind="transfer", setup=setup, hparams=hp, train_task=t, eval_task=t, source=s,
                     target=t, seed=seed, source_seed=src_seed, n_train=n_train, source_run_key=init,
                     baseline_run_key=base, source_candidates=[] if init else srcs,
                     baseline_candidates={} if base else bases, **common)


def _searched(group: list[TrialSpec], cfgs: list[tuple[dict[str, Any], TrainSpec]], spaces: dict[str, Any]
              ) -> list[TrialSpec]:
    """The configurations of one (setup, stage, task, seed), each told its place in the search."""
    if not spaces:
        return group
    gid = group_id([t.run_key for t in group])
    return [t.model_copy(update={"search": SearchPoint(group=gid, index=i, n=len(group), values=values)})
            for i, (t, (values, _)) in enumerate(zip(group, cfgs, strict=True))]
