"""Multi-task sweep job (paper 000, sections 4.2, 5.2, 5.3): which source sets help a target zero-shot.

    python -m rayjobs.multitask --config configs/multitask_quickstart.yaml [--results DIR] [--smoke]
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

import argparse
import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml

from analysis.errors import AnalysisError
from analysis.store import ResultStore
from rayjobs.config import ConfigError, SetupSpec
from rayjobs.models.loading import ModelError
from rayjobs.multitask_config import RANKED_KINDS, ChoiceSpec, MultitaskConfig, load_multitask_config
from rayjobs.plan import TrialSpec, prompt_identity, trial_key
from rayjobs.preflight import check_setup
from rayjobs.runner import finish, run_stage
from rayjobs.smoke import _smoke_setup, has_local_data
from rayjobs.tasks import TaskError, TaskRegistry
from rayjobs.templates import task_templates


@dataclass(frozen=True)
class SourceSet:
    """One chosen multi-task set for one target (seed- and setup-independent)."""

    target: str
    selection: str  # e.g. top-5:taskshop-roe, bottom-5:oracle, random-5:roe:seed=0, mix-2of5:oracle, all
    method: str  # top | bottom | random | all | most_similar | mix
    sources: tuple[str, ...]  # in selection order
    n_per_source: int
    selector: str | None = None
    selection_setup: str | None = None
    replaced: int | None = None

    @property
    def key_sources(self) -> list[str]:
        return sorted(self.sources)


def _fail(where: str, field: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: field `{field}`: {msg}")


# -- candidates and checks -------------------------------------------------------------------------
def candidate_pool(cfg: MultitaskConfig, registry: TaskRegistry, where: str) -> list[str]:
    """The configured pool, or every registry task whose local data file exists."""
    if cfg.pool is not None:
        for i, t in enumerate(cfg.pool):
            _need_task(registry, t, where, f"pool.{i}")
        return list(dict.fromkeys(cfg.pool))
    pool = []
    for name in registry.names:
        path = registry.local_path(registry.get(name))
        if path is not None and path.is_file():
            pool.append(name)
    if not pool:
        raise _fail(where, "pool", f"no task has a local data file under {registry.data_root}; list the pool "
                                   "explicitly (tasks loaded from the hub) or set data_root")
    return pool


def _need_task(registry: TaskRegistry, task: str, where: str, field: str) -> str:
    """The task's data origin; unknown tasks and missing data are config errors naming the field."""
    try:
        return registry.origin(task)
    except TaskError as e:
        raise _fail(where, field, str(e)) from None


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


# -- choosing source sets ----------------------------------------------------------------------------
@contextmanager
def selection_store(cfg: MultitaskConfig, results_dir: str, where: str) -> Iterator[duckdb.DuckDBPyConnection]:
    from analysis.db import open_store

    path = Path(cfg.selection.store) if cfg.selection.store else ResultStore(results_dir).db_path
    if not path.exists():
        raise _fail(where, "selection.store",
                    f"no selection store at {path}; build one with `transferlab import taskweb "
                    f"../shared/data/taskweb --db {path}` (or run the pairwise job into it)")
    with open_store(path) as con:
        yield con


def choose_sets(cfg: MultitaskConfig, registry: TaskRegistry, pool: list[str],
                con: duckdb.DuckDBPyConnection | None, where: str | None = None) -> list[SourceSet]:
    """Every (target, choice, k) source set, through `analysis.multitask_sets.select_sources`."""
    from analysis.analytics import require_setup

    where = where or cfg.source_file
    for i, t in enumerate(cfg.targets):
        _need_task(registry, t, where, f"targets.{i}")
    for t, s in cfg.most_similar.items():
        if t not in cfg.targets:
            raise _fail(where, f"most_similar.{t}", f"{t!r} is not one of the sweep's targets {cfg.targets}")
        _need_task(registry, s, where, f"most_similar.{t}")
        if s == t:
            raise _fail(where, f"most_similar.{t}", "the most similar task of a target cannot be the target")
    n = cfg.n_per_source
    checked_setups: set[str] = set()
    out: list[SourceSet] = []
    for ci, ch in enumerate(cfg.choices):
        field = f"choices.{ci}"
        targets = ch.targets if ch.targets is not None else cfg.targets
        for t in targets:
            if t not in cfg.targets:
                raise _fail(where, f"{field}.targets", f"{t!r} is not one of the sweep's targets {cfg.targets}")
        if ch.kind == "all":
            for t in targets:
                srcs = tuple(s for s in pool if s != t)
                if not srcs:
                    raise _fail(where, "pool", f"no candidate source besides the target {t!r}")
                out.append(SourceSet(t, "all", "all", srcs, n))
            continue
        if ch.kind == "most_similar":
            for t in targets:
                if t not in cfg.most_similar:
                    raise _fail(where, "most_similar", f"no hand-picked most similar task for target {t!r}")
                out.append(SourceSet(t, "most-similar", "most_similar", (cfg.most_similar[t],),
                                     n * cfg.most_similar_k))
            continue
        assert con is not None
        selector = ch.selector or cfg.selection.selector
        setup = ch.setup or cfg.selection.setup
        sfield = f"{field}.setup" if ch.setup else "selection.setup"
        if setup and setup not in checked_setups:
            try:
                require_setup(con, setup)
            except AnalysisError as e:
                raise _fail(where, sfield, str(e)) from None
            checked_setups.add(setup)
        sel_field = f"{field}.selector" if ch.selector else "selection.selector"
        for t in targets:
            out += _ranked_sets(con, cfg, ch, selector, setup, t, pool, where, field, sel_field)
    # overlapping choices (`top, k: [1, 3]` and `top, k: 3`) name the same set: keep it once
    unique: dict[tuple[str, str], SourceSet] = {}
    for ss in out:
        unique.setdefault((ss.target, ss.selection), ss)
    return list(unique.values())


def _ranked_sets(con: duckdb.DuckDBPyConnection, cfg: MultitaskConfig, ch: ChoiceSpec, selector: str,
                 setup: str | None, target: str, pool: list[str], where: str, field: str,
                 sel_field: str) -> list[SourceSet]:
    from analysis.multitask_sets import select_sources

    def select(k: int, exclude: list[str] | None = None) -> dict[str, Any]:
        return select_sources(con, target, selector, k, setup=setup, lam=cfg.selection.lam, seed=ch.seed,
                              exclude=exclude)

    try:
        ranking = select(1)["ranking"]
    except AnalysisError as e:
        raise _fail(where, sel_field, str(e)) from None
    exclude = [r["source"] for r in ranking if r["source"] not in pool]
    n_cand = len(ranking) - len(exclude)
    sets = []
    for k in ch.ks:
        kk = n_cand if k == "all" else int(k)
        need = 2 * kk if ch.kind == "mix" else kk
        if need > n_cand or kk < 1:
            what = f"2k={need} (top-k and bottom-k must not overlap)" if ch.kind == "mix" else f"k={kk}"
            raise _fail(where, f"{field}.k", f"{what} but target {target!r} has only {n_cand} candidate sources "
                                             f"(pool tasks scored by selector {selector!r})")
        res = select(kk, exclude)
        common = dict(target=target, n_per_source=cfg.n_per_source, selector=selector, selection_setup=setup)
        label = "all" if k == "all" else str(kk)
        # a choice that overrides the transfer setup names it: two such choices must not share a name
        tag = f"{selector}[{ch.setup}]" if ch.setup else selector
        if ch.kind in ("top", "bottom"):
            sets.append(SourceSet(selection=f"{ch.kind}-{label}:{tag}", method=ch.kind,
                                  sources=tuple(res[ch.kind]), **common))
        elif ch.kind == "random":
            sets.append(SourceSet(selection=f"random-{kk}:{tag}:seed={ch.seed}", method="random",
                                  sources=tuple(res["random"]), **common))
        else:  # mix: the k-th best goes first, replaced by the worst, and so on
            for i in range(kk + 1):
                sets.append(SourceSet(selection=f"mix-{i}of{kk}:{tag}", method="mix", replaced=i,
                                      sources=tuple(res["top"][:kk - i] + res["bottom"][:i]), **common))
    return sets


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
    """Paths resolved against the driver's folder: Tune runs each trial in its own folder."""
    def ab(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    return cfg.model_copy(update={"data_root": ab(cfg.data_root), "task_files": [ab(f) for f in cfg.task_files],
                                  "selection": cfg.selection.model_copy(update={"store": ab(cfg.selection.store)})})


def plan(cfg: MultitaskConfig, results_dir: str) -> tuple[ResultStore, list[TrialSpec], list[dict]]:
    """Everything that can fail before training fails here: tasks, data, models, selectors, k."""
    where = cfg.source_file
    store = ResultStore(results_dir)
    store.ensure_writable()
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
    trials, rows = expand_multitask(cfg, sets, TaskRegistry.load(task_files, cfg.data_root), str(store.root),
                                    task_files)
    return store, trials, rows


def record_selections(store: ResultStore, rows: list[dict]) -> None:
    """Upsert which choice asked for which run key (idempotent: keyed by experiment/setup/target/choice/seed)."""
    if not rows:
        return
    import pyarrow as pa

    from analysis.db import registered

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


def run(cfg: MultitaskConfig, results_dir: str) -> int:
    store, trials, rows = plan(cfg, results_dir)
    record_selections(store, rows)
    store.ingest()
    done = store.finished_keys()
    todo = [t for t in trials if t.run_key not in done]
    print(f"transferlab: multi-task sweep {cfg.name!r}: {len(rows)} (choice, target, setup, seed) cells -> "
          f"{len(trials)} distinct runs, {len(trials) - len(todo)} already stored, {len(todo)} to run; "
          f"results in {store.root}", flush=True)
    if todo:
        run_stage(f"{cfg.name}-multitask", todo, cfg.run, store.root / "tune")
        store.ingest()
    for line in table_lines(store, cfg):
        print(line)
    return finish(store, trials, "multitask_table")


def smoke_variant(cfg: MultitaskConfig) -> MultitaskConfig:
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
                                  "setups": [_smoke_setup(s) for s in cfg.setups]})


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """`transferlab multitask CONFIG [--results DIR] [--smoke]` (registered by rayjobs/cli.py)."""
    p = sub.add_parser("multitask", help="run a multi-task sweep config on Ray (source-set choices, zero-shot)")
    p.add_argument("config")
    p.add_argument("--results", help="results folder (overrides the config's results_dir)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: check a config end to end")
    p.set_defaults(func=lambda a: main(["--config", a.config, *(["--results", a.results] if a.results else []),
                                        *(["--smoke"] if a.smoke else [])]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayjobs.multitask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--results", help="results folder (overrides the config's results_dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one seed, tiny models for hub ids")
    args = ap.parse_args(argv)
    cfg = load_multitask_config(args.config)
    if args.smoke:
        cfg = smoke_variant(cfg)
    return run(cfg, str(Path(args.results or cfg.results_dir)))


if __name__ == "__main__":
    from rayjobs.cli import guarded

    sys.exit(guarded(main))
