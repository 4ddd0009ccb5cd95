"""One trial = one stage of one (setup, task(s), seed), its result written atomically.

A trial whose result file already exists returns it (a retried or resumed trial never trains twice).
A trial that raises writes a `failed` row with its error, then re-raises; the runner retries it up to
`run.max_failures` times and the other trials go on. It runs in a warm worker (`rayjobs.pool`), in a
benchmark's own process, or once per rank-0 of a Ray Train group (`rayjobs.distributed`).
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

from analysis.store import ResultStore
from rayjobs import observe, stack
from rayjobs.plan import TrialSpec

MAX_LOSS_POINTS = 2000


class TrialStopped(Exception):
    """Raised inside a trial (from `TrainContext.report`) when its scheduler stopped it early: the trial
    stores a `stopped` run, a decided run that is neither ok nor failed, with its last validation metrics."""

    def __init__(self, last: dict[str, Any]):
        super().__init__(f"stopped by the scheduler at step {last.get('step')}")
        self.last = last


def inject_fault(spec: TrialSpec, rank: int | None = None) -> None:
    """Failure injection for tests: TRANSFERLAB_FAULT="<action>[@rank<N>]:<label substring>[;<rule>...]".

    <action> is `raise`, `kill` (SIGKILL), `kill-once` (SIGKILL on the first attempt only) or
    `sleep<S>` (wait S seconds, then run: a straggler that stays in flight long enough to be hit). Without
    `@rank<N>` it fires in the trial process (the coordinator of a distributed trial); with it, only
    in Ray Train worker N of a distributed trial, so a test can fail one rank while the others wait
    in a collective.
    """
    for rule in os.environ.get("TRANSFERLAB_FAULT", "").split(";"):
        if ":" not in rule:
            continue
        action, pattern = rule.split(":", 1)
        action, _, where = action.partition("@")
        if where != ("" if rank is None else f"rank{rank}") or not pattern or pattern not in spec.label:
            continue
        if action.startswith("sleep"):
            time.sleep(float(action[len("sleep"):] or 1))
            continue
        if action == "raise":
            raise RuntimeError(f"injected failure for {spec.label}" + ("" if rank is None else f" on rank {rank}"))
        if action == "kill-once":  # first attempt only (a marker in the results folder): tests retries
            marker = os.path.join(spec.results_dir, f".fault-{spec.run_key}")
            if os.path.exists(marker):
                return
            open(marker, "w").close()
        if action in ("kill", "kill-once"):
            os.kill(os.getpid(), signal.SIGKILL)


#: executor name -> "module:function(trial, ctx) -> result row"; a job kind that does not train adds one
EXECUTORS = {"train": "rayjobs.train_loop:train_and_evaluate", "score": "rayjobs.score:score_trial",
             "mtl": "rayjobs.mtl:train_and_evaluate_mtl", "fewshot": "rayjobs.fewshot:score_fewshot",
             "probe": "rayjobs.embed:probe_trial", "embed": "rayjobs.embed:embed_trial",
             "self_select": "rayjobs.self_select:self_select_trial",
             "simulate": "rayjobs.simulate:simulate_trial"}  # simulate: a benchmark tool (issue 20)


def executor(name: str) -> Any:
    import importlib

    if name not in EXECUTORS:
        raise ValueError(f"unknown trial executor {name!r} (known: {sorted(EXECUTORS)})")
    module, fn = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def execute(spec: TrialSpec, progress: Any = None, report: Any = None) -> dict[str, Any]:
    """Run one trial to a stored result row (in a warm worker, or directly in benchmarks).

    With a remote results location (`results_uri`) the trial works in this node's mirror of it: it pulls
    its own row (done already?) and the runs it starts from, and pushes what it wrote, row last."""
    if spec.results_uri:
        from analysis.remote import node_mirror

        spec = spec.model_copy(update={"results_dir": str(node_mirror(spec.results_uri))})
    store = ResultStore(spec.results_dir, remote=spec.results_uri)
    if store.remote is not None:
        store.pull_run(spec.run_key, checkpoint=False)
        for key in [*spec.required, *([spec.params["probe_key"]] if spec.params.get("probe_key") else [])]:
            store.pull_run(key)
        for key in (k for g in spec.candidate_groups for k in g):  # rows to choose from; the chosen checkpoint below
            store.pull_run(key, checkpoint=False)
    done = store.read_result(spec.run_key)
    if done is not None and done["status"] in DECIDED:
        return done
    t0 = time.time()
    observe.trial_started(spec)
    try:
        if spec.source_candidates or spec.baseline_candidates:  # a transfer over searched stages
            from rayjobs.search_space import resolve

            spec = resolve(spec, store)
            if store.remote is not None and spec.source_run_key:
                store.pull_run(spec.source_run_key)
        inject_fault(spec)
        if spec.setup.resources.workers > 1 or spec.setup.deepspeed is not None:
            from rayjobs.distributed import train_distributed

            row = train_distributed(spec)
        else:
            from rayjobs.train_loop import TrainContext

            row = executor(spec.executor)(spec, TrainContext(progress=progress, report=report))
    except TrialStopped as stop:
        row = stopped_row(spec, stop.last, time.time() - t0)
        store.write_result(row)
        store.push_run(spec.run_key)
        return row
    except Exception as e:
        observe.trial_failed(spec)
        store.write_result(failed_row(spec, e, time.time() - t0))
        store.push_run(spec.run_key)
        raise
    predictions = row.pop("predictions", None)
    if predictions:  # before the run row: the run row marks the run done
        store.write_predictions(spec.run_key, predictions)
    curve = row.pop("loss_curve", None)
    if curve:
        stride = max(1, len(curve) // MAX_LOSS_POINTS)
        row["metrics"] = {**row["metrics"], "loss_curve": curve[::stride], "loss_curve_stride": stride}
    row["metrics"] = {**(row.get("metrics") or {}), **observe.placement(), **_search_metrics(spec)}
    # -- issue 21 item 11: the library versions and device that produced the row (rayjobs.stack)
    row["stack"] = stack.describe()
    store.write_result(row)
    store.push_run(spec.run_key)
    observe.trial_finished(spec, row)
    return row


#: statuses of a run that a re-run does not repeat: it finished, or its scheduler stopped it early
DECIDED = ("ok", "stopped")


def _row_identity(spec: TrialSpec) -> dict[str, Any]:
    return {
        "run_key": spec.run_key, "experiment": spec.experiment, "kind": spec.kind, "setup": spec.setup.key,
        "model": spec.setup.model.name, "adaptation": spec.setup.adaptation.method, "source": spec.source,
        "target": spec.target, "sources": spec.sources, "seed": spec.seed, "source_run_key": spec.source_run_key,
        "baseline_run_key": spec.baseline_run_key, "stack": stack.describe()}


def stopped_row(spec: TrialSpec, last: dict[str, Any], wall: float) -> dict[str, Any]:
    """A run its scheduler stopped early (ASHA, median stopping): no evaluation, no checkpoint; its last
    validation result and the step it reached are kept."""
    return {**_row_identity(spec), "status": "stopped", "wall_time_s": wall, "score": None,
            "hparams": {**spec.hparams.model_dump(), "steps": last.get("step")},
            "metrics": {"stopped_at_step": last.get("step"), "last_validation_score": last.get("validation_score"),
                        "validation_curve": last.get("validation_curve", []), **observe.placement(),
                        **_search_metrics(spec)}}


def _search_metrics(spec: TrialSpec) -> dict[str, Any]:
    """A searched configuration's place in its search (the `tuned_runs` view reads it)."""
    return {"search": spec.search.model_dump()} if spec.search is not None else {}


def failed_row(spec: TrialSpec, err: BaseException, wall: float) -> dict[str, Any]:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {**_row_identity(spec), "status": "failed", "wall_time_s": wall,
            "error": f"{type(err).__name__}: {err}\n{''.join(tb[-3:])}"[:4000]}
