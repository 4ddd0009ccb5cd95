"""FUTE embedding job (paper 004): dataset and model task embeddings in one space per surrogate, as trials.

    transferlab embed configs/fute_cpu.yaml [--results DIR] [--smoke] [KEY=VALUE ...]
    transferlab run configs/fute_cpu.yaml                      # the same (the config says `job: embed`)

Stages, in dependency order, each trial keyed by everything that fixes its result (re-running resumes):
  1. (optional) the pairwise grid of a referenced pairwise config, whose source models are black boxes
     (and whose transfer matrix evaluates source selection);
  2. `probe`: each black box (a model + a prompt, a stored run, or any `/v1` endpoint) labels the
     unlabelled probe pool through `BlackBox.score` in batches; its choice distributions are stored as
     `predictions` rows (split 'pool', no gold);
     `score`: with `mte.score_eval`, each prompt is also scored on its task's eval split (the prompt's
     measured accuracy and the prompt-selection baselines' inputs; the score job's trials and keys);
  3. `embed`: per space and seed, one DTE per labelled dataset and one MTE per black box, read from the
     probe trial's `predictions` rows. The vector goes to `embeddings/<run_key>.npy` (atomically) before
     the run row; the view `task_embeddings` indexes the rows.

A space = (surrogate, method, variant, hyperparameters, probe pool, seed) and its id hashes all of them;
analyses never compare embeddings of different spaces.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from analysis.selection.fute import own_task_retrieval
from analysis.store.results import ResultStore
from rayjobs.config import ConfigError, JobConfig, ModelSpec, ResourceSpec, SetupSpec, _Strict, load_config
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setups
from rayjobs.engine.smoke import TINY, has_local_data
from rayjobs.job import Job, Plan
from rayjobs.pairwise import smoke as smoke_pairwise
from rayjobs.plan import TrialSpec, expand_pairwise, run_key
from rayjobs.score import BlackBoxSpec, ScoreConfig, expand_score
from rayjobs.scoring.blackbox import open_black_box
from rayjobs.scoring.fute_data import (
    DatasetRef,
    PoolSpec,
    ProbePool,
    _prompted_file,
    build_pool,
    file_digest,
    mte_examples,
    one_hot,
    prompted_examples,
    read_prompted,
    registry_examples,
)
from rayjobs.scoring.fute_embeddings import (
    LOSS,
    SoftLabelModel,
    SpaceSpec,
    build_surrogate,
    choice_task,
    compute_embedding,
)
from rayjobs.tasks.registry import TaskError, TaskRegistry
from rayjobs.tasks.templates import IDENTITY, PromptTemplate, coerce_templates, task_templates

EMBEDDINGS_DIR = "embeddings"


class PairwiseRef(_Strict):
    """Source models of a pairwise config: its whole grid runs as part of this job (same results folder)."""

    config: str = Field(description="pairwise config file (relative to this config)")
    setups: list[str] | None = Field(default=None, description="setup keys whose source models are black boxes "
                                                                "(default all)")
    seeds: list[int] | None = Field(default=None, description="seeds whose source models are black boxes (default all)")
    smoke: bool = Field(default=False, description="shrink the pairwise config as its --smoke does (set by --smoke)")


class PromptSet(_Strict):
    """The prompts every model of `mte.models` is asked with on one task."""

    task: str
    templates: str | list[PromptTemplate] = Field(default="all", description="'all', 'input', a template name, "
                                                                             "or a list of templates")
    extra: list[PromptTemplate] = Field(default_factory=list, description="more prompts (bad ones, duplicates)")

    @field_validator("templates", mode="before")
    @classmethod
    def _coerce(cls, v: Any) -> Any:
        return coerce_templates(v)


class MTESpec(_Strict):
    models: list[BlackBoxSpec] = Field(default_factory=list, description="black boxes asked with `prompts`")
    prompts: list[PromptSet] = Field(default_factory=list)
    pairwise: PairwiseRef | None = None
    batch_size: int = Field(default=32, gt=0, description="black-box requests per batch")
    score_eval: bool = Field(default=True, description="also score every prompt on its task's eval split")
    n_eval: int | None = Field(default=200, gt=0, description="eval examples per task for score_eval")
    perplexity: bool = Field(default=False, description="store prompt perplexity with score_eval (SPELL)")
    self_select: bool = Field(default=False, description="with score_eval, also ask each model which prompt to use "
                                                         "(Self-Select's meta-prompt)")
    results_store: str | None = Field(default=None, description="results folder of run:<key> black boxes "
                                                                "(default this job's)")


class DTESpec(_Strict):
    tasks: list[str] = Field(default_factory=list, description="registry tasks: a seeded labelled training sample")
    n: int | None = Field(default=200, gt=0, description="examples per registry task (None: the whole pool)")
    prompted_tasks: list[str] | Literal["all"] = Field(default_factory=list,
                                                       description="few-shot DTEs from the prompted-examples file")
    prompted_file: str | None = None
    n_prompted: int | None = Field(default=32, gt=0, description="prompted rows per task (seeded sample)")
    free_text_choices: int = Field(default=3, ge=2)


class EmbedConfig(JobConfig):
    job: Literal["embed"] = "embed"
    spaces: list[SpaceSpec] = Field(min_length=1)
    pool: PoolSpec = PoolSpec()
    dte: DTESpec = DTESpec()
    mte: MTESpec = MTESpec()
    targets: list[str] = Field(default_factory=list, description="more evaluation targets kept out of the pool "
                                                                 "(DTE, prompt and pairwise tasks always are)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: ResourceSpec = ResourceSpec()

    input_paths: ClassVar[tuple[str, ...]] = ("data_root", "task_files", "pool.prompted_file", "dte.prompted_file",
                                              "mte.pairwise.config", "mte.results_store")


@dataclass(frozen=True)
class BlackBoxItem:
    """One black box asked for a model task embedding: a model reference with a prompt, on a task."""

    name: str
    ref: str
    template: PromptTemplate
    task: str
    choices: tuple[str, ...]
    temperature: float | None = None
    max_length: int = 512
    source_task: str | None = None  # the task a stored source model was trained on
    after: tuple[str, ...] = ()
    prompt: str | None = field(default=None)

    def probe_params(self) -> dict[str, Any]:
        return {"ref": self.ref, "temperature": self.temperature, "max_length": self.max_length,
                "template": self.template.model_dump(), "task": self.task, "choices": list(self.choices)}


def space_id(space: SpaceSpec, pool_digest: str, seed: int) -> str:
    """The id of an embedding space: everything that fixes it (its display name aside)."""
    return run_key({"kind": "space", "spec": space.model_dump(mode="json", exclude={"name"}),
                    "variant": space.resolved_variant, "pool": pool_digest, "seed": seed})


def vector_path(results: str | Path, key: str) -> Path:
    return Path(results) / EMBEDDINGS_DIR / f"{key}.npy"


def write_vector(results: str | Path, key: str, vec: np.ndarray) -> Path:
    """`embeddings/<key>.npy` through a temp file and a rename (readers see all of it or nothing)."""
    dest = vector_path(results, key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{key}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(vec, dtype=np.float32))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# -- planning --------------------------------------------------------------------------------------------------
def _pairwise(cfg: EmbedConfig, store: ResultStore) -> tuple[list[TrialSpec], list[BlackBoxItem], list[str]]:
    """The referenced pairwise grid (run into this results folder), its source models as black boxes,
    and its tasks (evaluation targets)."""
    ref = cfg.mte.pairwise
    if ref is None:
        return [], [], []

    pcfg = load_config(ref.config)
    if ref.smoke:
        pcfg = smoke_pairwise(pcfg)
    registry = TaskRegistry.load(pcfg.task_files, pcfg.data_root)
    check_setups(pcfg, registry)
    trials = expand_pairwise(pcfg, registry, str(store.root))
    keys = [s.key for s in pcfg.setups]
    unknown = [s for s in ref.setups or [] if s not in keys]
    if unknown:
        raise ConfigError(f"{cfg.source_file}: field `mte.pairwise.setups`: {unknown} not in {ref.config} "
                          f"(setups: {keys})")
    seeds = sorted({t.seed for t in trials if not ref.seeds or t.seed in ref.seeds})
    items = []
    for t in trials:
        if t.kind != "source" or (ref.setups and t.setup.key not in ref.setups) or (ref.seeds and t.seed not in ref.seeds):
            continue
        spec = registry.get(t.train_task)
        if not spec.choices:
            raise ConfigError(f"{cfg.source_file}: pairwise source {t.train_task!r} has no fixed label set; "
                              "its model cannot label the probe pool")
        name = f"{t.setup.key}/{t.train_task}" + (f"/seed{t.seed}" if len(seeds) > 1 else "")
        items.append(BlackBoxItem(name=name, ref=f"run:{t.run_key}", template=IDENTITY, task=t.train_task,
                                  choices=tuple(spec.choices), source_task=t.train_task, after=(t.run_key,),
                                  prompt=None))
    tasks = sorted({x for t in trials for x in (t.train_task, t.eval_task)})
    return trials, items, tasks


def _prompt_items(cfg: EmbedConfig, registry: TaskRegistry) -> list[BlackBoxItem]:
    items = []
    for i, ps in enumerate(cfg.mte.prompts):
        where = f"{cfg.source_file}: field `mte.prompts.{i}`"
        try:
            spec = registry.get(ps.task)
        except TaskError as e:
            raise ConfigError(f"{where}: {e}") from None
        if spec.answer_type != "choice" or not spec.choices:
            raise ConfigError(f"{where}: task {ps.task!r} has no fixed label set; a prompt's soft labels need one")
        if isinstance(ps.templates, list):
            templates = list(ps.templates)
        elif ps.templates == "all":
            templates = task_templates(spec)
        elif ps.templates == "input":
            templates = [IDENTITY]
        else:
            templates = [t for t in task_templates(spec) if t.name == ps.templates]
            if not templates:
                raise ConfigError(f"{where}: task {ps.task!r} has no template {ps.templates!r}")
        templates += ps.extra
        names = [t.name for t in templates]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: prompt names must be unique per task, got {names}")
        for t in templates:
            if t.answer_choices is not None and len(t.answer_choices) != len(spec.choices):
                raise ConfigError(f"{where}: prompt {t.name!r} has {len(t.answer_choices)} answer_choices for the "
                                  f"{len(spec.choices)} labels {spec.choices}")
        for m in cfg.mte.models:
            for t in templates:
                items.append(BlackBoxItem(name=m.name, ref=m.ref, template=t, task=ps.task, choices=tuple(spec.choices),
                                          temperature=m.temperature, max_length=m.max_length, prompt=t.name))
    return items


def _check_tasks(cfg: EmbedConfig, registry: TaskRegistry) -> list[str]:
    for i, t in enumerate(cfg.dte.tasks):
        try:
            registry.origin(t)
            spec = registry.get(t)
        except TaskError as e:
            raise ConfigError(f"{cfg.source_file}: field `dte.tasks.{i}`: {e}") from None
        if spec.answer_type != "choice" or not spec.choices:
            raise ConfigError(f"{cfg.source_file}: field `dte.tasks.{i}`: task {t!r} has no fixed label set "
                              "(use dte.prompted_tasks for it)")
    prompted: list[str] = []
    if cfg.dte.prompted_tasks:
        try:
            have = read_prompted(cfg.dte.prompted_file)
        except TaskError as e:
            raise ConfigError(f"{cfg.source_file}: field `dte.prompted_file`: {e}") from None
        prompted = sorted(have) if cfg.dte.prompted_tasks == "all" else list(cfg.dte.prompted_tasks)
        missing = [t for t in prompted if t not in have]
        if missing:
            raise ConfigError(f"{cfg.source_file}: field `dte.prompted_tasks`: no prompted examples of {missing}")
    return prompted


def _probe_trials(cfg: EmbedConfig, items: list[BlackBoxItem], pool: ProbePool, pool_params: dict[str, Any],
                  common: dict[str, Any], seen: set[str]) -> tuple[list[TrialSpec], dict[int, str]]:
    """One probe trial per distinct black box (items sharing a key share the trial), and each item's probe key."""
    bb_store = cfg.mte.results_store or common["results_dir"]
    trials: list[TrialSpec] = []
    probe_keys: dict[int, str] = {}
    for i, it in enumerate(items):
        params = {**it.probe_params(), **pool_params, "batch_size": cfg.mte.batch_size, "results_store": bb_store}
        key = run_key({"kind": "probe", **it.probe_params(), "pool": pool.digest})
        probe_keys[i] = key
        if key in seen:
            continue
        seen.add(key)
        setup = SetupSpec(name=it.name, model=ModelSpec(name=it.name, path=it.ref, max_length=it.max_length),
                          resources=cfg.resources)
        trials.append(TrialSpec(run_key=key, kind="probe", executor="rayjobs.embed:probe_trial", setup=setup, hparams=setup.train,
                                train_task=it.task, eval_task=it.task, target=it.task, source=it.source_task,
                                seed=0, n_train=len(pool.examples), n_eval=None, after=list(it.after),
                                params={**params, "model": it.name, "prompt": it.prompt}, **common))
    return trials, probe_keys


def _score_trials(cfg: EmbedConfig, items: list[BlackBoxItem], registry: TaskRegistry, results: str,
                  seen: set[str]) -> list[TrialSpec]:
    """With `mte.score_eval`: the score job's trials of each prompt set on its task's eval split (new keys only)."""

    trials: list[TrialSpec] = []
    if not cfg.mte.score_eval:
        return trials
    for ps in cfg.mte.prompts:
        tpl = [t for t in items if t.task == ps.task and t.source_task is None]
        templates = list({t.template.name: t.template for t in tpl}.values())
        if not templates or not cfg.mte.models:
            continue
        scfg = ScoreConfig.model_validate({
            "name": cfg.name, "models": [m.model_dump() for m in cfg.mte.models], "tasks": [ps.task],
            "templates": [t.model_dump() for t in templates], "split": "eval", "n": cfg.mte.n_eval,
            "perplexity": cfg.mte.perplexity, "self_select": cfg.mte.self_select, "seeds": [0],
            "data_root": cfg.data_root,
            "task_files": list(cfg.task_files), "sizes": cfg.sizes.model_dump(), "resources": cfg.resources.model_dump(),
            "results_store": cfg.mte.results_store})
        for t in expand_score(scfg, registry, results):
            if t.run_key not in seen:
                seen.add(t.run_key)
                trials.append(t)
    return trials


def _dte_trials(cfg: EmbedConfig, registry: TaskRegistry, prompted: list[str], sid: str, seed: int,
                setup: SetupSpec, hparams: Any, base: dict[str, Any], common: dict[str, Any]) -> list[TrialSpec]:
    """One space and seed's DTE trials: a registry dataset per `dte.tasks`, a prompted one per prompted task."""
    datasets = [DatasetRef(task=t, source="registry", n=cfg.dte.n) for t in cfg.dte.tasks]
    datasets += [DatasetRef(task=t, source="prompted", n=cfg.dte.n_prompted,
                            free_text_choices=cfg.dte.free_text_choices, prompted_file=cfg.dte.prompted_file)
                 for t in prompted]
    trials = []
    for ds in datasets:
        origin = registry.origin(ds.task) if ds.source == "registry" else _prompted_origin(ds.prompted_file)
        ident = ds.model_dump(mode="json", exclude={"prompted_file"})
        key = run_key({"kind": "embed", "space": sid, "embedding": "DTE", "data": ident, "origin": origin})
        trials.append(TrialSpec(run_key=key, kind="embed", executor="rayjobs.embed:embed_trial", setup=setup, hparams=hparams,
                                train_task=ds.task, eval_task=ds.task, target=ds.task, seed=seed,
                                n_train=ds.n, n_eval=None,
                                params={**base, "embedding": "DTE", "dataset": ds.model_dump(mode="json")},
                                **common))
    return trials


def _mte_trials(items: list[BlackBoxItem], probe_keys: dict[int, str], pool: ProbePool, sid: str, seed: int,
                setup: SetupSpec, hparams: Any, base: dict[str, Any], common: dict[str, Any]) -> list[TrialSpec]:
    """One space and seed's MTE trials, one per black box, each after its probe trial."""
    trials = []
    for i, it in enumerate(items):
        key = run_key({"kind": "embed", "space": sid, "embedding": "MTE", "probe": probe_keys[i],
                       "model": it.name, "prompt": it.prompt})
        trials.append(TrialSpec(
            run_key=key, kind="embed", executor="rayjobs.embed:embed_trial", setup=setup, hparams=hparams, train_task=it.task,
            eval_task=it.task, target=it.task, source=it.source_task, seed=seed, n_train=len(pool.examples),
            n_eval=None, after=[probe_keys[i]],
            params={**base, "embedding": "MTE", "probe_key": probe_keys[i], "model": it.name, "ref": it.ref,
                    "prompt": it.prompt, "choices": list(it.choices), "source_task": it.source_task},
            **common))
    return trials


def expand_embed(cfg: EmbedConfig, store: ResultStore) -> tuple[list[TrialSpec], ProbePool, dict[str, str]]:
    """Every trial of an embed config (pairwise, probe, score, embed) and the probe pool; plus space ids."""
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    prompted = _check_tasks(cfg, registry)
    pair_trials, pair_items, pair_tasks = _pairwise(cfg, store)
    items = pair_items + _prompt_items(cfg, registry)
    targets = sorted({*cfg.targets, *cfg.dte.tasks, *prompted, *(p.task for p in cfg.mte.prompts), *pair_tasks})
    sz = cfg.sizes
    try:
        pool = build_pool(cfg.pool, registry, targets, sz.split_seed, sz.eval_fraction)
    except TaskError as e:
        raise ConfigError(f"{cfg.source_file}: field `pool`: {e}") from None
    if items and not pool.examples:
        raise ConfigError(f"{cfg.source_file}: field `pool`: model task embeddings need a probe pool "
                          "(pool.tasks / pool.prompted_tasks)")
    results = str(store.root)
    common = dict(experiment=cfg.name, eval_fraction=sz.eval_fraction, split_seed=sz.split_seed,
                  data_root=cfg.data_root, task_files=list(cfg.task_files), results_dir=results)
    pool_params = {"pool": cfg.pool.model_dump(mode="json"), "pool_digest": pool.digest, "targets": targets}
    trials: list[TrialSpec] = list(pair_trials)
    seen: set[str] = {t.run_key for t in trials}
    probes, probe_keys = _probe_trials(cfg, items, pool, pool_params, common, seen)
    trials += probes
    trials += _score_trials(cfg, items, registry, results, seen)
    sids: dict[str, str] = {}
    for space in cfg.spaces:
        for seed in cfg.seeds:
            sid = space_id(space, pool.digest, seed)
            sids[f"{space.name}/seed{seed}"] = sid
            setup = SetupSpec(name=space.name, model=space.surrogate, adaptation=space.adaptation, train=space.train,
                              resources=cfg.resources)
            base = {"space": space.model_dump(mode="json"), "space_id": sid, "variant": space.resolved_variant,
                    **pool_params, "composition": pool.composition}
            trials += _dte_trials(cfg, registry, prompted, sid, seed, setup, space.train, base, common)
            trials += _mte_trials(items, probe_keys, pool, sid, seed, setup, space.train, base, common)
    keys = [t.run_key for t in trials]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ConfigError(f"{cfg.source_file}: two entries plan the same run (identical black box, prompt and "
                          f"task under the same names?): {sorted(dup)[:3]}")
    return trials, pool, sids


def _prompted_origin(path: str | None) -> str:
    p = _prompted_file(path)
    return f"{p.name}#{file_digest(p)}"


def _write_pool(pool: ProbePool) -> Any:
    def write(store: ResultStore) -> None:
        dest = store.root / EMBEDDINGS_DIR / "pools" / f"{pool.digest}.json"
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        body = {**pool.composition, "examples": [e.uid for e in pool.examples]}
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        os.replace(tmp, dest)
    return write


# -- executors ---------------------------------------------------------------------------------------------------
def _pool_for(trial: TrialSpec) -> ProbePool:
    p = trial.params
    registry = TaskRegistry.load(trial.task_files, trial.data_root)
    pool = build_pool(PoolSpec.model_validate(p["pool"]), registry, p["targets"], trial.split_seed, trial.eval_fraction)
    if pool.digest != p["pool_digest"]:
        raise TaskError(f"the probe pool rebuilt here ({pool.digest}) is not the one planned ({p['pool_digest']}): "
                        "its task data changed since the job was planned")
    return pool


def probe_trial(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    """A black box labels the probe pool: one `predictions` row per probe input (split 'pool', no gold),
    `probs` in the task's canonical label order (the template's verbalisers are in that order)."""
    from rayjobs.train.loop import begin_trial, prediction_rows, trial_device  # lazy: scipy, worker-only

    t0 = time.time()
    p = trial.params
    ctx = begin_trial(trial, ctx)
    pool = _pool_for(trial)
    choices = tuple(p["choices"])
    examples = [replace(e, choices=choices, label=-1) for e in pool.examples]
    template = PromptTemplate.model_validate(p["template"])
    box = open_black_box(p["ref"], results=p.get("results_store") or trial.results_dir,
                         temperature=p.get("temperature"), max_length=p.get("max_length", 512)
                         ).to(trial_device(trial, ctx))
    records = box.score(template, examples, batch_size=p["batch_size"])
    bad = [e.uid for e, r in zip(examples, records, strict=True) if not r.get("probs") or len(r["probs"]) != len(choices)]
    if bad:
        raise ValueError(f"black box {p['ref']} returned no {len(choices)}-choice distribution for {bad[:3]}")
    rows = prediction_rows(trial.eval_task, template.name, "pool", [template.render(e) for e in examples], records)
    for r in rows:
        r.update(gold=None, gold_text=None, gold_value=None, correct=None)
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": "probe", "setup": trial.setup.key,
        "model": p.get("model") or trial.setup.model.name, "adaptation": "none", "source": trial.source,
        "target": trial.eval_task, "seed": trial.seed, "n_train": 0, "n_eval": len(rows),
        "hparams": {k: p[k] for k in ("ref", "temperature", "max_length", "template", "choices", "pool_digest")},
        "metric": None, "score": None,
        "metrics": {"black_box": box.kind, "template": template.name, "prompt": p.get("prompt"), "calls": len(rows),
                    "batch_size": p["batch_size"], "split": "pool", "choices": list(choices)},
        "train_time_s": 0.0, "wall_time_s": time.time() - t0, "host": socket.gethostname(), "status": "ok",
        "predictions": rows,
    }


def _dte_data(trial: TrialSpec) -> tuple[list[Any], Any, Any, dict[str, Any]]:
    """A DTE's training data: the dataset's examples, their one-hot labels, the choice task, and the run
    row's extra metrics (data name, origin, choices)."""

    ds = DatasetRef.model_validate(trial.params["dataset"])
    extra: dict[str, Any] = {}
    if ds.source == "registry":
        registry = TaskRegistry.load(trial.task_files, trial.data_root)
        examples, choices, origin = registry_examples(registry, ds.task, ds.n, trial.seed, trial.split_seed,
                                                      trial.eval_fraction)
        task = choice_task(ds.task, choices)
        extra["choices"] = choices
    else:
        examples, origin = prompted_examples(ds.prompted_file, ds.task, ds.n, trial.seed, ds.free_text_choices)
        task = choice_task(ds.task, None)
    targets = one_hot(examples)
    extra.update(data=ds.data_name, origin=origin)
    return examples, targets, task, extra


def _mte_data(trial: TrialSpec) -> tuple[list[Any], Any, Any, dict[str, Any]]:
    """An MTE's training data: the probe pool with the probe trial's stored soft labels, the choice task,
    and the run row's extra metrics (data, probe key, choices)."""

    p = trial.params
    pool = _pool_for(trial)
    table = ResultStore(trial.results_dir).read_predictions(p["probe_key"])
    if table is None:
        raise FileNotFoundError(f"no predictions of probe trial {p['probe_key']} (it must run first)")
    examples, targets = mte_examples(pool, table.to_pylist(), p["choices"])
    task = choice_task(trial.eval_task, p["choices"])
    return examples, targets, task, {"data": f"probe:{pool.digest}", "probe_key": p["probe_key"],
                                     "choices": p["choices"]}


def embed_trial(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    """One task embedding: train the space's surrogate on the data (one-hot labels for a DTE, the probe
    trial's stored soft labels for an MTE), compute the method's vector, write it, return the run row."""
    from rayjobs.train.loop import (  # lazy: the train loop (scipy) only in the trial's worker
        TrainContext,
        fit,
        seed_everything,
        trial_device,
    )

    t0 = time.time()
    ctx = ctx or TrainContext()
    p = trial.params
    space = SpaceSpec.model_validate(p["space"])
    seed_everything(trial.seed)
    what = p["embedding"]
    examples, targets, task, extra = _dte_data(trial) if what == "DTE" else _mte_data(trial)
    tm = build_surrogate(space, task, trial.seed)
    ctx = replace(ctx, device=trial_device(trial, ctx))  # a single-process trial with a GPU trains on it
    tm.module.to(ctx.device)
    soft = SoftLabelModel(tm, {e.uid: q for e, q in zip(examples, targets, strict=True)})
    fitted = fit(soft, examples, trial, ctx)
    vec, info = compute_embedding(space, tm, examples, targets, trial.seed)
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"the {what} of {trial.eval_task} has non-finite entries")
    dest = write_vector(trial.results_dir, trial.run_key, vec)
    trainable, total = tm.param_counts()
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": "embed", "setup": space.name,
        "model": p.get("model"), "adaptation": space.adaptation.method, "source": p.get("source_task"),
        "target": trial.eval_task, "seed": trial.seed, "n_train": len(examples), "n_eval": info.get("n_fisher"),
        "hparams": {"space": p["space"], "space_id": p["space_id"], "pool": p["pool"], "composition": p["composition"],
                    "steps": fitted.steps, "micro_batch": fitted.micro_batch},
        "metric": None, "score": None,
        "metrics": {"space": p["space_id"], "space_name": space.name, "embedding": what, "task": trial.eval_task,
                    "model": p.get("model"), "ref": p.get("ref"), "prompt": p.get("prompt"),
                    "source_task": p.get("source_task"), "dims": int(vec.size),
                    "file": f"{EMBEDDINGS_DIR}/{trial.run_key}.npy", "method": space.method, "variant": info["variant"],
                    "loss": LOSS, "final_train_loss": float(np.mean(fitted.losses[-10:])), "embedding_info": info,
                    "pool_digest": p["pool_digest"], **extra},
        "trainable_params": trainable, "total_params": total, "train_time_s": fitted.train_time_s,
        "wall_time_s": time.time() - t0, "host": socket.gethostname(), "checkpoint": str(dest), "status": "ok",
        "loss_curve": fitted.losses,
    }


# -- the job --------------------------------------------------------------------------------------------------
# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: Any) -> Any:
    """FUTE in minutes: every surrogate a tiny model of its family (its head kept), two optimiser steps, a
    Fisher over 4 examples, a 4-input-per-task probe pool from 2 tasks, 2 DTE tasks of each kind, the first
    prompt set with 2 prompts (+ 1 extra), hub or endpoint black boxes replaced by the offline MiniLM scorer,
    the referenced pairwise config shrunk as its own --smoke."""
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    offline = ("builtin:", "sentence:builtin:", "run:", "/", ".", "~")

    def space(s: Any) -> Any:
        model = s.surrogate
        tiny = ModelSpec(name=model.name, config=dict(TINY[model.family]), family=model.family,
                         max_length=min(model.max_length, 64), head=model.head)
        params = dict(s.adaptation.params)
        if "num_virtual_tokens" in params:
            params["num_virtual_tokens"] = min(int(params["num_virtual_tokens"]), 4)
        train = s.train.model_copy(update={"epochs": 1, "max_steps": 2, "batch_size": min(s.train.batch_size, 4)})
        return s.model_copy(update={"surrogate": tiny, "train": train, "trainable": [], "fisher_params": [],
                                    "fisher_examples": 4, "adaptation": s.adaptation.model_copy(update={"params": params})})

    local = [t for t in cfg.dte.tasks if has_local_data(registry, t)][:2]
    prompted = cfg.dte.prompted_tasks if cfg.dte.prompted_tasks == "all" else cfg.dte.prompted_tasks[:2]
    dte = cfg.dte.model_copy(update={"tasks": local, "n": 8, "n_prompted": 4,
                                     "prompted_tasks": ["cb", "mrpc"] if prompted == "all" else prompted})
    pool_tasks = [t for t in cfg.pool.tasks if has_local_data(registry, t)][:2]
    needs_pool = bool(cfg.mte.pairwise or (cfg.mte.models and cfg.mte.prompts))
    pool_prompted = cfg.pool.prompted_tasks[:2] or ([] if pool_tasks or not needs_pool else ["story_cloze"])
    pool = cfg.pool.model_copy(update={"tasks": pool_tasks, "prompted_tasks": pool_prompted, "n_per_task": 4})
    models = [m if m.ref.startswith(offline) else m.model_copy(update={"ref": "builtin:minilm", "temperature": None})
              for m in cfg.mte.models[:1]]
    prompts = [p.model_copy(update={"templates": p.templates if isinstance(p.templates, str) else p.templates[:2],
                                    "extra": p.extra[:1]})
               for p in cfg.mte.prompts if has_local_data(registry, p.task)][:1]
    pairwise = cfg.mte.pairwise.model_copy(update={"smoke": True}) if cfg.mte.pairwise else None
    mte = cfg.mte.model_copy(update={"models": models, "prompts": prompts, "pairwise": pairwise, "n_eval": 8,
                                     "batch_size": min(cfg.mte.batch_size, 8)})
    res = cfg.resources.model_copy(update={"gpu": 0, "cpu": 1, "memory_gb": None})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1],
                                  "spaces": [space(s) for s in cfg.spaces], "dte": dte, "pool": pool, "mte": mte,
                                  "resources": res})


class EmbedJob(Job, kind="embed", config=EmbedConfig):
    def plan(self, cfg: EmbedConfig, store: ResultStore) -> Plan:
        trials, pool, sids = expand_embed(cfg, store)
        n = {k: sum(1 for t in trials if t.kind == k) for k in ("embed", "probe", "score")}
        pair = len(trials) - sum(n.values())
        summary = (f"{len(trials)} runs ({n['embed']} embeddings in {len(sids)} space(s), {n['probe']} black boxes "
                   f"on a {len(pool.examples)}-input probe pool, {n['score']} eval scorings"
                   + (f", {pair} pairwise" if pair else "") + ")")
        return Plan(trials, summary=summary, view="task_embeddings", before_run=[_write_pool(pool)])

    def report(self, cfg: EmbedConfig, store: ResultStore) -> list[str]:
        with store.connect(read_only=True) as con:
            rows = con.execute("""SELECT space_name, space, kind, count(*), any_value(dims) FROM task_embeddings
                                  WHERE experiment = ? GROUP BY ALL ORDER BY ALL""", [cfg.name]).fetchall()
            lines = [f"space {n} ({sid}): {c} {k}s of {d} dims" for n, sid, k, c, d in rows]
            for sid in sorted({r[1] for r in rows}):
                try:
                    ret = own_task_retrieval(con, sid)
                except Exception:  # noqa: BLE001 - a summary only; the analyses report their own errors
                    continue
                if ret["n_models"]:
                    lines.append(f"  MTE of a source model -> its own task's DTE: mean rank {ret['mean_rank']:.2f} of "
                                 f"{ret['n_candidates']} DTEs (chance {ret['chance_mean_rank']:.2f}), "
                                 f"top-1 {ret['top1']}/{ret['n_models']}")
        return lines


JOB = EmbedJob()
main = module_entry(JOB.kind, __name__)
