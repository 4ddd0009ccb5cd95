"""Multi-task sweep job (paper 000, sections 4.2, 5.2, 5.3): which source sets help a target zero-shot.

    transferlab run configs/multitask_quickstart.yaml [--results DIR] [--smoke] [KEY=VALUE ...]
    ray job submit --working-dir . -- python -m rayjobs.multitask --config configs/multitask_quickstart.yaml

For every target and every configured choice of sources (a selector's top-k / bottom-k / random-k,
the stored transfers' top-k, all tasks, a hand-picked most similar task, top-k/bottom-k mixes) the
job trains one model per (setup, seed) on n prompted examples from each chosen source, shuffled
together, and evaluates the target zero-shot, averaged over prompt templates. Runs are keyed by
the sorted source set (plus n, seed, setup, target and evaluation), so two choices that yield the
same set train once; runs already stored are skipped, so re-submitting resumes the sweep. Which
choice asked for which run is recorded in the `multitask_selections` table; the `multitask_*`
views give the paper's Table 3/4/5 and Figure 4 comparisons.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from analysis.store.duck import registered
from analysis.store.results import ResultStore
from rayjobs.config import SetupSpec
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setup
from rayjobs.engine.smoke import has_local_data, smoke_setup
from rayjobs.job import Job, Plan
from rayjobs.models.loading import ModelError
from rayjobs.multitask_config import RANKED_KINDS, MultitaskConfig, load_multitask_config
from rayjobs.multitask_sources import (
    SourceSet,
    _fail,
    _need_task,
    candidate_pool,
    choose_sets,
    selection_store,
)
from rayjobs.plan import TrialSpec, prompt_identity, trial_key
from rayjobs.tasks.registry import TaskError, TaskRegistry
from rayjobs.tasks.templates import task_templates

__all__ = ["MultitaskJob", "candidate_pool", "choose_sets", "load_multitask_config", "plan"]


def check_models(cfg: MultitaskConfig, tasks: list[str], registry: TaskRegistry, where: str) -> None:
    """Each setup must answer every task's choices: an encoder needs the multiple-choice head."""
    for i, setup in enumerate(cfg.setups):
        fam = setup.model.family
        if fam == "encoder":
            if setup.model.head != "multiple_choice":
                raise _fail(where, f"setups.{i}.model.head",
                            "a multi-task encoder must use `head: multiple_choice` (it scores (input, choice) "
                            "pairs, so one model serves every task's choices and transfers zero-shot)")
            for t in tasks:
                if registry.get(t).answer_type != "choice":
                    raise _fail(where, f"setups.{i}.model",
                                f"task {t!r} has {registry.get(t).answer_type} answers; an encoder multiple-choice "
                                "head cannot train or evaluate it (use a seq2seq or causal model)")
        elif importlib.util.find_spec("rayjobs.models.text_to_text") is None:
            raise _fail(where, f"setups.{i}.model.family",
                        f"{fam} models need rayjobs/models/text_to_text.py, which this checkout lacks")
        try:
            check_setup(setup, tasks, registry)
        except (ModelError, TaskError) as e:
            raise _fail(where, f"setups.{i}", str(e)) from None


# -- trials --------------------------------------------------------------------------------------------
def sweep_prompts(cfg: MultitaskConfig) -> MultitaskConfig:
    """A sweep trains on prompted examples and evaluates over several prompts (paper 000, 4.2 / Table 3):
    a setup's `default` prompt choice means `all` here (a seeded template per training example, the
    mean over every template of the target)."""
    def one(s: SetupSpec) -> SetupSpec:
        p = s.prompts
        return s.model_copy(update={"prompts": p.model_copy(update={
            "train": "all" if p.train == "default" else p.train, "eval": "all" if p.eval == "default" else p.eval})})

    return cfg.model_copy(update={"setups": [one(s) for s in cfg.setups]})


def templates_file(cfg: MultitaskConfig, registry: TaskRegistry, results_dir: str) -> str | None:
    """A task file adding the config's eval templates to every target's prompts (workers load it as a
    task file, so they evaluate the very templates the run key was computed from)."""
    if not cfg.eval_templates:
        return None
    specs = {}
    for t in cfg.targets:
        spec = registry.get(t)
        body = spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)
        have = task_templates(spec)
        clash = {x.name for x in have} & {x.name for x in cfg.eval_templates}
        if clash:
            raise _fail(cfg.source_file, "eval_templates", f"target {t!r} already has templates named {sorted(clash)}")
        body["prompts"] = [x.model_dump(exclude_none=True) for x in [*have, *cfg.eval_templates]]
        specs[t] = body
    text = yaml.safe_dump({"tasks": specs}, sort_keys=True)
    folder = Path(results_dir) / "multitask"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"eval-templates-{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        path.write_text(text)
    return str(path)


def expand_multitask(cfg: MultitaskConfig, sets: list[SourceSet], registry: TaskRegistry,
                     results_dir: str, task_files: list[str] | None = None) -> tuple[list[TrialSpec], list[dict]]:
    """One trial per distinct (setup, target, sorted source set, n, seed); one selection row per choice."""
    task_files = list(cfg.task_files) if task_files is None else task_files
    sz = cfg.sizes
    origins: dict[str, str] = {}

    def origin(t: str) -> str:
        if t not in origins:
            origins[t] = registry.origin(t)
        return origins[t]

    trials: dict[str, TrialSpec] = {}
    rows: list[dict] = []
    for setup in cfg.setups:
        for ss in sets:
            srcs = ss.key_sources
            for seed in cfg.seeds:
                key = _key(setup, srcs, ss, seed, cfg, registry, origin)
                if key not in trials:
                    trials[key] = TrialSpec(
                        run_key=key, experiment=cfg.name, kind="multitask", setup=setup, hparams=setup.train,
                        train_task="+".join(srcs), eval_task=ss.target, target=ss.target, sources=srcs,
                        seed=seed, n_train=ss.n_per_source, n_eval=sz.eval, eval_fraction=sz.eval_fraction,
                        split_seed=sz.split_seed, data_root=cfg.data_root, task_files=task_files,
                        results_dir=results_dir)
                rows.append({"experiment": cfg.name, "setup": setup.key, "target": ss.target,
                             "selection": ss.selection, "seed": seed, "method": ss.method,
                             "selector": ss.selector, "selection_setup": ss.selection_setup,
                             "k": len(ss.sources), "replaced": ss.replaced, "sources": list(ss.sources),
                             "run_key": key})
    return list(trials.values()), rows


def _key(setup: SetupSpec, srcs: list[str], ss: SourceSet, seed: int, cfg: MultitaskConfig,
         registry: TaskRegistry, origin: Any) -> str:
    """Data and prompt templates of every source and of the target (the registry passed here already
    holds the config's eval templates)."""
    sz = cfg.sizes

    def data(t: str) -> str:
        return f"{origin(t)}|{prompt_identity(setup, registry.get(t))}"

    return trial_key(kind="multitask", setup=setup, hparams=setup.train, train_task="+".join(srcs),
                     train_origin=";".join(data(s) for s in srcs), eval_task=ss.target,
                     eval_origin=data(ss.target), seed=seed,
                     n_train=ss.n_per_source, n_eval=sz.eval, eval_fraction=sz.eval_fraction,
                     split_seed=sz.split_seed, sources=srcs)


def absolute_paths(cfg: MultitaskConfig) -> MultitaskConfig:
    """Paths resolved against the driver's folder: Ray runs each trial worker in a folder of its own."""
    def ab(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    return cfg.model_copy(update={"data_root": ab(cfg.data_root), "task_files": [ab(f) for f in cfg.task_files],
                                  "selection": cfg.selection.model_copy(update={"store": ab(cfg.selection.store)})})


def plan(cfg: MultitaskConfig, results_dir: str) -> tuple[ResultStore, list[TrialSpec], list[dict]]:
    """Everything that can fail before training fails here: tasks, data, models, selectors, k."""
    store = ResultStore(results_dir)
    store.ensure_writable()
    trials, rows = _plan(cfg, store)
    return store, trials, rows


def _plan(cfg: MultitaskConfig, store: ResultStore) -> tuple[list[TrialSpec], list[dict]]:
    where = cfg.source_file
    cfg = sweep_prompts(absolute_paths(cfg))
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    pool = candidate_pool(cfg, registry, where)
    needs_store = any(c.kind not in ("all", "most_similar") for c in cfg.choices)
    if needs_store:
        with selection_store(cfg, str(store.root), where) as con:
            sets = choose_sets(cfg, registry, pool, con, where)
    else:
        sets = choose_sets(cfg, registry, pool, None, where)
    used = list(dict.fromkeys([*cfg.targets, *(s for ss in sets for s in ss.sources)]))
    for t in used:
        _need_task(registry, t, where, "targets" if t in cfg.targets else "pool")
    check_models(cfg, used, registry, where)
    extra = templates_file(cfg, registry, str(store.root))
    task_files = [*cfg.task_files, *([extra] if extra else [])]
    return expand_multitask(cfg, sets, TaskRegistry.load(task_files, cfg.data_root), str(store.root), task_files)


def record_selections(store: ResultStore, rows: list[dict]) -> None:
    """Upsert which choice asked for which run key (idempotent: keyed by experiment/setup/target/choice/seed)."""
    if not rows:
        return


    cols = ["experiment", "setup", "target", "selection", "seed", "method", "selector", "selection_setup",
            "k", "replaced", "sources", "run_key"]
    table = pa.Table.from_pylist(rows)
    with store.connect() as con, registered(con, "_sel", table):
        con.execute(f"INSERT OR REPLACE INTO multitask_selections ({', '.join(cols)}) "
                    f"SELECT {', '.join(cols)} FROM _sel")


# -- driver ----------------------------------------------------------------------------------------------
def table_lines(store: ResultStore, cfg: MultitaskConfig) -> list[str]:
    """Table 3-style: one row per selection, one column per target, and the mean."""
    with store.connect(read_only=True) as con:
        rows = con.execute("SELECT setup, selection, target, score FROM multitask_scores WHERE experiment = ? "
                           "ORDER BY setup, selection", [cfg.name]).fetchall()
    lines: list[str] = []
    for setup in [s.key for s in cfg.setups]:
        cells = {(sel, t): sc for su, sel, t, sc in rows if su == setup}
        if not cells:
            continue
        sels = list(dict.fromkeys(sel for sel, _ in cells))
        tgts = [t for t in cfg.targets if any(k[1] == t for k in cells)]
        w = max(len(x) for x in [*sels, "selection"]) + 1
        cw = max(8, *(len(t) + 1 for t in tgts))
        lines.append(f"Zero-shot target scores for {setup} (mean over seeds and templates, x100):")
        lines.append("selection".ljust(w) + "".join(t.rjust(cw) for t in tgts) + "mean".rjust(cw))
        for sel in sels:
            vals = [cells.get((sel, t)) for t in tgts]
            got = [v for v in vals if v is not None]
            mean = f"{100 * sum(got) / len(got):.2f}" if got else "-"
            lines.append(sel.ljust(w) + "".join((f"{100 * v:.2f}" if v is not None else "-").rjust(cw)
                                                for v in vals) + mean.rjust(cw))
    return lines


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: MultitaskConfig) -> MultitaskConfig:
    """The same kinds of choice, shrunk to run end to end in minutes on a CPU with no hub.

    Tiny sizes, one seed, tiny models for hub ids; at most 2 targets (1 when a setup is distributed:
    a Ray Train group per trial is slow on a laptop), those with local data first; the pool cut to
    tasks with local data; one small k per choice (at most 3, a mix at most 2; with a distributed
    setup one choice per kind and k = 1, so the mixes reuse the top-1 / bottom-1 runs). A choice restricted
    to targets that were cut moves to the first kept target, so every kind of choice still runs.
    """
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)

    def local(t: str) -> bool:
        return has_local_data(registry, t)

    distributed = any(s.deepspeed is not None or s.resources.workers > 1 for s in cfg.setups)
    targets = sorted(cfg.targets, key=lambda t: not local(t))[:1 if distributed else 2]
    pool = cfg.pool
    if pool is not None and sum(map(local, pool)) >= 2:
        pool = [t for t in pool if local(t)]
    choices = []
    kinds: set[str] = set()
    for ch in cfg.choices:
        if distributed and ch.kind in kinds:  # one choice per kind: each run is a worker group
            continue
        kinds.add(ch.kind)
        update: dict[str, Any] = {}
        if ch.targets is not None:
            update["targets"] = [t for t in ch.targets if t in targets] or targets[:1]
        if ch.kind in RANKED_KINDS:
            ints = [k for k in ch.ks if k != "all"]
            small = 1 if distributed else (2 if ch.kind == "mix" else 3)
            update["k"] = [min(min(ints), small)] if ints else ["all"]
        choices.append(ch.model_copy(update=update))
    sizes = cfg.sizes.model_copy(update={"eval": 24})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1], "n_per_source": 16,
                                  "sizes": sizes, "targets": targets, "pool": pool, "choices": choices,
                                  "most_similar": {t: s for t, s in cfg.most_similar.items() if t in targets},
                                  "setups": [smoke_setup(s) for s in cfg.setups]})


class MultitaskJob(Job, kind="multitask", config=MultitaskConfig):
    def plan(self, cfg: MultitaskConfig, store: ResultStore) -> Plan:
        trials, rows = _plan(cfg, store)
        return Plan(trials, summary=f"{len(rows)} (choice, target, setup, seed) cells -> {len(trials)} distinct runs",
                    view="multitask_table", before_run=[lambda st: record_selections(st, rows)])

    def report(self, cfg: MultitaskConfig, store: ResultStore) -> list[str]:
        return table_lines(store, cfg)


JOB = MultitaskJob()
main = module_entry(JOB.kind, __name__)
