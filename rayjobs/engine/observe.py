"""Ray metrics of a transferlab job: what the Ray dashboard's Metrics view and the Prometheus endpoint show.

Every number is a `ray.util.metrics` object, exported by the Ray node the reporting process runs on
(Prometheus names get Ray's `ray_` prefix, e.g. `ray_transferlab_trials`). Two sides report:

- the driver (the runner's `TrialMetrics` callback): trials running / done / failed per stage as the
  runner sees them (a killed trial process still counts), retries, and rows ingested into the DuckDB file;
- each trial process (`trial_started/finished/failed`): trial events, training throughput in
  examples per second (a histogram: one observation per trial), examples trained, trial duration.

Counters and histograms are cumulative and outlive the process that reported them; a gauge is
exported only for a short while after it is set, so the driver re-sets its gauges every few seconds.

Serve deployments report requests and batch sizes with `serve_request` / `serve_batch`.

Runner and trial code call these as one-line hooks. Outside Ray (benchmarks, tests calling
`rayjobs.engine.trial.execute` directly) every hook is a no-op, and a metrics failure never fails a trial:
metrics are observations, not results (a warning is logged once).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

#: trial states the driver reports in `transferlab_trials{state=...}`
STATES = ("running", "done", "failed", "stopped")
#: bucket bounds of the trial-duration histogram (seconds) and of the Serve batch-size histogram
SECONDS_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
EPS_BUCKETS = [1, 5, 10, 50, 100, 500, 1000, 5000, 10000]
#: Ray exports a gauge only for a short while after it was set, so the driver sets its gauges again
#: this often for as long as it lives
REPUBLISH_S = 2.0

_metrics: dict[str, Any] = {}
_warned = False


def _ray_on() -> bool:
    try:
        import ray  # lazy: ray only on the cluster path

        return ray.is_initialized()
    except Exception:  # ray not importable: nothing to report to
        return False


def _metric(name: str) -> Any:
    """The metric object `name` of this process, created on first use (Ray must be initialised)."""
    if name not in _metrics:
        from ray.util.metrics import Counter, Gauge, Histogram  # lazy: ray only on the cluster path

        specs: dict[str, Any] = {
            "trials": lambda: Gauge("transferlab_trials", "trials of a stage by state, as the driver's runner sees them",
                                    tag_keys=("experiment", "stage", "state")),
            "retries": lambda: Counter("transferlab_trial_retries_total", "trials restarted after a crash (max_failures)",
                                       tag_keys=("experiment", "stage")),
            "rows": lambda: Counter("transferlab_rows_ingested_total", "rows added to the DuckDB tables by ingest",
                                    tag_keys=("table",)),
            "events": lambda: Counter("transferlab_trial_events_total", "trial starts, finishes and failures, "
                                      "counted in the trial processes", tag_keys=("experiment", "stage", "event")),
            "eps": lambda: Histogram("transferlab_examples_per_second", "training throughput of each finished trial "
                                     "(examples per second)", boundaries=EPS_BUCKETS, tag_keys=("experiment", "stage")),
            "examples": lambda: Counter("transferlab_train_examples_total", "training examples processed",
                                        tag_keys=("experiment", "stage")),
            "seconds": lambda: Histogram("transferlab_trial_seconds", "wall time of finished trials",
                                         boundaries=SECONDS_BUCKETS, tag_keys=("experiment", "stage")),
            "requests": lambda: Counter("transferlab_serve_requests_total", "requests handled by a Serve deployment",
                                        tag_keys=("deployment",)),
            "batch": lambda: Histogram("transferlab_serve_batch_size", "size of the batches a Serve deployment runs",
                                       boundaries=BATCH_BUCKETS, tag_keys=("deployment",)),
        }
        _metrics[name] = specs[name]()
    return _metrics[name]


def _emit(fn: Any, *args: Any) -> None:
    """Run one metric update when Ray is up; log (once) instead of raising."""
    global _warned
    if not _ray_on():
        return
    try:
        fn(*args)
    except Exception as e:  # metrics must never fail a trial or the driver
        if not _warned:
            log.warning("transferlab metrics disabled in process %s: %s", os.getpid(), e)
            _warned = True


# -- trial side ---------------------------------------------------------------------------------------


def _tags(spec: Any) -> dict[str, str]:
    return {"experiment": str(spec.experiment), "stage": str(spec.kind)}


def trial_started(spec: Any) -> None:
    """A trial process starts training or scoring `spec` (a stored run skipped by the trial is not counted)."""
    _emit(lambda: _metric("events").inc(1, tags={**_tags(spec), "event": "started"}))


def trial_failed(spec: Any) -> None:
    _emit(lambda: _metric("events").inc(1, tags={**_tags(spec), "event": "failed"}))


def examples_trained(row: dict[str, Any]) -> int | None:
    """Training examples a finished run processed: optimiser steps x global batch (micro-batch x
    workers x gradient accumulation), from its `hparams`; None for runs that did not train (scoring)."""
    hp = row.get("hparams") or {}
    if isinstance(hp, str):
        hp = json.loads(hp)
    try:
        return int(hp["steps"]) * int(hp["micro_batch"]) * int(hp.get("world_size", 1)) * int(hp.get("grad_accum_steps", 1))
    except (KeyError, TypeError, ValueError):
        return None


def examples_per_second(row: dict[str, Any]) -> float | None:
    """Training throughput of a finished run: `examples_trained(row) / train_time_s`."""
    n, t = examples_trained(row), row.get("train_time_s")
    return n / t if n is not None and t else None


def trial_finished(spec: Any, row: dict[str, Any]) -> None:
    """A trial stored its result row: count it, its examples and throughput, and its wall time."""
    def update() -> None:
        tags = _tags(spec)
        _metric("events").inc(1, tags={**tags, "event": "finished"})
        n, eps = examples_trained(row), examples_per_second(row)
        if n:
            _metric("examples").inc(n, tags=tags)
        if eps is not None:
            _metric("eps").observe(eps, tags=tags)
        if row.get("wall_time_s") is not None:
            _metric("seconds").observe(float(row["wall_time_s"]), tags=tags)

    _emit(update)


def placement() -> dict[str, str]:
    """Where this trial runs, for the run row's `metrics` (`node_id`: the Ray node; all nodes of a
    one-machine test cluster share `runs.host`). Empty outside Ray."""
    if not _ray_on():
        return {}
    import ray  # lazy: ray only on the cluster path

    return {"node_id": ray.get_runtime_context().get_node_id()}


# -- driver side ----------------------------------------------------------------------------------------


def rows_ingested(counts: dict[str, int] | None) -> None:
    """Rows a `ResultStore.ingest()` added, per table (`store.last_ingested`)."""
    for table, n in (counts or {}).items():
        if n:
            _emit(lambda t=table, k=n: _metric("rows").inc(k, tags={"table": t}))


class StageCounts:
    """Per (experiment, stage): trials running / done / failed, as the driver's runner sees them."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATES, 0))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def move(self, key: tuple[str, str], frm: str | None, to: str | None) -> None:
        with self._lock:
            c = self.counts[key]
            if frm:
                c[frm] = max(0, c[frm] - 1)
            if to:
                c[to] += 1
        _emit(self._publish)
        if self._thread is None:
            self._thread = threading.Thread(target=self._republish, name="transferlab-metrics", daemon=True)
            self._thread.start()

    def _publish(self) -> None:
        with self._lock:
            values = [(k, state, n) for k, c in self.counts.items() for state, n in c.items()]
        for (experiment, stage), state, n in values:
            _metric("trials").set(n, tags={"experiment": experiment, "stage": stage, "state": state})

    def _republish(self) -> None:
        while True:
            time.sleep(REPUBLISH_S)
            _emit(self._publish)


#: one count table per driver process: a job's runs add up under the same experiment
COUNTS = StageCounts()


def trial_state(experiment: str, stage: str, frm: str | None, to: str | None) -> None:
    """A trial of (experiment, stage) moved from state `frm` to `to` (None: not counted), in the driver."""
    COUNTS.move((str(experiment), str(stage)), frm, to)


def trial_retried(experiment: str, stage: str) -> None:
    """A trial restarted after its attempt failed (`run.max_failures`)."""
    _emit(lambda: _metric("retries").inc(1, tags={"experiment": str(experiment), "stage": str(stage)}))


class TrialLost(RuntimeError):
    """The error recorded for a trial whose process died (the runner stores its failed row)."""


# -- Ray Serve ------------------------------------------------------------------------------------------


def serve_request(deployment: str, n: int = 1) -> None:
    """`n` requests reached `deployment` (call once per request, or once per batch with its size)."""
    _emit(lambda: _metric("requests").inc(n, tags={"deployment": deployment}))


def serve_batch(deployment: str, size: int) -> None:
    """`deployment` ran one batch of `size` requests (`@serve.batch` handlers)."""
    _emit(lambda: _metric("batch").observe(size, tags={"deployment": deployment}))
