"""Choosing the source sets of a multi-task sweep (paper 000, sections 5.2-5.3).

For every target and every configured choice (a selector's top-k / bottom-k / random-k, the stored
transfers' top-k, all pool tasks, a hand-picked most similar task, top-k/bottom-k mixes) one
`SourceSet`; rankings come from a results store through `analysis.selection.source_sets.select_sources`.
Errors are config errors naming the file and the field that asked for the impossible set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from analysis.errors import AnalysisError
from analysis.selection.source_sets import select_sources
from analysis.store.duck import open_store
from analysis.store.results import ResultStore
from analysis.transfer import require_setup
from rayjobs.config import ConfigError
from rayjobs.multitask_config import ChoiceSpec, MultitaskConfig
from rayjobs.tasks.registry import TaskError, TaskRegistry


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


# -- choosing source sets ----------------------------------------------------------------------------
@contextmanager
def selection_store(cfg: MultitaskConfig, results_dir: str, where: str) -> Iterator[duckdb.DuckDBPyConnection]:
    path = Path(cfg.selection.store) if cfg.selection.store else ResultStore(results_dir).db_path
    if not path.exists():
        raise _fail(where, "selection.store",
                    f"no selection store at {path}; build one with `transferlab import taskweb "
                    f"../shared/data/taskweb --db {path}` (or run the pairwise job into it)")
    with open_store(path) as con:
        yield con


def choose_sets(cfg: MultitaskConfig, registry: TaskRegistry, pool: list[str],
                con: duckdb.DuckDBPyConnection | None, where: str | None = None) -> list[SourceSet]:
    """Every (target, choice, k) source set, through `analysis.selection.source_sets.select_sources`."""
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


