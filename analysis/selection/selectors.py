"""Source-task selectors: every one yields a score F(source -> target) for every pair it knows,
stored in `selector_scores` (selector, method, params, source, target, score).

Names a user can pass (`resolve`) are the registry `REGISTRY` (`transferlab selectors --registered`)
plus any stored name. Adding a selector is one function registered with `@selector(NAME)`: it gets
the connection and the `Request` and returns the stored name of the scores it materialised; its
docstring's first line is its help text. Registered here:
  roe, llm, semb           stored scores (TaskWeb's release; `analysis.selection.prompt_similarity` for semb)
  taskshop-<F>             TaskShop (paper 000, Eq. 1) over a transfer setup with selector F
  random                   seeded uniform scores (baseline)
  size                     the source's training-set size (baseline, where sizes are known)
  oracle                   the stored transfer scores themselves, T(s -> t) of the setup
  feature, feature-l2, unigram, max, max-reverse
                           soft-prompt similarities of Lin et al. (paper 001), `analysis.selection.prompt_similarity`
  fute, fute-dte@<space>, fute-mte@<space>
                           FUTE's cosines of stored task embeddings (paper 004), `analysis.selection.fute`
A stored name that is not registered (e.g. 'roe-minilm', recomputed with `analysis.selection.roe`) resolves to itself.
Rankings break score ties by source name (ascending) everywhere, so tied SIZE scores rank deterministically.

TaskShop, as in TaskWeb's taskshop/taskshop_predict.py:
  TS(s, t) = lambda * mean_p (T(s->p) + F'(p->t)) / 2 + (1 - lambda) * F''(s->t)
  with pivots p = every task with T(s->p) known in the setup and F(p->t) known, p not in {s, t}
  (so only T among tasks other than t is used: the leave-one-out protocol holds by construction).
  F' and F'' are F after the pivot / direct normalisation: none for RoE; for LLM-similarity a
  z-score (pivot term) and min-max scaling (direct term), statistics over all raw LLM scores
  (population std), after the symmetric average of both directions. TaskWeb's final rescaling
  5*TS - 0.6 is monotone and omitted. Stored as `taskshop-<F>[<setup>,lambda=<l>]`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.registry import Registry, load_target
from analysis.selection.scores import (  # noqa: F401 - the registry module re-exports the score table
    base_selectors,
    has_selector,
    store_scores,
    stored_selectors,
)
from analysis.store.duck import query_arrow, registered
from analysis.transfer import MEAN, require_setup

BUILTIN = ("roe", "llm", "taskshop-roe", "taskshop-llm", "random", "size", "oracle")
NORMS = ("none", "zscore", "minmax")
# TaskWeb's normalisation of F inside TaskShop, by F (pivot term, direct term)
TASKSHOP_NORMS: dict[str, tuple[str, str]] = {"roe": ("none", "none"), "llm": ("zscore", "minmax")}
DEFAULT_LAMBDA = 0.7


# -- TaskShop -----------------------------------------------------------------------------------------
def _norm_sql(kind: str) -> str:
    if kind == "none":
        return "f.score"
    if kind == "zscore":
        return "(f.score - st.mu) / nullif(st.sd, 0)"
    if kind == "minmax":
        return "(f.score - st.lo) / nullif(st.hi - st.lo, 0)"
    raise AnalysisError(f"unknown normalisation '{kind}' (choose from {', '.join(NORMS)})")


def taskshop_components(con: duckdb.DuckDBPyConnection, setup: str, f_selector: str,
                        norms: tuple[str, str] | None = None, targets: list[str] | None = None) -> pa.Table:
    """Per (source, target): the pivot term, the direct term F''(s->t) and the number of pivots.

    Kept apart so that any lambda is one multiply-add (tuning evaluates a whole grid at once).
    """
    require_setup(con, setup)
    if not has_selector(con, f_selector):
        raise AnalysisError(f"TaskShop needs stored scores of selector '{f_selector}' as F; "
                            f"stored: {', '.join(s['name'] for s in stored_selectors(con)) or 'none'}")
    piv_norm, dir_norm = norms or TASKSHOP_NORMS.get(f_selector, ("none", "none"))
    target_filter = "" if targets is None else "AND list_contains($targets, f.target)"
    params: dict[str, Any] = {"f": f_selector, "setup": setup}
    if targets is not None:
        params["targets"] = list(targets)
    return query_arrow(con, f"""
        WITH st AS (SELECT avg(score) AS mu, stddev_pop(score) AS sd, min(score) AS lo, max(score) AS hi
                    FROM selector_scores WHERE selector = $f),
             fn AS (SELECT f.source, f.target, {_norm_sql(piv_norm)} AS f_pivot, {_norm_sql(dir_norm)} AS f_direct
                    FROM selector_pair_scores f, st WHERE f.selector = $f {target_filter}),
             tr AS (SELECT source, target AS pivot, score AS t FROM analysis_transfers WHERE setup = $setup),
             piv AS (SELECT tr.source, fn.target, avg(0.5 * tr.t + 0.5 * fn.f_pivot) AS pivot_term,
                            count(*) AS n_pivots
                     FROM tr JOIN fn ON fn.source = tr.pivot
                     WHERE tr.pivot <> tr.source AND tr.pivot <> fn.target AND tr.source <> fn.target
                     GROUP BY tr.source, fn.target)
        SELECT piv.source, piv.target, piv.pivot_term, d.f_direct AS direct_term, piv.n_pivots
        FROM piv JOIN fn d ON d.source = piv.source AND d.target = piv.target
        ORDER BY piv.target, piv.source""", params)


def taskshop_name(f_selector: str, setup: str, lam: float) -> str:
    return f"taskshop-{f_selector}[{setup},lambda={lam:g}]"


def compute_taskshop(con: duckdb.DuckDBPyConnection, setup: str, f_selector: str, lam: float = DEFAULT_LAMBDA,
                     norms: tuple[str, str] | None = None, name: str | None = None) -> str:
    """TaskShop scores for every (source, target) F covers, stored; returns the stored name."""
    if not 0.0 <= lam <= 1.0:
        raise AnalysisError(f"lambda must lie in [0, 1], got {lam}")
    setup = _need_setup(setup, f"taskshop-{f_selector}")
    comp = taskshop_components(con, setup, f_selector, norms)
    if comp.num_rows == 0:
        raise AnalysisError(f"TaskShop over setup '{setup}' with F='{f_selector}' scores no pair: "
                            "the setup's tasks and F's tasks do not overlap")
    with registered(con, "_comp", comp):
        scores = query_arrow(con, "SELECT source, target, $lam * pivot_term + (1 - $lam) * direct_term AS score "
                                  "FROM _comp", {"lam": lam})
    piv_norm, dir_norm = norms or TASKSHOP_NORMS.get(f_selector, ("none", "none"))
    name = name or taskshop_name(f_selector, setup, lam)
    store_scores(con, name, "taskshop", {"f": f_selector, "setup": setup, "lambda": lam,
                                         "f_pivot_norm": piv_norm, "f_direct_norm": dir_norm}, scores)
    return name


# -- baselines ------------------------------------------------------------------------------------------
def _universe(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("""
        SELECT DISTINCT t FROM (SELECT source AS t FROM setup_transfers UNION SELECT target FROM setup_transfers
                                UNION SELECT source FROM selector_scores UNION SELECT target FROM selector_scores)
        ORDER BY t""").fetchall()]


def compute_random(con: duckdb.DuckDBPyConnection, seed: int = 0) -> str:
    """Uniform random scores for every ordered pair of known tasks, reproducible from `seed`."""
    tasks = _universe(con)
    if len(tasks) < 2:
        raise AnalysisError("the store knows fewer than two tasks: nothing to rank")
    src = np.repeat(np.array(tasks, dtype=object), len(tasks))
    tgt = np.tile(np.array(tasks, dtype=object), len(tasks))
    keep = src != tgt
    rng = np.random.default_rng(seed)
    table = pa.table({"source": src[keep].tolist(), "target": tgt[keep].tolist(),
                      "score": rng.random(int(keep.sum()))})
    name = f"random[seed={seed}]"
    store_scores(con, name, "random", {"seed": seed}, table)
    return name


def compute_size(con: duckdb.DuckDBPyConnection) -> str:
    """Score = training-set size of the source: imported sizes, else the source runs' n_train."""
    table = query_arrow(con, """
        WITH sizes AS (
            SELECT task, max(n_train) AS n FROM task_sizes GROUP BY task
            UNION ALL
            SELECT source, max(n_train) FROM runs
            WHERE kind = 'source' AND status = 'ok' AND n_train IS NOT NULL
              AND source NOT IN (SELECT task FROM task_sizes) GROUP BY source),
             tasks AS (SELECT DISTINCT target AS t FROM setup_transfers UNION SELECT target FROM selector_scores)
        SELECT s.task AS source, tasks.t AS target, CAST(s.n AS DOUBLE) AS score
        FROM sizes s CROSS JOIN tasks WHERE s.task <> tasks.t""")
    if table.num_rows == 0:
        raise AnalysisError("no task sizes known: import them with `transferlab import sizes FILE` "
                            "(e.g. ../shared/data/its/task_sizes.csv) or store source runs with n_train")
    store_scores(con, "size", "size", {"source": "task_sizes, else source runs' n_train"}, table)
    return "size"


def compute_oracle(con: duckdb.DuckDBPyConnection, setup: str) -> str:
    """The stored transfer scores as a selector: the gold ranking itself (the paper's TaskWeb rows)."""
    require_setup(con, setup)
    table = query_arrow(con, "SELECT source, target, score FROM analysis_transfers WHERE setup = ?", [setup])
    name = f"oracle[{setup}]"
    store_scores(con, name, "oracle", {"setup": setup}, table)
    return name


# -- the registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What a user asked for: a selector name and the options some selectors take."""

    name: str
    setup: str | None = None
    lam: float | None = None
    seed: int = 0
    norms: tuple[str, str] | None = None


Compute = Callable[[duckdb.DuckDBPyConnection, Request], str]


@dataclass(frozen=True)
class SelectorSpec:
    """A registered selector: `compute(con, request)` materialises its scores, returns the stored name."""

    name: str
    compute: Compute | str  # the function, or "module:function" imported on first use
    doc: str
    needs_setup: bool = False
    prefix: bool = False  # the name is a prefix: 'taskshop-' matches 'taskshop-<F>'
    stored: bool = False  # scores must have been stored beforehand (imported, or computed by a command)

    def run(self, con: duckdb.DuckDBPyConnection, req: Request) -> str:
        fn = load_target(self.compute, "selector") if isinstance(self.compute, str) else self.compute
        return fn(con, req)


REGISTRY: Registry[SelectorSpec] = Registry("selector")


def selector(name: str, *, needs_setup: bool = False, prefix: bool = False, stored: bool = False,
             doc: str | None = None) -> Callable[[Compute], Compute]:
    """Register `fn(con, request) -> stored name` as selector `name`.

    Help text: `doc`, else the first line of the function's docstring (one function may serve several
    names: it reads `request.name`).
    """
    return REGISTRY.decorator(name, lambda fn: SelectorSpec(
        name, fn, doc or (inspect.getdoc(fn) or "").split("\n")[0], needs_setup, prefix, stored))


def lookup(name: str) -> SelectorSpec | None:
    """The registered selector a user-facing name means (exact names first, then prefixes)."""
    spec = REGISTRY.get(name)
    if spec is not None and not spec.prefix:
        return spec
    return next((s for s in REGISTRY.values() if s.prefix and name.startswith(s.name) and len(name) > len(s.name)),
                None)


def registered_selectors() -> list[dict[str, Any]]:
    """Every registered name with its help text, whether it needs --setup and whether it must be stored first."""
    return [{"name": f"{s.name}<F>" if s.prefix else s.name, "doc": s.doc, "needs_setup": s.needs_setup,
             "stored": s.stored} for s in sorted(REGISTRY.values(), key=lambda s: s.name)]


def resolve(con: duckdb.DuckDBPyConnection, name: str, setup: str | None = None, lam: float | None = None,
            seed: int = 0, norms: tuple[str, str] | None = None) -> str:
    """Materialise the scores behind a user-facing selector name; return their stored name."""
    spec = lookup(name)
    if spec is not None:
        if spec.needs_setup:
            _need_setup(setup, name)
        return spec.run(con, Request(name, setup, lam, seed, norms))
    if has_selector(con, name):
        return name
    raise AnalysisError(f"unknown selector '{name}' ({_known(con)})")


def _stored(con: duckdb.DuckDBPyConnection, name: str) -> str:
    if has_selector(con, name):
        return name
    raise AnalysisError(f"unknown selector '{name}' ({_known(con)})")


def _need_setup(setup: str | None, name: str) -> str:
    if not setup:
        raise AnalysisError(f"selector '{name}' needs a transfer setup: pass --setup ADAPTATION:MODEL")
    return setup


def _known(con: duckdb.DuckDBPyConnection) -> str:
    stored = [s["name"] for s in stored_selectors(con)]
    return (f"registered: {', '.join(s['name'] for s in registered_selectors())} (roe, llm after "
            f"`transferlab import taskweb`); stored: {', '.join(stored) if stored else 'none'}")


# -- registered selectors ---------------------------------------------------------------------------------
@selector("roe", stored=True)
def _roe(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """Retrieval-of-Experts scores of the TaskWeb release (`transferlab import taskweb`)."""
    return _stored(con, req.name)


@selector("llm", stored=True)
def _llm(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """LLM-similarity of the TaskWeb release, symmetric (`transferlab import taskweb`)."""
    return _stored(con, req.name)


@selector("semb", stored=True)
def _semb(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """SEMB: cosine of dataset-mean sentence embeddings (store with analysis.selection.prompt_similarity.store_semb)."""
    return _stored(con, req.name)


@selector("random")
def _random(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """RANDOM baseline: uniform scores from --seed."""
    return compute_random(con, req.seed)


@selector("size")
def _size(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """SIZE baseline: the source's training-set size (ties rank by source name)."""
    return compute_size(con)


@selector("oracle", needs_setup=True)
def _oracle(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """The setup's stored transfer scores themselves (the gold ranking)."""
    return compute_oracle(con, req.setup or "")


@selector("taskshop-", needs_setup=True, prefix=True)
def _taskshop(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """TaskShop (paper 000, Eq. 1) with the stored selector F, over --setup, with --lambda."""
    f = req.name[len("taskshop-"):]
    if not has_selector(con, f):
        raise AnalysisError(f"unknown selector '{req.name}': TaskShop's F '{f}' has no stored scores "
                            f"({_known(con)})")
    return compute_taskshop(con, req.setup or "", f, DEFAULT_LAMBDA if req.lam is None else req.lam, req.norms)


# selectors in their own modules: registered by name, imported on first use (torch/safetensors only then)
for _name, _doc in [
        ("feature", "FEATURE (Lin et al. Eq. 3): cosine of the mean soft-prompt token vectors of --setup's checkpoints"),
        ("feature-l2", "FEATURE with every prompt token L2-normalised before the mean"),
        ("unigram", "UNIGRAM (Lin et al.): cosine of the per-token means over the features"),
        ("max", "MAX (Lin et al. Eq. 4): mean over target prompt tokens of the best cosine with a source token"),
        ("max-reverse", "MAX the other way: mean over source prompt tokens of the best cosine with a target token")]:
    REGISTRY.add(_name, SelectorSpec(_name, "analysis.selection.prompt_similarity:select", _doc, needs_setup=True))
REGISTRY.add("fute", SelectorSpec("fute", "analysis.selection.fute:select_only_space",
                                  "FUTE (paper 004): cos(DTE(s), DTE(t)) of the one embedding space with DTEs "
                                  "(several spaces: name one, fute-dte@<space>)"))
REGISTRY.add("fute-dte@", SelectorSpec(
    "fute-dte@", "analysis.selection.fute:select_space",
    "FUTE (paper 004): F(s->t) = cos(DTE(s), DTE(t)) in the named embedding space (id, id prefix or name)",
    prefix=True))
REGISTRY.add("fute-mte@", SelectorSpec(
    "fute-mte@", "analysis.selection.fute:select_space",
    "FUTE: F(s->t) = mean cos(MTE(model trained on s), DTE(t)) over s's models, in the named space", prefix=True))


__all__ = ["BUILTIN", "DEFAULT_LAMBDA", "MEAN", "REGISTRY", "Request", "SelectorSpec", "compute_oracle",
           "compute_random", "compute_size", "compute_taskshop", "lookup", "registered_selectors", "resolve",
           "selector", "store_scores", "stored_selectors", "taskshop_components"]


def compare_selectors(con: duckdb.DuckDBPyConnection, a: str, b: str, k: int = 5) -> dict[str, Any]:
    """How close selector `a` comes to `b` over the pairs both score (e.g. a recomputed vs the released RoE).

    Pearson and Spearman over all pairs, mean / max absolute difference, and per target the
    Spearman correlation of the two source rankings and the overlap of their top-k sets. Spearman's rho is
    the Pearson correlation of average ranks (tied scores share the mean of their positions), as
    `scipy.stats.spearmanr`; DuckDB's `rank()` alone gives ties the lowest rank, which is not rho.
    """
    for s in (a, b):
        if not has_selector(con, s):
            raise AnalysisError(f"unknown selector '{s}' ({_known(con)})")
    row = con.execute("""
        WITH j AS (SELECT x.target, x.source, x.score AS sa, y.score AS sb FROM selector_pair_scores x
                   JOIN selector_pair_scores y ON y.selector = $b AND y.source = x.source AND y.target = x.target
                   WHERE x.selector = $a),
             r AS (SELECT *,  -- average ranks of ties (Spearman's rho = Pearson of these, as scipy.stats.spearmanr)
                          rank() OVER (ORDER BY sa) + (count(*) OVER (PARTITION BY sa) - 1) / 2 AS ra,
                          rank() OVER (ORDER BY sb) + (count(*) OVER (PARTITION BY sb) - 1) / 2 AS rb,
                          rank() OVER (PARTITION BY target ORDER BY sa)
                            + (count(*) OVER (PARTITION BY target, sa) - 1) / 2 AS ta,
                          rank() OVER (PARTITION BY target ORDER BY sb)
                            + (count(*) OVER (PARTITION BY target, sb) - 1) / 2 AS tb,
                          row_number() OVER (PARTITION BY target ORDER BY sa DESC, source) AS pa,
                          row_number() OVER (PARTITION BY target ORDER BY sb DESC, source) AS pb FROM j),
             per AS (SELECT target, corr(ta, tb) AS rho,
                            count(*) FILTER (WHERE pa <= $k AND pb <= $k) AS both_top,
                            count(*) FILTER (WHERE pa <= $k) AS n_top
                     FROM r GROUP BY target)
        SELECT (SELECT count(*) FROM j), (SELECT count(DISTINCT target) FROM j),
               (SELECT corr(sa, sb) FROM j), (SELECT corr(ra, rb) FROM r),
               (SELECT avg(abs(sa - sb)) FROM j), (SELECT max(abs(sa - sb)) FROM j),
               (SELECT avg(rho) FROM per), (SELECT avg(both_top / n_top) FROM per),
               (SELECT avg(sa - sb) FROM j)""", {"a": a, "b": b, "k": k}).fetchone()
    if not row[0]:
        raise AnalysisError(f"selectors '{a}' and '{b}' share no (source, target) pair")
    keys = ["n_pairs", "n_targets", "pearson", "spearman", "mean_abs_diff", "max_abs_diff",
            "mean_per_target_spearman", f"mean_top{k}_overlap", "mean_diff"]
    return {"a": a, "b": b, **dict(zip(keys, row, strict=True))}
