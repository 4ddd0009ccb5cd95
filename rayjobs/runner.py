"""Run a job's trials on Ray: each trial starts on a warm worker as soon as the runs it depends on are stored.

Shared by every job kind: a job expands its config into `TrialSpec`s, the driver drops the run keys
already stored and hands the rest here. Resuming is by run key (results folder), not by scheduler
state, so a killed driver, a lost node or an edited config all resume the same way.

Scheduling is one pass over the whole plan, not stages: a trial is released the moment every key in
its `depends_on` is stored (a transfer starts as soon as its own source checkpoint is written, while
other sources still train), and runs on a warm `pool.TrialWorker` of its resource shape, so it pays
neither a process start nor the torch/transformers imports. This replaced one Ray Tune run per
dependency wave with a fresh actor per trial: the plan is fixed (no search), resume is by run key, and
Tune's per-run start-up, per-trial actor and the wave barrier cost seconds per trial at the sizes of
the quickstart (benchmarks/bench_pairwise.py). Failure semantics: a trial that raises is stored as a
failed run (by the trial; by the driver when its worker process died) and retried up to
`run.max_failures` times; trials depending on a failed run are reported as blocked and left for a
re-run; the other trials go on.

Hooks: `RunCallback` (trial start / retry / end, run end) is called in the driver; the progress lines,
the periodic ingest and the Ray metrics (`TrialMetrics`, see `rayjobs.observe`) are callbacks.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayjobs import observe
from rayjobs.config import RunSpec
from rayjobs.plan import TrialSpec
from rayjobs.pool import Shape, Worker, WorkerPool, is_distributed, worker_shape

#: keep per-trial model-loading chatter (progress bars, reports, deprecation notices) out of job logs
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "PYTHONWARNINGS": "ignore::FutureWarning"}


def init_ray(run: RunSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers must import rayjobs/analysis: on a local Ray the repo root is on their path.
    root = str(Path(__file__).resolve().parent.parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p),
                        "TOKENIZERS_PARALLELISM": "false", **(QUIET if run.verbose < 2 else {})}}
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never join a cluster that happens to run on this machine
        ray.init(address="local", runtime_env=env, include_dashboard=False, log_to_driver=True)


def _remote_cluster(run: RunSpec) -> bool:
    return bool(run.ray_address or os.environ.get("RAY_ADDRESS"))


def check_fits_local_cluster(trials: list[TrialSpec], run: RunSpec) -> None:
    """Fail before training when a trial (or its worker group) is larger than the local Ray cluster.

    Preflight runs before Ray starts, when the cluster is not known; Ray would otherwise wait forever
    for the resources. Only a cluster this process started (no address) is known not to grow; on a
    remote cluster the autoscaler may add nodes, so there the trial waits.
    """
    if _remote_cluster(run):
        return
    import ray

    from rayjobs.models.loading import ModelError
    from rayjobs.preflight import check_distributed

    cluster = dict(ray.cluster_resources())
    for t in {t.setup.key: t for t in trials}.values():
        check_distributed(t.setup, cluster)
        shape = worker_shape(t)
        if not shape.coordinator and shape.fits(cluster) == 0:
            raise ModelError(f"setup {t.setup.key!r}: a trial needs {shape}"
                             f"{f', {shape.memory / 2**30:g} GiB' if shape.memory else ''} but the Ray cluster has "
                             f"{cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU in all")


def distributed_concurrency(trials: list[TrialSpec]) -> int | None:
    """Default cap on concurrent trials that launch worker groups: their coordinators reserve no CPU, so
    without a cap every trial's Train controller would start at once and the groups would queue for
    resources. The cap is how many worker groups (of the smallest kind) fit the cluster now."""
    groups = [t.setup.resources for t in trials if is_distributed(t)]
    if not groups:
        return None
    import ray

    have = ray.cluster_resources()
    fits = []
    for r in groups:
        n = have.get("CPU", 0) // (r.cpu * r.workers)
        if r.gpu:
            n = min(n, have.get("GPU", 0) // (r.gpu * r.workers))
        fits.append(int(n))
    return max(1, max(fits))


#: workers of a shape a run may ask a remote cluster for even when fewer fit it now: queued ones are
#: the demand its autoscaler scales on
REMOTE_MIN_WORKERS = 16


def shape_caps(trials: list[TrialSpec], run: RunSpec) -> dict[Shape, int]:
    """How many workers of each shape may run at once: what fits the cluster now; on a remote cluster at
    least `REMOTE_MIN_WORKERS`, so that queued workers are demand its autoscaler scales on; never more
    than the shape's trials or `run.max_concurrent_trials`."""
    import ray

    cluster = dict(ray.cluster_resources())
    by_shape = Counter(worker_shape(t) for t in trials)
    caps = {}
    for shape, n in by_shape.items():
        cap = (distributed_concurrency(trials) or 1) if shape.coordinator else max(1, shape.fits(cluster))
        if _remote_cluster(run):
            cap = max(cap, REMOTE_MIN_WORKERS)
        caps[shape] = min(cap, n, run.max_concurrent_trials or cap)
    return caps


# -- what a run reports ----------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One attempt of one trial, as the driver saw it; times in seconds since the run began."""

    run_key: str
    label: str
    experiment: str
    kind: str
    attempt: int
    released_s: float  # its dependencies were stored
    started_s: float = 0.0  # handed to a worker
    finished_s: float | None = None
    status: str = "running"  # running | ok | failed
    worker: str = ""  # pid@host
    warm: bool = False  # the worker had run a trial before
    busy_s: float = 0.0  # the worker's time on it (trial.execute), by the worker's clock
    error: str | None = None


@dataclass
class StageResult:
    name: str
    total: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # waiting for a failed run
    seconds: float = 0.0
    records: list[TrialRecord] = field(default_factory=list)


class RunCallback:
    """Hooks into `run_trials`, called in the driver process (progress lines, ingest, metrics)."""

    def on_trial_start(self, record: TrialRecord) -> None:
        """The trial was handed to a worker."""

    def on_trial_end(self, record: TrialRecord) -> None:
        """The trial is done: stored ok, or failed for good."""

    def on_trial_retry(self, record: TrialRecord) -> None:
        """The attempt failed and the trial goes back in the queue (`run.max_failures`)."""

    def on_run_end(self, result: StageResult) -> None:
        """Every trial is done, failed or blocked."""


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLines(RunCallback):
    """One line per finished trial: done / total / failed / ETA; one line when the run ends."""

    def __init__(self, result: StageResult, verbose: int = 1):
        self.result, self.verbose = result, verbose
        self.t0 = time.monotonic()

    def on_trial_start(self, record: TrialRecord) -> None:
        if self.verbose >= 2:
            print(f"[{self.result.name}] start: {record.label} on {record.worker or 'a new worker'}"
                  f"{' (warm)' if record.warm else ''}", flush=True)

    def on_trial_end(self, record: TrialRecord) -> None:
        r = self.result
        n = r.ok + len(r.failed)
        rate = (time.monotonic() - self.t0) / max(1, n)
        left = r.total - n - len(r.blocked)
        status = {"ok": "ok", "failed": "FAILED"}.get(record.status, record.status)
        print(f"[{r.name}] {n}/{r.total} done, {len(r.failed)} failed, ETA {_fmt_s(rate * left)} | "
              f"{status}: {record.label}", flush=True)

    def on_trial_retry(self, record: TrialRecord) -> None:
        print(f"[{self.result.name}] retrying (attempt {record.attempt} failed) {record.label}: {record.error}",
              flush=True)

    def on_run_end(self, result: StageResult) -> None:
        print(f"[{result.name}] finished: {result.ok}/{result.total} ok, {len(result.failed)} failed, "
              f"{len(result.blocked)} blocked, {_fmt_s(result.seconds)}", flush=True)


class TrialMetrics(RunCallback):
    """Ray metrics of the driver's view (`rayjobs.observe`): trials running / done / failed per stage,
    and retries."""

    def on_trial_start(self, record: TrialRecord) -> None:
        observe.trial_state(record.experiment, record.kind, None, "running")

    def on_trial_end(self, record: TrialRecord) -> None:
        observe.trial_state(record.experiment, record.kind, "running", "done" if record.status == "ok" else "failed")

    def on_trial_retry(self, record: TrialRecord) -> None:
        observe.trial_state(record.experiment, record.kind, "running", None)  # running again on its next start
        observe.trial_retried(record.experiment, record.kind)


class PeriodicIngest(RunCallback):
    """Keep the DuckDB file current during a long run (result files are the source of truth)."""

    def __init__(self, store: Any, every_s: float = 60.0):
        self.store, self.every_s, self.last = store, every_s, time.monotonic()

    def on_trial_end(self, record: TrialRecord) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            try:
                self.store.ingest()
                observe.rows_ingested(self.store.last_ingested)
            except Exception as e:  # noqa: BLE001 - e.g. a reader holds the file; the final ingest retries
                print(f"transferlab: ingest during the run failed ({e}); results stay in {self.store.root}",
                      file=sys.stderr, flush=True)


# -- the scheduler ---------------------------------------------------------------------------------------
def run_trials(name: str, todo: list[TrialSpec], run: RunSpec, store: Any, *, pool: WorkerPool | None = None,
               callbacks: Sequence[RunCallback] = ()) -> StageResult:
    """Run `todo`, each trial as soon as every key in its `depends_on` is stored; ingest at the end.

    Returns the run's counts and per-trial records; trials waiting on a failed run are reported as
    blocked and left for a re-run. `pool` keeps workers warm across calls (its owner closes it);
    without one, the workers end with the run.
    """
    result = schedule(name, todo, run, store.finished_keys(), pool=pool,
                      callbacks=[PeriodicIngest(store), *callbacks])
    store.ingest()
    observe.rows_ingested(store.last_ingested)
    if result.blocked:
        print(f"transferlab: {len(result.blocked)} runs wait for failed runs they depend on; re-run to retry",
              flush=True)
    return result


def run_stage(name: str, trials: list[TrialSpec], run: RunSpec, *, pool: WorkerPool | None = None) -> StageResult:
    """Run `trials` whose dependencies outside the list are stored already (tests, benchmarks)."""
    keys = {t.run_key for t in trials}
    outside = {d for t in trials for d in t.depends_on if d not in keys}
    return schedule(name, trials, run, outside, pool=pool)


def schedule(name: str, trials: list[TrialSpec], run: RunSpec, done: set[str], *,
             pool: WorkerPool | None = None, callbacks: Sequence[RunCallback] = ()) -> StageResult:
    """The scheduling loop: release, dispatch to warm workers, wait for one event, repeat.

    `done` holds the run keys stored before the run; a dependency that is neither there nor among
    `trials` never will be, so its dependents are blocked.
    """
    result = StageResult(name, len(trials))
    if not trials:
        return result
    init_ray(run)
    check_fits_local_cluster(trials, run)
    own_pool = pool is None
    pool = pool or WorkerPool()
    hooks = [ProgressLines(result, run.verbose), TrialMetrics(), *callbacks]
    state = _Scheduler(trials, run, set(done), pool, result, hooks, own_pool)
    try:
        state.loop()
    finally:
        if own_pool:
            pool.close()
    result.seconds = time.monotonic() - state.t0
    for h in hooks:
        h.on_run_end(result)
    return result


CAPS_EVERY_S = 10.0
#: failed worker starts in a row (with none of the shape alive) after which a run gives up
MAX_START_FAILURES = 3


@dataclass
class _Flight:
    trial: TrialSpec
    worker: Worker
    record: TrialRecord


class _Scheduler:
    def __init__(self, trials: list[TrialSpec], run: RunSpec, done: set[str], pool: WorkerPool,
                 result: StageResult, hooks: list[RunCallback], own_pool: bool):
        self.run, self.done, self.pool, self.result, self.hooks = run, done, pool, result, hooks
        self.keys = {t.run_key for t in trials}
        self.waiting = list(trials)
        self.ready: list[tuple[TrialSpec, float]] = []  # (trial, released at)
        self.inflight: dict[Any, _Flight] = {}
        self.failed: set[str] = set()  # given up on, or blocked
        self.attempts: Counter[str] = Counter()
        self.start_failures: Counter[Shape] = Counter()
        self.caps = shape_caps(trials, run)
        self.caps_at = self.t0 = time.monotonic()
        self.own_pool = own_pool

    def now(self) -> float:
        return time.monotonic() - self.t0

    def loop(self) -> None:
        import ray

        while self.waiting or self.ready or self.inflight:
            self.release()
            self.update_caps()
            self.dispatch()
            shapes = {worker_shape(t) for t, _ in self.ready}
            distributed = any(s.coordinator for s in shapes) or any(
                f.worker.shape.coordinator for f in self.inflight.values())
            self.pool.make_room(shapes, distributed)
            if self.own_pool:  # workers no remaining trial can use hold resources (and cluster nodes)
                self.pool.end_idle(keep={worker_shape(t) for t in self.waiting} | shapes)
            starting = self.pool.starting()
            refs = list(self.inflight) + list(starting)
            if not refs:
                if self.ready:  # pragma: no cover - every ready shape has a cap >= 1
                    raise RuntimeError(f"no worker can start for {[t.label for t, _ in self.ready]}")
                for t in self.waiting:  # a dependency cycle: nothing can ever release these
                    self.result.blocked.append(t.run_key)
                break
            finished, _ = ray.wait(refs, num_returns=1, timeout=5.0)
            for ref in finished:
                if ref in starting:
                    self.worker_started(starting[ref])
                else:
                    self.complete(ref)

    def worker_started(self, worker: Worker) -> None:
        """A worker came up, or failed to (its node was lost, or it cannot start at all). A few failed
        starts in a row with none of its shape alive mean the latter: the run stops with the error."""
        try:
            self.pool.mark_ready(worker)
            self.start_failures[worker.shape] = 0
        except Exception as e:  # noqa: BLE001 - mark_ready dropped it; the next dispatch starts another
            self.start_failures[worker.shape] += 1
            alive = any(w.shape == worker.shape and w.ready_ref is None for w in self.pool.workers)
            if self.start_failures[worker.shape] >= MAX_START_FAILURES and not alive:
                raise RuntimeError(f"trial workers ({worker.shape}) fail to start: {e}") from e

    def update_caps(self) -> None:
        """On a remote cluster nodes come and go: re-read what fits every `CAPS_EVERY_S` seconds."""
        if _remote_cluster(self.run) and time.monotonic() - self.caps_at > CAPS_EVERY_S:
            left = [*self.waiting, *(t for t, _ in self.ready), *(f.trial for f in self.inflight.values())]
            self.caps, self.caps_at = shape_caps(left, self.run), time.monotonic()

    def release(self) -> None:
        """Move trials whose dependencies are stored to `ready`; block those depending on a failed run."""
        still = []
        for t in self.waiting:
            deps = t.depends_on
            if all(d in self.done for d in deps):
                self.ready.append((t, self.now()))
            elif any(d in self.failed or (d not in self.done and d not in self.keys) for d in deps):
                self.result.blocked.append(t.run_key)
                self.failed.add(t.run_key)  # its own dependents are blocked too
            else:
                still.append(t)
        self.waiting = still

    def dispatch(self) -> None:
        """Hand ready trials (in plan order) to idle workers of their shape; start workers up to the caps."""
        for t, released in list(self.ready):
            if self.run.max_concurrent_trials and len(self.inflight) >= self.run.max_concurrent_trials:
                return
            shape = worker_shape(t)
            worker = self.pool.idle(shape)
            if worker is None:
                if self.pool.count(shape) < self.caps.get(shape, 1):
                    self.pool.start(shape)  # picked up once it is ready
                continue
            self.ready.remove((t, released))
            self.attempts[t.run_key] += 1
            record = TrialRecord(t.run_key, t.label, t.experiment, t.kind, self.attempts[t.run_key], released,
                                 self.now(), worker=worker.name, warm=worker.trials > 0)
            self.inflight[self.pool.submit(worker, t)] = _Flight(t, worker, record)
            self.result.records.append(record)
            for h in self.hooks:
                h.on_trial_start(record)

    def complete(self, ref: Any) -> None:
        import ray

        flight = self.inflight.pop(ref)
        t, rec = flight.trial, flight.record
        try:
            out = ray.get(ref)
            self.pool.release(flight.worker)
        except Exception as e:  # noqa: BLE001 - the worker died (killed, out of memory, node lost) or broke
            self.pool.discard(flight.worker)
            self.pool.prune_dead()  # a lost node takes its idle workers too: do not hand them trials
            out = _lost_worker_outcome(t, e, self.now() - rec.started_s)
        rec.finished_s = self.now()
        rec.status, rec.error = out["status"], out.get("error")
        rec.warm = bool(out.get("warm", rec.warm))
        rec.busy_s = float(out.get("finished", 0.0) - out.get("started", 0.0)) if "started" in out else 0.0
        if rec.status == "ok":
            self.done.add(t.run_key)
            self.result.ok += 1
        elif self.attempts[t.run_key] <= self.run.max_failures:
            self.ready.insert(0, (t, self.now()))
            for h in self.hooks:
                h.on_trial_retry(rec)
            return
        else:
            self.failed.add(t.run_key)
            self.result.failed.append(t.run_key)
        for h in self.hooks:
            h.on_trial_end(rec)


def _lost_worker_outcome(trial: TrialSpec, err: BaseException, wall: float) -> dict[str, Any]:
    """The worker died during the trial: nothing in it could store the failure, so the driver does
    (unless the run was stored ok just before the process ended)."""
    from ray.exceptions import RayActorError

    from analysis.store import ResultStore
    from rayjobs.trial import failed_row

    store = ResultStore(trial.results_dir)
    stored = store.read_result(trial.run_key)
    if stored is not None and stored["status"] == "ok":
        return {"status": "ok"}
    if isinstance(err, RayActorError):
        lost: Exception = observe.TrialLost("trial process died without writing a result (killed, out of memory "
                                            f"or node lost): {type(err).__name__}: {err}"[:2000])
    else:
        lost = RuntimeError(f"trial worker failed: {type(err).__name__}: {err}"[:2000])
    store.write_result(failed_row(trial, lost, wall))
    return {"status": "failed", "error": str(lost)}


def finish(store: Any, trials: list[TrialSpec], view: str) -> int:
    """A job's last lines: where the results are, how to query them, and exit 1 if runs are missing."""
    print(f"transferlab: results database {store.db_path}")
    print(f"transferlab: query it with: transferlab sql \"SELECT * FROM {view}\" --db {store.db_path}")
    stored = store.finished_keys()
    missing = [t for t in trials if t.run_key not in stored]
    if missing:
        print(f"transferlab: {len(missing)} runs did not finish (see runs.status/error); re-run to retry them",
              file=sys.stderr)
        return 1
    return 0
