"""Tune's trial events turned into the run's own records (a Tune `Callback` the runner passes to `Tuner`).

Its own module so that `ray.tune` is imported only when a run starts.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray import tune

from analysis.store.results import ResultStore
from rayjobs.engine import observe, tuning
from rayjobs.engine.events import RunCallback, StageResult, TrialRecord
from rayjobs.plan import TrialSpec


class TuneEvents(tune.Callback):
    """Tune's trial events as `TrialRecord`s for the run's `RunCallback`s."""

    def __init__(self, result: StageResult, hooks: list[RunCallback], searcher: Any,
                 specs: dict[str, TrialSpec], t0: float):
        self.result, self.hooks, self.searcher, self.specs, self.t0 = result, hooks, searcher, specs, t0
        self.attempts: Counter[str] = Counter()
        self.records: dict[str, TrialRecord] = {}

    def now(self) -> float:  # wall clock: the trial's hand-over time comes from another process
        return time.time() - self.t0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self._start(trial)
        for h in self.hooks:
            h.on_trial_start(rec)

    def _start(self, trial: Any) -> TrialRecord:
        uid = trial.config["uid"]
        spec = self.specs[uid]
        self.attempts[uid] += 1
        released = self.searcher.released_at.get(uid, self.t0) - self.t0
        rec = TrialRecord(spec.run_key, spec.label, spec.experiment, spec.kind, self.attempts[uid],
                          released, self.now())
        self.records[trial.trial_id] = rec
        self.result.records.append(rec)
        return rec

    def _finish(self, trial: Any, status: str) -> TrialRecord:
        rec = self.records.get(trial.trial_id)
        if rec is None:  # its Tune trial process died before the trial started (e.g. on a lost node)
            rec = self._start(trial)
        done_at = self.searcher.completed_at.get(trial.config["uid"])  # before it released any dependent
        rec.finished_s = done_at - self.t0 if done_at and status != "failed" else self.now()
        rec.status = status
        last = trial.last_result or {}
        if last.get("final"):
            rec.worker, rec.warm = last.get("worker", ""), bool(last.get("warm"))
            rec.busy_s = float(last.get("busy_s") or 0.0)
            rec.tune_pid = int(last.get("trainable_pid") or 0)
            rec.started_s = max(rec.started_s, last["handed_at"] - self.t0)  # handed to its worker
        return rec

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        ok = last.get("final") and last.get("status") == "ok"
        rec = self._finish(trial, "ok" if ok else "stopped")
        if ok:
            self.result.ok += 1
        else:
            self.result.stopped.append(rec.run_key)
        for h in self.hooks:
            h.on_trial_end(rec)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self._finish(trial, "failed")
        rec.error = _stored_error(self.specs[trial.config["uid"]])
        for h in self.hooks:
            h.on_trial_retry(rec)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self._finish(trial, "failed")
        rec.error = _stored_error(self.specs[trial.config["uid"]])
        self.result.failed.append(rec.run_key)
        for h in self.hooks:
            h.on_trial_end(rec)
def _stored_error(spec: TrialSpec) -> str:
    """The failed row's error; a Tune trial process that died with its trial (a lost node) wrote none,
    so the driver stores it."""
    row = ResultStore(spec.results_dir).read_result(spec.run_key)
    if row is None:
        return tuning.lost_worker_outcome(spec, observe.TrialLost("the Tune trial process died"), 0.0)["error"]
    return row.get("error") or ""


