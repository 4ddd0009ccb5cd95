"""Run a job's trials with Ray Tune: each trial starts on a warm worker as soon as the runs it depends on are stored.

Shared by every job kind: a job expands its config into `TrialSpec`s, the driver drops the run keys
already stored and hands the rest here. Resuming is by run key (results folder), not by scheduler
state, so a killed driver, a lost node or an edited config all resume the same way (`Tuner.restore`
of the Tune experiment works too, see `rayjobs.engine.tuning`).

One `Tuner.fit()` per call: every trial is a Tune trial, released by the dependency-aware searcher the
moment every key in its `depends_on` is stored (no barrier between stages), and run on a warm
`pool.TrialWorker` of its resource shape held by the run's broker, so it pays neither a process start
nor the torch/transformers imports (`rayjobs.engine.tuning`; the overhead is measured by
benchmarks/bench_pairwise.py). Failure semantics: a trial that raises is stored as a failed run (by the
trial; by its Tune trial when its worker process died; by the driver when the Tune trial process itself
died) and retried up to `run.max_failures` times (Tune's `FailureConfig`); trials depending on a failed
run are reported as blocked and left for a re-run; the other trials go on. A trial Tune's scheduler
stops early (`run.scheduler`) is stored as `stopped`: decided, not retried, not a failure.

Hooks: `RunCallback` (trial start / retry / end, run end) is called in the driver from Tune's callback
events; the progress lines, the periodic ingest and the Ray metrics (`TrialMetrics`, see
`rayjobs.engine.observe`) are callbacks.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayjobs.config import RunSpec
from rayjobs.engine import observe, tuning
from rayjobs.engine.events import RunCallback, StageResult, TrialRecord  # noqa: F401 - the run's reports
from rayjobs.engine.pool import Shape, is_distributed, worker_shape
from rayjobs.engine.preflight import check_distributed
from rayjobs.engine.tuning import WorkerPool
from rayjobs.models.loading import ModelError
from rayjobs.plan import TrialSpec

#: keep per-trial model-loading chatter (progress bars, reports, deprecation notices) out of job logs
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "PYTHONWARNINGS": "ignore::FutureWarning"}


def init_ray(run: RunSpec) -> None:
    import ray  # lazy: ray only on the cluster path

    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers must import rayjobs/analysis: on a local Ray the repo root is on their path.
    root = str(Path(__file__).resolve().parents[2])
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
    import ray  # lazy: ray only on the cluster path

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
    import ray  # lazy: ray only on the cluster path

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
    import ray  # lazy: ray only on the cluster path

    cluster = dict(ray.cluster_resources())
    by_shape = Counter(worker_shape(t) for t in trials)
    caps = {}
    for shape, n in by_shape.items():
        cap = (distributed_concurrency(trials) or 1) if shape.coordinator else max(1, shape.fits(cluster))
        if _remote_cluster(run):
            cap = max(cap, REMOTE_MIN_WORKERS)
        caps[shape] = min(cap, n, run.max_concurrent_trials or cap)
    return caps


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
        n = r.ok + len(r.failed) + len(r.stopped)
        rate = (time.monotonic() - self.t0) / max(1, n)
        left = r.total - n - len(r.blocked)
        status = {"ok": "ok", "failed": "FAILED", "stopped": "stopped early"}.get(record.status, record.status)
        print(f"[{r.name}] {n}/{r.total} done, {len(r.failed)} failed, ETA {_fmt_s(rate * left)} | "
              f"{status}: {record.label}", flush=True)

    def on_trial_retry(self, record: TrialRecord) -> None:
        print(f"[{self.result.name}] retrying (attempt {record.attempt} failed) {record.label}: {record.error}",
              flush=True)

    def on_run_end(self, result: StageResult) -> None:
        stopped = f"{len(result.stopped)} stopped early, " if result.stopped else ""
        print(f"[{result.name}] finished: {result.ok}/{result.total} ok, {len(result.failed)} failed, {stopped}"
              f"{len(result.blocked)} blocked, {_fmt_s(result.seconds)}", flush=True)


class TrialMetrics(RunCallback):
    """Ray metrics of the driver's view (`rayjobs.engine.observe`): trials running / done / failed per stage,
    and retries."""

    def on_trial_start(self, record: TrialRecord) -> None:
        observe.trial_state(record.experiment, record.kind, None, "running")

    def on_trial_end(self, record: TrialRecord) -> None:
        to = {"ok": "done", "stopped": "stopped"}.get(record.status, "failed")
        observe.trial_state(record.experiment, record.kind, "running", to)

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
               callbacks: Sequence[RunCallback] = (), gate: Any = None) -> StageResult:
    """Run `todo` with one Tuner, each trial as soon as every key in its `depends_on` is stored; ingest
    at the end. Tune's experiment folder is `<results>/tune/<name>-<time>` (in the bucket for a remote
    results location).

    Returns the run's counts and per-trial records; trials waiting on a failed run are reported as
    blocked and left for a re-run. `pool` keeps workers warm across calls (its owner closes it);
    without one, the workers end with the run.
    """
    remote = getattr(store, "remote", None)
    storage = f"{remote.base}/tune" if remote else str(Path(store.root).resolve() / "tune")
    result = schedule(name, todo, run, store.finished_keys(statuses=("ok",)), pool=pool,
                      callbacks=[PeriodicIngest(store), *callbacks], storage=storage,
                      storage_fs=remote.fs if remote else None, gate=gate,
                      stopped=store.finished_keys(statuses=("stopped",)))
    store.ingest()
    observe.rows_ingested(store.last_ingested)
    if result.blocked:
        print(f"transferlab: {len(result.blocked)} runs wait for failed runs they depend on; re-run to retry",
              flush=True)
    if result.experiment_path and remote:  # connection options stay out of logs (they may hold secrets)
        from analysis.store.remote import display  # lazy: pyarrow only when a store is opened

        where = f"{display(remote.uri).rstrip('/')}/tune/{Path(result.experiment_path).name}"
        print(f"transferlab: Tune experiment {where} (with the bucket's connection options): open it with "
              "ray.tune.ExperimentAnalysis(URI)", flush=True)
    elif result.experiment_path:
        print(f"transferlab: Tune experiment {result.experiment_path}: open it with "
              f"ray.tune.ExperimentAnalysis({result.experiment_path!r}); resume an interrupted one with "
              f"python -m rayjobs.engine.tuning restore {result.experiment_path}", flush=True)
    return result


def run_stage(name: str, trials: list[TrialSpec], run: RunSpec, *, pool: WorkerPool | None = None) -> StageResult:
    """Run `trials` whose dependencies outside the list are stored already (tests, benchmarks)."""
    keys = {t.run_key for t in trials}
    outside = {d for t in trials for d in t.depends_on if d not in keys}
    return schedule(name, trials, run, outside, pool=pool)


def schedule(name: str, trials: list[TrialSpec], run: RunSpec, done: set[str], *,
             pool: WorkerPool | None = None, callbacks: Sequence[RunCallback] = (),
             storage: str | None = None, storage_fs: Any = None, gate: Any = None,
             stopped: set[str] = frozenset()) -> StageResult:
    """One `Tuner.fit()` over `trials`: each a Tune trial, released by the dependency searcher.

    `done` holds the run keys stored before the run (`stopped`: those stopped early, decided candidates
    of a search); a dependency that is neither there nor among
    `trials` never will be, so its dependents are blocked. `storage` is where Tune's experiment folder
    goes (default: a temporary folder), on `storage_fs` (a pyarrow filesystem: a bucket) if given."""
    result = StageResult(name, len(trials))
    if not trials:
        return result
    init_ray(run)
    check_fits_local_cluster(trials, run)
    own_pool = pool is None
    pool = pool or WorkerPool()
    caps = shape_caps(trials, run)
    experiment = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    pool.ensure(caps, name=tuning.broker_name(experiment))
    hooks = [ProgressLines(result, run.verbose), TrialMetrics(), *callbacks]
    t0 = time.time()
    searcher = tuning.make_searcher(trials, set(done), pool.name, own_pool, gate=gate, stopped=set(stopped))
    from rayjobs.engine.tune_events import TuneEvents  # lazy: ray.tune only once a run starts

    adapter = TuneEvents(result, hooks, searcher, searcher.specs, t0)
    try:
        grid = _fit(name, experiment, run, searcher, adapter, caps, storage, storage_fs, len(trials))
        result.experiment_path = grid.experiment_path
        result.workers = pool.figures()
    finally:
        if own_pool:
            pool.close()
    result.blocked = [searcher.specs[u].run_key for u in searcher.blocked]
    if gate is not None:  # never proposed: left out by the budget, not missing
        result.skipped = [t.run_key for t in trials if t.run_key not in gate.admitted]
    result.seconds = time.time() - t0
    for h in hooks:
        h.on_run_end(result)
    return result


def _fit(name: str, experiment: str, run: RunSpec, searcher: Any, adapter: Any, caps: dict[Shape, int],
         storage: str | None, storage_fs: Any, n: int) -> Any:
    """Build and run the Tuner (Tune's own output off: the driver prints one line per trial)."""
    from ray import tune  # lazy: ray only on the cluster path

    slots = max(1, min(n, sum(caps.values())))
    tuning.tune_environment(slots)
    storage = storage or tempfile.mkdtemp(prefix="transferlab-tune-")
    # the trackers' local files (MLflow file store, W&B offline runs): next to the experiment, or in a
    # temporary folder when the experiment is in a bucket
    tracking = Path(tempfile.mkdtemp(prefix="transferlab-tracking-") if storage_fs is not None else storage)
    tuner = tune.Tuner(
        tuning.tune_trainable(),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=tuning.make_scheduler(run), num_samples=-1,
            max_concurrent_trials=slots, reuse_actors=True,
            trial_name_creator=lambda t: f"{t.config['label']}",
            trial_dirname_creator=lambda t: f"{t.config['uid']}"),
        run_config=tune.RunConfig(
            name=experiment, storage_path=storage, storage_filesystem=storage_fs, verbose=0,
            callbacks=[adapter, *tuning.make_callbacks(run, tracking, name)],
            failure_config=tune.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()


def finish(store: Any, trials: list[TrialSpec], view: str, gate: Any = None) -> int:
    """A job's last lines: where the results are, how to query them, and exit 1 if runs are missing
    (with a budget `gate`, runs its policy never proposed are not missing: they are counted apart)."""
    print(f"transferlab: results database {store.db_path}")
    print(f"transferlab: query it with: transferlab sql \"SELECT * FROM {view}\" --db {store.db_path}")
    stored = store.finished_keys()  # ok or stopped: decided runs
    stopped = store.finished_keys(statuses=("stopped",))
    # a run that depends on a stopped one is decided too: it will not run
    missing = [t for t in trials if t.run_key not in stored and not t.stopped_out(stopped)]
    if gate is not None:
        skipped = [t for t in missing if t.run_key not in gate.admitted]
        missing = [t for t in missing if t.run_key in gate.admitted]
        spent = gate.spent()
        print(f"transferlab: budget: {sum(spent.values())} of {len(trials)} runs of the full grid spent "
              f"({spent['transfers']} transfers, {spent['baselines']} baselines, {spent['sources']} sources); "
              f"{len(skipped)} runs left out by the budget; predict them with "
              f"`transferlab predict-transfers --setup {trials[0].setup.key} --db {store.db_path} "
              f"--tasks {','.join(sorted({t.target for t in trials if t.kind == 'transfer'}))}`")
    if missing:
        print(f"transferlab: {len(missing)} runs did not finish (see runs.status/error); re-run to retry them",
              file=sys.stderr)
        return 1
    return 0
