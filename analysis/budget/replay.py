"""Replay: answer a proposed (setup, source, target, seed) transfer run from stored per-seed runs.

Why: a budget policy is judged on the released TaskWeb grid (31,936 per-seed runs) in minutes on a
laptop instead of retraining. `load_grid` turns one setup of a store into dense arrays
(source x target x seed); `Replay` answers runs from them and counts what was spent.

Baselines. TaskWeb released no target-only runs, but its per-setup PC is a linear function of them:
with x[s, k] the metric of s -> t at seed k and y_k = 1 / p(m_t at seed k),
    n_s * (PC(s, t) + 1) = sum_{k run} x[s, k] * y_k        (21 sources, 8 unknowns per target),
so least squares over the sources gives every (target, seed) baseline. On the release this is exact:
the derived baselines reproduce every published PC to 1e-12 and every PM exactly on all 7 setups x
21 targets (tests/analysis/budget/test_budget_replay.py), with three conventions the data pins down:
  - the metric of a target is the store's task metric p, except where the release's PC is only
    reproduced by one of the run's single metrics (TaskWeb's cb PC uses accuracy, not acc+F1): the
    candidates are tried in order and the first reproducing PC within 1e-9 is kept (`metric_of`);
  - a transfer equal to its baseline (a tie, e.g. the majority class) is not positive: baselines
    within 1e-9 (relative) of a transfer are snapped to it;
  - PM divides by every seed run, a failed run (NaN metric) counting as not positive; PC averages
    over the runs with a metric.
Where several solutions fit (wsc: sources with identical predictions on several seeds), the
minimum-norm one is taken; it also reproduces PC and PM. A store with real baselines (runs of kind
'target') uses them; a setup with neither baselines nor a published PC (TaskWeb's lora:t5b and
pfeiffer:t5l) gets each (target, seed) baseline estimated as the median transfer into that target at
that seed (`exact=False`; on the 7 exact setups its mean relative error is about 4%).

Per-seed score. The TaskWeb score of a pair over a set of seeds is the mean over those seeds of
z = 0.5 (x - b) / b + 0.1 * 1[x > b] - 0.05, so one seed's run is one observation z of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from analysis.errors import AnalysisError
from analysis.store.views import ANALYSIS_SQL

TIE_RTOL = 1e-9
PRIORS = ("roe", "llm")


@dataclass
class Grid:
    """One setup's transfer grid as arrays: x[s, t, k] per-seed metric (NaN: failed or not in the grid)."""

    setup: str
    sources: list[str]
    targets: list[str]
    seeds: list[int]
    x: np.ndarray  # (S, T, K) metric of s -> t at seed k that the transfer score uses
    ran: np.ndarray  # (S, T, K) bool: the run exists (it may have failed: x NaN)
    base: np.ndarray  # (T, K) target-only baseline p(m_t) per seed
    exact: np.ndarray  # (T,) bool: baselines from runs or solved exactly from the published PC
    priors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (S, T) selector score, NaN unknown
    metric_of: dict[str, str] = field(default_factory=dict)  # target -> metric used
    published: dict[str, np.ndarray] = field(default_factory=dict)  # 'pc', 'pm' (S, T) where released
    p: np.ndarray | None = None  # (S, T, K) the store's task metric (Regret@k's P); x where None

    @property
    def pairs(self) -> np.ndarray:
        """(S, T) bool: the pair is in the grid (s != t, released on every seed)."""
        return self.ran.all(axis=2)

    def z(self) -> np.ndarray:
        """(S, T, K) per-seed score 0.5 rel + 0.1 positive - 0.05; NaN where not run, -0.05 where failed."""
        b = self.base[None]
        rel = (self.x - b) / b
        z = 0.5 * np.nan_to_num(rel) + 0.1 * (self.x > b) - 0.05
        return np.where(self.ran, z, np.nan)

    def score(self, seed_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(PC, PM, score) per (S, T) over the seeds in `seed_mask` ((K,) or (S, T, K) bool)."""
        m = np.broadcast_to(seed_mask, self.x.shape) & self.ran
        b = self.base[None]
        ok = m & ~np.isnan(self.x)
        with np.errstate(invalid="ignore", divide="ignore"):
            pc = np.where(ok, (self.x - b) / b, 0).sum(2) / ok.sum(2)
            pm = (m & (self.x > b)).sum(2) / m.sum(2)
        return pc, pm, 0.5 * pc + 0.5 * (0.2 * pm - 0.1)

    def perf(self, seed_mask: np.ndarray) -> np.ndarray:
        """(S, T) mean target metric over the seeds in `seed_mask` (Regret@k's P)."""
        p = self.x if self.p is None else self.p
        m = np.broadcast_to(seed_mask, p.shape) & self.ran & ~np.isnan(p)
        with np.errstate(invalid="ignore"):
            return np.where(m, p, 0).sum(2) / m.sum(2)


def _solve_baselines(x: np.ndarray, ran: np.ndarray, pc: np.ndarray, pm: np.ndarray
                     ) -> tuple[np.ndarray, float, float]:
    """Per-seed baselines of one target from the published PC (rows = sources with a PC).

    Returns (b (K,), max |PC error|, max |PM error|)."""
    ok = ran & ~np.isnan(x)
    n = ok.sum(1)
    y = np.linalg.lstsq(np.where(ok, x, 0.0), n * (pc + 1), rcond=None)[0]
    b = 1.0 / y
    # ties: a baseline within TIE_RTOL of a transfer at its seed equals it
    near = ok & (np.abs(np.nan_to_num(x) - b) <= TIE_RTOL * np.abs(b))
    for k in np.flatnonzero(near.any(0)):
        b[k] = x[near[:, k], k][0]
    pc_hat = np.where(ok, (x - b) / b, 0).sum(1) / n
    pm_hat = (ran & (x > b)).sum(1) / ran.sum(1)
    return b, float(np.abs(pc_hat - pc).max()), float(np.abs(pm_hat - pm).max())


def _metric_candidates(con: duckdb.DuckDBPyConnection, setup: str) -> list[str]:
    keys = con.execute("""SELECT DISTINCT unnest(json_keys(metrics)) FROM runs
                          WHERE setup = ? AND kind = 'transfer' AND metrics IS NOT NULL""", [setup]).fetchall()
    return sorted(k[0] for k in keys if k[0].startswith("eval_"))


def _transfer_runs(con: duckdb.DuckDBPyConnection, setup: str) -> Any:
    """The setup's transfer runs at each target's canonical config (score NULL where the run failed)."""
    runs = con.execute("""
        SELECT r.source, r.target, r.seed, CASE WHEN r.status = 'ok' THEN r.score END AS score, r.metrics
        FROM runs r JOIN canonical_hparams h
          ON h.setup = r.setup AND h.target = r.target
         AND h.hparams = coalesce(CAST(json(r.hparams) AS VARCHAR), '{}')
        WHERE r.setup = ? AND r.kind = 'transfer' AND r.source <> r.target""", [setup]).df()
    if runs.empty:
        have = [r[0] for r in con.execute("SELECT DISTINCT setup FROM runs WHERE kind = 'transfer' ORDER BY 1").fetchall()]
        raise AnalysisError(f"no transfer runs for setup '{setup}' (setups with runs: {', '.join(have) or 'none'})")
    return runs


def _dense_grid(setup: str, runs: Any, sources: Any = (), targets: Any = ()
                ) -> tuple[Grid, dict[str, int], dict[str, int], dict[int, int]]:
    """The runs as a Grid with no baselines yet, and the source, target and seed indices; `sources` and
    `targets` add tasks that have no transfer run (a budgeted grid's untrained sources)."""
    sources = sorted(set(runs.source.unique()) | set(sources))
    targets = sorted(set(runs.target.unique()) | set(targets))
    seeds = sorted(int(s) for s in runs.seed.unique())
    si = {s: i for i, s in enumerate(sources)}
    ti = {t: i for i, t in enumerate(targets)}
    ki = {k: i for i, k in enumerate(seeds)}
    S, T, K = len(sources), len(targets), len(seeds)
    idx = (runs.source.map(si).to_numpy(), runs.target.map(ti).to_numpy(), runs.seed.map(ki).to_numpy())
    ran = np.zeros((S, T, K), bool)
    ran[idx] = True
    x = np.full((S, T, K), np.nan)
    x[idx] = runs.score.to_numpy(float)
    grid = Grid(setup, sources, targets, seeds, x, ran, np.full((T, K), np.nan), np.zeros(T, bool), p=x.copy())
    return grid, si, ti, ki


def _stored_baselines(con: duckdb.DuckDBPyConnection, grid: Grid, ti: dict[str, int], ki: dict[int, int]) -> None:
    """Baselines from the store's target-only runs; a target with all of them is exact."""
    base = con.execute("""SELECT target, seed, avg(score) FROM runs WHERE setup = ? AND kind = 'target'
                          AND status = 'ok' GROUP BY ALL""", [grid.setup]).fetchall()
    for t, k, v in base:
        if t in ti and k in ki:
            grid.base[ti[t], ki[k]] = v
    grid.exact[:] = ~np.isnan(grid.base).any(1)


def _published_baselines(con: duckdb.DuckDBPyConnection, grid: Grid, runs: Any, si: dict[str, int],
                         ti: dict[str, int], ki: dict[int, int]) -> None:
    """Baselines solved from the published PC for the targets without stored ones; where the task metric
    does not reproduce PC, the first single metric of the runs that does (its values replace x)."""
    pub = con.execute("""SELECT source, target, pc, pm FROM published_transfer_scores
                         WHERE adaptation || ':' || model = ?""", [grid.setup]).df()
    if pub.empty:
        return
    x, ran = grid.x, grid.ran
    S, T, K = x.shape
    pc = np.full((S, T), np.nan)
    pm = np.full((S, T), np.nan)
    keep = pub.source.isin(si) & pub.target.isin(ti)
    pi = (pub.source[keep].map(si).to_numpy(), pub.target[keep].map(ti).to_numpy())
    pc[pi], pm[pi] = pub.pc[keep], pub.pm[keep]
    grid.published = {"pc": pc, "pm": pm}
    metrics = None
    for t, j in ti.items():
        rows = ~np.isnan(pc[:, j]) & ran[:, j].any(1)
        if grid.exact[j] or not rows.any():
            continue
        b, err, _ = _solve_baselines(x[rows, j], ran[rows, j], pc[rows, j], pm[rows, j])
        if err > 1e-9:  # the release's PC uses another metric of the run (cb: accuracy)
            metrics = metrics if metrics is not None else _metric_candidates(con, grid.setup)
            for name in metrics:
                xm = _single_metric(runs, name, t, si, ki, S, K)
                if np.isnan(xm[ran[:, j]]).all():
                    continue
                b2, err2, _ = _solve_baselines(xm[rows], ran[rows, j], pc[rows, j], pm[rows, j])
                if err2 <= 1e-9:
                    x[:, j], b, err = xm, b2, err2
                    grid.metric_of[t] = name.removeprefix("eval_")
                    break
        grid.base[j] = b
        grid.exact[j] = err <= 1e-9


def _median_baselines(grid: Grid) -> None:
    """Baselines still unknown: the median transfer into the target at that seed (estimated, not exact)."""
    for j in np.flatnonzero(np.isnan(grid.base).any(1)):
        med = np.nanmedian(np.where(grid.ran[:, j], grid.x[:, j], np.nan), axis=0)
        grid.base[j] = np.where(np.isnan(grid.base[j]), med, grid.base[j])


def _load_priors(con: duckdb.DuckDBPyConnection, grid: Grid, priors: list[str] | None, si: dict[str, int],
                 ti: dict[str, int]) -> None:
    """Each prior as an (S, T) array: a stored selector, or `oracle[<setup>]`; named ones must have scores."""
    S, T = len(grid.sources), len(grid.targets)
    for name in priors if priors is not None else PRIORS:
        other = name[len("oracle["):-1] if name.startswith("oracle[") and name.endswith("]") else None
        rows = (con.execute("SELECT source, target, score FROM analysis_transfers WHERE setup = ?", [other]).fetchall()
                if other else
                con.execute("SELECT source, target, score FROM selector_pair_scores WHERE selector = ?", [name]).fetchall())
        if not rows and priors is not None:
            raise AnalysisError(f"prior '{name}' has no stored scores (a stored selector, or oracle[SETUP])")
        if rows:
            a = np.full((S, T), np.nan)
            for s, t, v in rows:
                if s in si and t in ti:
                    a[si[s], ti[t]] = v
            grid.priors[name] = a


def load_grid(con: duckdb.DuckDBPyConnection, setup: str, priors: list[str] | None = None,
              tasks: list[str] | None = None) -> Grid:
    """The setup's grid from a store: transfer runs at each target's canonical config, baselines
    (stored, derived from the published PC, or estimated; see the module docstring), and priors:
    stored selectors by name (default: roe and llm where stored), or `oracle[<setup>]` for another
    setup's transfer scores (a cheaper setup's grid). `tasks` are sources and targets of the grid
    even where nothing was trained from or into them (a budgeted grid's plan)."""
    runs = _transfer_runs(con, setup)
    grid, si, ti, ki = _dense_grid(setup, runs, tasks or (), tasks or ())
    _stored_baselines(con, grid, ti, ki)
    _published_baselines(con, grid, runs, si, ti, ki)
    _median_baselines(grid)
    _load_priors(con, grid, priors, si, ti)
    return grid


def _single_metric(runs: Any, name: str, target: str, si: dict[str, int], ki: dict[int, int], S: int, K: int
                   ) -> np.ndarray:
    """(S, K) one metric of the runs into `target` (fractions; the release mixes percent and fractions)."""
    out = np.full((S, K), np.nan)
    for s, k, m in runs.loc[runs.target == target, ["source", "seed", "metrics"]].itertuples(index=False):
        v = json.loads(m).get(name) if isinstance(m, str) else None
        if isinstance(v, (int, float)) and np.isfinite(v):
            out[si[s], ki[k]] = v / 100.0 if v > 1 else v
    return out


def taskweb_store(directory: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory store holding the TaskWeb release (the same import as `transferlab import taskweb`)."""
    from analysis.importers.taskweb import import_taskweb  # lazy: pyarrow only when a store is opened
    from analysis.store.results import SCHEMA_SQL  # lazy: pyarrow only when a store is opened

    con = duckdb.connect()
    con.execute(SCHEMA_SQL)
    con.execute(ANALYSIS_SQL)
    import_taskweb(con, directory)
    return con


def released_setups(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT DISTINCT setup FROM runs WHERE kind = 'transfer' ORDER BY 1").fetchall()]


@dataclass
class Cost:
    """Runs spent: transfers, baselines (target, seed) and source trainings (source, seed)."""

    transfers: int = 0
    baselines: int = 0
    sources: int = 0

    @property
    def total(self) -> int:
        return self.transfers + self.baselines + self.sources


def full_grid_cost(grid: Grid, n_seeds: int | None = None) -> Cost:
    """The exhaustive grid's runs on `n_seeds` seeds (default: all of the grid's)."""
    k = len(grid.seeds) if n_seeds is None else n_seeds
    pairs = grid.pairs
    return Cost(int(pairs.sum()) * k, int(pairs.any(0).sum()) * k, int(pairs.any(1).sum()) * k)


class Replay:
    """Answers runs from a grid; a run's cost includes the baseline and source training it needs
    the first time its (target, seed) / (source, seed) is used. Deterministic: same runs, same answers."""

    def __init__(self, grid: Grid, seeds: list[int] | None = None):
        self.grid = grid
        self.allowed = set(grid.seeds if seeds is None else seeds)
        self._z = grid.z()
        self._si = {s: i for i, s in enumerate(grid.sources)}
        self._ti = {t: i for i, t in enumerate(grid.targets)}
        self._ki = {k: i for i, k in enumerate(grid.seeds)}
        self.cost = Cost()
        self.done: set[tuple[str, str, int]] = set()
        self._base_done: set[tuple[str, int]] = set()
        self._src_done: set[tuple[str, int]] = set()

    def marginal_cost(self, source: str, target: str, seed: int) -> int:
        return 1 + ((target, seed) not in self._base_done) + ((source, seed) not in self._src_done)

    def run(self, source: str, target: str, seed: int) -> float | None:
        """The per-seed score z of the run (None: it failed). Unknown pairs or seeds are errors."""
        if seed not in self.allowed:
            raise AnalysisError(f"seed {seed} is not among the seeds this replay may use ({sorted(self.allowed)})")
        try:
            i, j, k = self._si[source], self._ti[target], self._ki[seed]
        except KeyError as e:
            raise AnalysisError(f"run {source} -> {target} seed {seed}: {e.args[0]} is not in setup "
                                f"'{self.grid.setup}'") from None
        if not self.grid.ran[i, j, k]:
            raise AnalysisError(f"run {source} -> {target} seed {seed} is not in setup '{self.grid.setup}'")
        key = (source, target, seed)
        if key not in self.done:
            self.done.add(key)
            self.cost.transfers += 1
            if (target, seed) not in self._base_done:
                self._base_done.add((target, seed))
                self.cost.baselines += 1
            if (source, seed) not in self._src_done:
                self._src_done.add((source, seed))
                self.cost.sources += 1
        v = self._z[i, j, k]
        return None if np.isnan(self.grid.x[i, j, k]) else float(v)
