"""One trial = one stage of one (setup, task(s), seed), its result written atomically.

A trial whose result file already exists returns it (a retried or resumed trial never trains twice).
A trial that raises writes a `failed` row with its error, then re-raises; the runner retries it up to
`run.max_failures` times and the other trials go on. It runs in a warm worker (`rayjobs.engine.pool`), in a
benchmark's own process, or once per rank-0 of a Ray Train group (`rayjobs.engine.distributed`).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from analysis.registry import load_target
from analysis.store.remote import node_mirror
from analysis.store.results import ResultStore
from rayjobs.engine import observe, stack
from rayjobs.engine.distributed import train_distributed
from rayjobs.engine.faults import inject_fault
from rayjobs.plan import TrialSpec
from rayjobs.search_space import best_of

MAX_LOSS_POINTS = 2000


class TrialStopped(Exception):
    """Raised inside a trial (from `TrainContext.report`) when its scheduler stopped it early: the trial
    stores a `stopped` run, a decided run that is neither ok nor failed, with its last validation metrics."""

    def __init__(self, last: dict[str, Any]):
        super().__init__(f"stopped by the scheduler at step {last.get('step')}")
        self.last = last


def executor(target: str) -> Any:
    """The function a trial's `executor` names (`"module:function"`, set by its job kind's plan)."""
    return load_target(target, "trial executor")


def execute(spec: TrialSpec, progress: Any = None, report: Any = None) -> dict[str, Any]:
    """Run one trial to a stored result row (in a warm worker, or directly in benchmarks).

    With a remote results location (`results_uri`) the trial works in this node's mirror of it: it pulls
    its own row (done already?) and the runs it starts from, and pushes what it wrote, row last."""
    if spec.results_uri:
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
            spec = resolve_candidates(spec, store)
            if store.remote is not None and spec.source_run_key:
                store.pull_run(spec.source_run_key)
        inject_fault(spec)
        if spec.setup.resources.workers > 1 or spec.setup.deepspeed is not None:
            row = train_distributed(spec)
        else:
            from rayjobs.train.loop import TrainContext  # lazy: torch stays out of CLI start-up

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
    # -- issue 21 item 11: the library versions and device that produced the row (rayjobs.engine.stack)
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


def resolve_candidates(spec: TrialSpec, store: Any) -> TrialSpec:
    """A transfer over searched stages, made concrete when it starts: its source is the best source
    configuration, its hyperparameters and paired baseline the target's best (`best_of`)."""
    update: dict[str, Any] = {}
    if spec.source_candidates:
        rows = [store.read_result(k) for k in spec.source_candidates]
        update["source_run_key"] = spec.source_candidates[best_of(rows, f"{spec.label}: source {spec.source}")]
    if spec.baseline_candidates:
        keys = list(spec.baseline_candidates)
        rows = [store.read_result(k) for k in keys]
        chosen = keys[best_of(rows, f"{spec.label}: baseline {spec.target}")]
        update["baseline_run_key"] = chosen
        update["hparams"] = spec.baseline_candidates[chosen]
    return spec.model_copy(update=update) if update else spec
