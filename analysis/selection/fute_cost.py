"""FUTE's cost claim (paper 004, Sec. 4.2.5), counted: O((k_p + k_D) c_o) for FUTE against O(k_p k_D c_b)
for the prompt-selection baselines, with unit costs measured on a store.

For k_p prompts (black boxes) and k_D datasets:
  FUTE       every prompt labels the probe pool once (m black-box calls) and gets one MTE; every dataset
             gets one DTE; then k_p x k_D cosines (free):
               calls = k_p m,            seconds = k_p (m c_call + c_mte) + k_D c_dte
  baselines  every prompt is run on every dataset's n unlabelled inputs (MI, LocalE, GlobalE, ZPS; the
             statistics themselves are free):
               calls = k_p k_D n,        seconds = k_p k_D n c_call
Break-even: FUTE makes fewer black-box calls once k_D n > m, i.e. k_D > m / n, for any k_p; it takes less
time once k_D > k_p (m c_call + c_mte) / (k_p n c_call - c_dte) (never when k_p n c_call <= c_dte); with
k_p = k_D = k, once k > (m c_call + c_mte + c_dte) / (n c_call).
Unit costs come from the store's wall times: c_call = seconds per black-box call of the probe trials
(model loading included, amortised over their batch), c_mte / c_dte = mean seconds of an MTE / DTE trial.
"""

from __future__ import annotations

import math
from typing import Any

import duckdb

from analysis.errors import AnalysisError


def cost_model(k_p: int, k_d: int, m: int, n: int, c_call: float, c_mte: float, c_dte: float) -> dict[str, float]:
    """Calls and seconds of FUTE and of the baselines for k_p prompts and k_D datasets (module docstring)."""
    for name, v in (("k_p", k_p), ("k_D", k_d), ("m", m), ("n", n)):
        if v < 0:
            raise AnalysisError(f"{name} must not be negative, got {v}")
    return {"fute_calls": k_p * m, "baseline_calls": k_p * k_d * n,
            "fute_seconds": k_p * (m * c_call + c_mte) + k_d * c_dte,
            "baseline_seconds": k_p * k_d * n * c_call}


def break_even(m: int, n: int, c_call: float, c_mte: float, c_dte: float, k_p: int | None = None) -> dict[str, float]:
    """Smallest k_D from which FUTE is cheaper (calls, and seconds for the given k_p), and the symmetric k."""
    if n <= 0 or c_call <= 0:
        raise AnalysisError("break-even needs n > 0 inputs per dataset and a positive cost per call")
    out = {"k_d_calls": m / n, "k_symmetric_seconds": (m * c_call + c_mte + c_dte) / (n * c_call)}
    if k_p is not None:
        denom = k_p * n * c_call - c_dte
        out["k_d_seconds"] = k_p * (m * c_call + c_mte) / denom if denom > 0 else math.inf
    return out


def measured_units(con: duckdb.DuckDBPyConnection, experiment: str) -> dict[str, Any]:
    """Unit costs of one embed experiment: probe calls and seconds, eval-scoring calls, MTE / DTE seconds."""
    row = con.execute("""
        SELECT (SELECT sum(CAST(json_extract(metrics, '$.calls') AS BIGINT)) FROM runs
                WHERE experiment = $e AND kind = 'probe' AND status = 'ok') AS probe_calls,
               (SELECT sum(wall_time_s) FROM runs WHERE experiment = $e AND kind = 'probe' AND status = 'ok') AS probe_s,
               (SELECT count(*) FROM runs WHERE experiment = $e AND kind = 'probe' AND status = 'ok') AS n_probe,
               (SELECT sum(n_eval) FROM runs WHERE experiment = $e AND kind = 'score' AND status = 'ok') AS eval_calls,
               (SELECT sum(wall_time_s) FROM runs WHERE experiment = $e AND kind = 'score' AND status = 'ok') AS eval_s,
               (SELECT count(*) FROM runs WHERE experiment = $e AND kind = 'score' AND status = 'ok') AS n_eval_runs,
               (SELECT avg(wall_time_s) FROM task_embeddings WHERE experiment = $e AND kind = 'MTE') AS c_mte,
               (SELECT avg(wall_time_s) FROM task_embeddings WHERE experiment = $e AND kind = 'DTE') AS c_dte,
               (SELECT count(*) FROM task_embeddings WHERE experiment = $e AND kind = 'MTE') AS n_mte,
               (SELECT count(*) FROM task_embeddings WHERE experiment = $e AND kind = 'DTE') AS n_dte
        """, {"e": experiment}).fetchone()
    keys = ["probe_calls", "probe_seconds", "n_probe_runs", "eval_calls", "eval_seconds", "n_eval_runs", "c_mte",
            "c_dte", "n_mte", "n_dte"]
    u = dict(zip(keys, row, strict=True))
    if not u["n_probe_runs"] or not u["n_mte"] or not u["n_dte"]:
        raise AnalysisError(f"experiment '{experiment}' has no probe runs, MTEs or DTEs to measure costs from")
    u["m"] = u["probe_calls"] / u["n_probe_runs"]
    u["c_call"] = u["probe_seconds"] / u["probe_calls"]
    u["n"] = (u["eval_calls"] / u["n_eval_runs"]) if u["n_eval_runs"] else None
    u["c_call_eval"] = (u["eval_seconds"] / u["eval_calls"]) if u["eval_calls"] else None
    return u


def cost_report(con: duckdb.DuckDBPyConnection, experiment: str, k_p: int, k_d: int,
                what_if_call_seconds: list[float] | None = None) -> dict[str, Any]:
    """The measured units, both costs at (k_p, k_D), the break-even points, and lines for a report."""
    u = measured_units(con, experiment)
    n = int(round(u["n"] or 0))
    if n <= 0:
        raise AnalysisError(f"experiment '{experiment}' scored no eval split: the baselines' n is unknown")
    m = int(round(u["m"]))
    at = cost_model(k_p, k_d, m, n, u["c_call"], u["c_mte"], u["c_dte"])
    be = break_even(m, n, u["c_call"], u["c_mte"], u["c_dte"], k_p)
    lines = [f"Measured on `{experiment}`: probe pool m = {m} inputs, baselines' n = {n} inputs per dataset, "
             f"c_call = {u['c_call']:.3f} s per black-box call (probe trials, loading included; eval scoring "
             f"{u['c_call_eval']:.3f} s), c_mte = {u['c_mte']:.1f} s per MTE, c_dte = {u['c_dte']:.1f} s per DTE.", "",
             f"At this experiment's k_p = {k_p} prompts and k_D = {k_d} datasets: FUTE {at['fute_calls']} black-box calls "
             f"and {at['fute_seconds']:.0f} s; the baselines {at['baseline_calls']} calls and "
             f"{at['baseline_seconds']:.0f} s.", "",
             f"Break-even: FUTE makes fewer black-box calls once k_D > m / n = {be['k_d_calls']:.2f} datasets (any k_p); "
             f"it takes less time at k_p = {k_p} once k_D > {be['k_d_seconds']:.1f}; with k_p = k_D = k once "
             f"k > {be['k_symmetric_seconds']:.1f}."]
    what_if = []
    for c in what_if_call_seconds or []:
        b = break_even(m, n, c, u["c_mte"], u["c_dte"], k_p)
        what_if.append({"c_call": c, **b})
        lines.append(f"With a black box costing {c:g} s per call (an LLM behind Serve) and the same surrogate costs: "
                     f"time break-even at k_p = {k_p} from k_D > {b['k_d_seconds']:.2f}; symmetric k > "
                     f"{b['k_symmetric_seconds']:.2f}.")
    return {"units": u, "k_p": k_p, "k_d": k_d, "at": at, "break_even": be, "what_if": what_if, "lines": lines}
