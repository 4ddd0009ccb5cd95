"""The dependency-aware Tune `Searcher` every job kind's trials go through (one per `Tuner.fit`).

Its own module so that `ray.tune` is imported only when a run starts (`rayjobs.engine.tuning.make_searcher`),
not when a config is checked or `--help` printed.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from rayjobs.plan import TrialSpec


class DependencySearcher(Searcher):
    """Hands out a trial once every run it depends on is stored; blocks dependents of failed runs.

    One suggestion per call, never a batch (a batch would be a barrier); None while nothing is
    ready, FINISHED once nothing is left. State (stored, failed, handed out) is saved with the Tune
    experiment, so `Tuner.restore` resumes it. With a `gate` (a budget, `rayjobs.engine.budget`) only the
    trials it admits are released, and it ends the run when its policy is done."""

    def __init__(self, trials: list[TrialSpec], done: set[str], broker_name: str, gate: Any = None,
                 stopped: set[str] = frozenset(), keep_shapes: Callable[[list[TrialSpec]], None] | None = None):
        super().__init__()
        self.broker_name, self.gate, self.keep_shapes = broker_name, gate, keep_shapes
        # a trial's id is its run key; trials of one run that share a key (the same run in several
        # results folders: tests, benchmarks) get an index too. Dependencies resolve within a folder.
        counts = Counter(t.run_key for t in trials)
        self.order = [t.run_key if counts[t.run_key] == 1 else f"{t.run_key}@{i}" for i, t in enumerate(trials)]
        self.specs = dict(zip(self.order, trials, strict=True))
        self.place = {(t.results_dir, t.run_key): u for u, t in self.specs.items()}
        # stopped: by the scheduler, in this run or before it (`stopped`: decided candidates of a search)
        self.done, self.failed, self.stopped = set(done), set(), set(stopped)
        self.blocked: list[str] = []
        self.waiting = deque(self.order)
        self.ready: deque[str] = deque()
        self.live: dict[str, str] = {}  # Tune trial id -> run key
        self.released_at: dict[str, float] = {}  # wall clock: dependencies stored
        self.completed_at: dict[str, float] = {}  # wall clock: Tune reported the trial done
        self.shapes: Counter = Counter()

    # Tune's API
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._release()
        while self.gate is not None and not self.ready:
            admitted = self.gate.admit()
            if admitted is not True:
                if admitted == self.gate.FINISHED and not self.live and not self._admitted_waiting():
                    return Searcher.FINISHED
                break
            self._release()
        if self.ready:
            key = self.ready.popleft()
            self.live[trial_id] = key
            t = self.specs[key]
            return {"trial": t.model_dump(mode="json"), "run_key": t.run_key, "uid": key, "label": t.label,
                    "broker": self.broker_name}
        if not self.waiting and not self.live:
            return Searcher.FINISHED
        if self.gate is not None:  # the policy waits for results in flight
            return None
        if not self.live and self.waiting:  # nothing in flight can release these: a cycle
            self.blocked.extend(self.waiting)
            self.waiting.clear()
            return Searcher.FINISHED
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if key is None:
            return
        self.completed_at[key] = time.time()
        if self.gate is not None:
            self.gate.complete(self.specs[key].run_key, result,
                               ok=not error and bool(result and result.get("status") == "ok"))
        if error:
            self.failed.add(key)
        elif result and result.get("final") and result.get("status") == "ok":
            self.done.add(key)
        else:  # stopped by Tune's scheduler before its final result
            self.stopped.add(key)
        self._release()
        if self.keep_shapes is not None:  # the broker keeps warm only workers of shapes still to run
            self.keep_shapes([self.specs[k] for k in [*self.waiting, *self.ready, *self.live.values()]])

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({
            "done": sorted(self.done), "failed": sorted(self.failed), "stopped": sorted(self.stopped),
            "blocked": self.blocked, "live": self.live}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.done |= set(state["done"])
        self.failed, self.stopped = set(state["failed"]), set(state["stopped"])
        self.blocked = list(state["blocked"])
        self.live = dict(state["live"])  # Tune resumes these trials under the same ids
        gone = self.done | self.failed | self.stopped | set(self.blocked) | set(self.live.values())
        self.waiting = deque(k for k in self.order if k not in gone)
        self.ready.clear()

    def _lost(self, d: str) -> bool:
        """The run `d` will not be stored ok in this run: it failed, is blocked, or is not planned."""
        return d in self.failed or d in self.blocked or (
            d not in self.done and d not in self.stopped and d not in self.specs)

    def _admitted_waiting(self) -> bool:
        return any(self.specs[k].run_key in self.gate.admitted for k in self.waiting)

    def _release(self) -> None:
        now = time.time()
        still: deque[str] = deque()
        for key in self.waiting:
            t = self.specs[key]
            if self.gate is not None and t.run_key not in self.gate.admitted:
                still.append(key)
                continue
            deps = [self.place.get((t.results_dir, d), d) for d in
                    [*t.required, *(self.gate.extra_deps(t.run_key) if self.gate is not None else [])]]
            # a search's candidates (rayjobs.search_space): all decided, at least one ok
            groups = [[self.place.get((t.results_dir, d), d) for d in g] for g in t.candidate_groups]
            if all(d in self.done for d in deps) and all(
                    all(d in self.done or d in self.stopped for d in g) and any(d in self.done for d in g)
                    for g in groups):
                self.ready.append(key)
                self.released_at[key] = now
            elif any(d in self.stopped or self._lost(d) for d in deps) or any(
                    any(self._lost(d) for d in g) or all(d in self.stopped for d in g) for g in groups):
                self.blocked.append(key)
            else:
                still.append(key)
        self.waiting = still
