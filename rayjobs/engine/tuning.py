"""Ray Tune runs every job's trials: one `Tuner.fit()` per run, a dependency-aware `Searcher`, warm workers.

Each trial of a plan is one Tune trial. `DependencySearcher` hands a trial to Tune as soon as every run
in its `depends_on` is stored (no stage barrier: a transfer starts once its own source is stored) and
marks dependents of a failed run blocked. Tune's trial is thin (`trainable`): it reserves a little memory
and no CPU, borrows a warm `pool.TrialWorker` of the trial's resource shape from the run's
`WorkerBroker`, streams the worker's periodic validation results to `tune.report` and reports the
outcome last. Tune's own actors are cheap (Ray and Tune imports only), so when Tune's actor cache tears
one down at a dependency frontier the next trial pays well under a second, while the workers holding
torch, transformers and the CPUs/GPUs stay warm in the broker for the whole run
(benchmarks/bench_pairwise.py measures both). A trial that launches a Ray Train worker group (DeepSpeed,
`resources.workers > 1`) builds its `TorchTrainer` inside the Tune function itself, the way Ray
documents Train inside Tune, and its per-epoch reports are forwarded.

Early stopping (`run.scheduler`), search algorithms and logger callbacks (`run.callbacks`) are Tune's.
A trial its scheduler stops stores a `stopped` run (see `rayjobs.engine.trial.TrialStopped`). The run key, not
Tune's state, is what a re-run trusts: the driver skips stored keys before building the Tuner, and a
trial whose row is stored returns it without training (`Tuner.restore` of an interrupted experiment
works too: the searcher's state is saved with the experiment).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from rayjobs.config import RunSpec
from rayjobs.engine import observe
from rayjobs.engine.pool import Shape, TrialWorker, is_distributed, worker_shape
from rayjobs.plan import TrialSpec

#: failed worker starts in a row (with none of the shape alive) after which its trials fail
MAX_START_FAILURES = 3

#: memory a Tune trial reserves: it only forwards a warm worker's results (no CPU, so it never takes a
#: CPU a worker or a Ray Train group needs)
TRIAL_MEMORY = 64 * 2**20


# -- the broker of warm workers ---------------------------------------------------------------------------
class WorkerBroker:
    """Owns the run's warm workers (a Ray actor next to the driver, so they outlive Tune's trial actors).

    `acquire` hands an idle worker of a shape to a Tune trial, starting one while fewer than the shape's
    cap exist, else waits; `release` takes it back (after a stopped trial has written its row)."""

    def __init__(self, caps: dict[str, int]):
        self.caps = {Shape(**_json_shape(k)): v for k, v in caps.items()}
        self.workers: dict[int, dict[str, Any]] = {}  # id -> {handle, shape, busy, name, trials}
        self.next_id = 0
        self.cond = asyncio.Condition()
        self.started = 0  # worker processes started (cold starts)
        self.start_s: list[float] = []
        self.waiters: Counter = Counter()  # acquirers waiting, per shape
        self.failed_starts: Counter = Counter()
        self.start_errors: dict[Shape, str] = {}

    def set_caps(self, caps: dict[str, int]) -> None:
        self.caps.update({Shape(**_json_shape(k)): v for k, v in caps.items()})

    async def acquire(self, shape: dict[str, Any]) -> dict[str, Any]:
        """An idle worker of the shape for one trial: one that is free, or one started for it (while
        fewer than the shape's cap exist); whichever comes first, so a worker that cannot start yet (no
        room on the cluster) never holds up a trial that a running worker could take."""
        s = Shape(**shape)
        async with self.cond:
            self.waiters[s] += 1
            try:
                while True:
                    idle = next((i for i, w in self.workers.items() if w["shape"] == s and not w["busy"]
                                 and w["name"]), None)
                    if idle is not None:
                        self.workers[idle]["busy"] = True
                        return self._lease(idle)
                    if self.start_errors.get(s):
                        raise RuntimeError(f"trial workers ({s}) fail to start: {self.start_errors[s]}")
                    starting = sum(w["shape"] == s and not w["name"] for w in self.workers.values())
                    if starting < self.waiters[s] and sum(w["shape"] == s for w in self.workers.values()) \
                            < self._cap(s):
                        self._start(s)
                    await self.cond.wait()
            finally:
                self.waiters[s] -= 1

    def _start(self, s: Shape) -> None:
        import ray  # lazy: ray only on the cluster path

        wid = self.next_id
        self.next_id += 1
        handle = ray.remote(TrialWorker).options(max_concurrency=4, **s.options()).remote(s.coordinator)
        self.workers[wid] = {"handle": handle, "shape": s, "busy": False, "name": "", "trials": 0}
        self.started += 1
        asyncio.ensure_future(self._started(wid, handle, time.monotonic()))

    async def _started(self, wid: int, handle: Any, t0: float) -> None:
        """The worker came up (it joins the idle ones) or could not (a few failures in a row with none of
        its shape alive: the acquirers of that shape get the error)."""
        s = self.workers[wid]["shape"]
        await self._make_room(s)
        try:
            info = await handle.ready.remote()
        except Exception as e:  # noqa: BLE001 - its node was lost, or it cannot start at all
            async with self.cond:
                if self.workers.pop(wid, None) is not None:  # not ended on purpose (room for a group)
                    self.failed_starts[s] += 1
                    alive = any(w["shape"] == s and w["name"] for w in self.workers.values())
                    if self.failed_starts[s] >= MAX_START_FAILURES and not alive:
                        self.start_errors[s] = f"{type(e).__name__}: {e}"[:2000]
                self.cond.notify_all()
            return
        async with self.cond:
            if wid in self.workers:
                self.workers[wid]["name"] = f"{info['pid']}@{info['host']}"
                self.start_s.append(time.monotonic() - t0)
                self.failed_starts[s] = 0
            self.cond.notify_all()

    def _cap(self, s: Shape) -> int:
        """The shape's cap; a shape the driver did not name (a restored experiment): what fits the cluster."""
        import ray  # lazy: ray only on the cluster path

        if s not in self.caps:
            self.caps[s] = max(1, min(s.fits(ray.cluster_resources()), 64))
        return self.caps[s]

    def _lease(self, wid: int) -> dict[str, Any]:
        w = self.workers[wid]
        w["trials"] += 1
        return {"id": wid, "handle": w["handle"], "name": w["name"], "warm": w["trials"] > 1}

    async def _make_room(self, waiting: Shape) -> None:
        """A worker for `waiting` asks for resources the cluster does not have free: end idle workers of
        other shapes (a job mixing shapes), which hold what it needs."""
        import ray  # lazy: ray only on the cluster path

        if waiting.fits(ray.available_resources()) > 0:
            return
        async with self.cond:
            for wid, w in list(self.workers.items()):
                if w["shape"] != waiting and not w["busy"] and w["name"]:
                    self._end(wid)

    async def release(self, wid: int, stopped: bool = False) -> None:
        """The trial is done with the worker; a stopped trial's worker is free once its row is written."""
        w = self.workers.get(wid)
        if w is None:
            return
        if stopped:
            try:
                await w["handle"].wait_idle.remote()
            except Exception:  # noqa: BLE001 - it died meanwhile
                await self.discard(wid)
                return
        async with self.cond:
            w["busy"] = False
            self.cond.notify_all()

    async def discard(self, wid: int) -> None:
        """A worker died (or broke): forget it, and idle workers whose process is gone with it (a lost
        node takes all of its workers)."""
        async with self.cond:
            self._end(wid)
            idle = {i: w for i, w in self.workers.items() if not w["busy"] and w["name"]}
        pings = {i: w["handle"].ready.remote() for i, w in idle.items()}
        for i, ref in pings.items():
            try:
                await asyncio.wait_for(ref, timeout=2.0)
            except asyncio.TimeoutError:
                pass  # busy, not dead
            except Exception:  # noqa: BLE001 - its process died
                async with self.cond:
                    self._end(i)
        async with self.cond:
            self.cond.notify_all()

    async def group_start(self) -> None:
        """A distributed trial starts its Ray Train group: idle warm workers give their CPUs back."""
        async with self.cond:
            for wid, w in list(self.workers.items()):
                if not w["busy"] and not w["shape"].coordinator:
                    self._end(wid)

    async def keep(self, shapes: list[dict[str, Any]]) -> None:
        """End idle workers of shapes no remaining trial needs (they hold resources, and cluster nodes)."""
        keep = {Shape(**s) for s in shapes}
        async with self.cond:
            for wid, w in list(self.workers.items()):
                if not w["busy"] and w["shape"] not in keep:
                    self._end(wid)

    async def stop_trial(self, wid: int) -> None:
        w = self.workers.get(wid)
        if w is not None:
            await w["handle"].stop.remote()

    async def drain(self) -> dict[str, Any]:
        """Wait until no worker runs a trial (stopped trials write their rows); the run's worker figures."""
        for w in list(self.workers.values()):
            try:
                await w["handle"].wait_idle.remote()
            except Exception:  # noqa: BLE001 - dead: nothing runs there
                pass
        return {"started": self.started, "start_s": list(self.start_s),
                "workers": [w["name"] for w in self.workers.values()]}

    def _end(self, wid: int) -> None:
        import ray  # lazy: ray only on the cluster path

        w = self.workers.pop(wid, None)
        if w is not None:
            try:
                ray.kill(w["handle"])
            except Exception:  # noqa: BLE001 - already gone
                pass


def _shape_key(s: Shape) -> str:
    return f"{s.cpu}|{s.gpu}|{s.memory}|{int(s.coordinator)}"


def _json_shape(key: str) -> dict[str, Any]:
    cpu, gpu, mem, coord = key.split("|")
    return {"cpu": float(cpu), "gpu": float(gpu), "memory": float(mem), "coordinator": coord == "1"}


class WorkerPool:
    """The driver's handle on a broker. Pass one pool to several `runner.run_trials` calls to keep its
    workers warm between them (benchmarks); `close()` ends them."""

    def __init__(self) -> None:
        self.broker: Any = None
        self.name = ""

    def ensure(self, caps: dict[Shape, int], name: str = "") -> Any:
        import ray  # lazy: ray only on the cluster path
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,  # lazy: ray only on the cluster path
        )

        keyed = {_shape_key(s): n for s, n in caps.items()}
        if self.broker is None:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.name = name or f"broker-{uuid.uuid4().hex[:12]}"
            self.broker = ray.remote(WorkerBroker).options(
                num_cpus=0, max_concurrency=1000, scheduling_strategy=here, name=self.name,
                namespace=NAMESPACE).remote(keyed)
        else:
            ray.get(self.broker.set_caps.remote(keyed))
        return self.broker

    def figures(self) -> dict[str, Any]:
        import ray  # lazy: ray only on the cluster path

        return ray.get(self.broker.drain.remote()) if self.broker is not None else {"started": 0, "start_s": []}

    def close(self) -> None:
        import ray  # lazy: ray only on the cluster path

        if self.broker is not None:
            try:
                ray.get(self.broker.drain.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - best effort: the kill ends its workers either way
                pass
            ray.kill(self.broker)
            self.broker = None


def broker_name(experiment: str) -> str:
    """The broker of a Tune experiment, by its folder name: `restore` starts one under the same name."""
    return f"broker-{experiment}"


def tune_environment(slots: int) -> None:
    """Tune settings read from the environment when a Tuner starts (before it is built)."""
    # a searcher other than Tune's default gets one pending trial unless told otherwise; our trials
    # reserve only memory, so as many may be pending as there are slots
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # final results carry no validation metric
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the loggers are `run.callbacks`
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for logger in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(logger).setLevel(logging.WARNING)


def tune_trainable() -> Any:
    """`trainable` with its resources: a little memory, no CPU (the warm workers hold the CPUs and GPUs)."""
    from ray import tune  # lazy: ray only on the cluster path
    from ray.tune.execution.placement_groups import (
        PlacementGroupFactory,  # lazy: ray only on the cluster path
    )

    return tune.with_resources(trainable, PlacementGroupFactory([{"CPU": 0, "memory": TRIAL_MEMORY}]))


# -- the Tune trial ---------------------------------------------------------------------------------------
def trainable(config: dict[str, Any]) -> None:
    """One Tune trial: run the planned trial on a warm worker, forwarding what it reports."""
    import ray  # lazy: ray only on the cluster path
    from ray import tune  # lazy: ray only on the cluster path
    from ray.exceptions import RayActorError  # lazy: ray only on the cluster path

    spec = TrialSpec.model_validate(config["trial"])
    if is_distributed(spec):
        _run_group(spec, _broker(config["broker"]))
        return
    broker = _broker(config["broker"])
    lease = ray.get(broker.acquire.remote(_shape_dict(worker_shape(spec))))
    handed = time.time()
    out: dict[str, Any] = {}
    try:
        for ref in lease["handle"].run.remote(spec.model_dump(mode="json")):
            event = ray.get(ref)
            if event["type"] == "progress":
                tune.report({k: v for k, v in event.items() if k not in ("type", "validation_curve")}
                            | {"final": False})
            else:
                out = event
    except SystemExit:  # Tune stopped the trial (early stopping) inside tune.report
        broker.stop_trial.remote(lease["id"])
        broker.release.remote(lease["id"], stopped=True)
        raise
    except RayActorError as e:  # the worker process died (killed, out of memory, node lost)
        ray.get(broker.discard.remote(lease["id"]))
        out = lost_worker_outcome(spec, e, time.time() - handed)
    else:
        broker.release.remote(lease["id"])
    result = {"final": True, "status": out.get("status"), "score": out.get("score"),
              "worker": lease["name"], "warm": bool(out.get("warm", lease["warm"])), "handed_at": handed,
              "busy_s": float(out.get("finished", 0.0) - out.get("started", 0.0)) if "started" in out else 0.0,
              "trainable_pid": os.getpid(), "steps": out.get("steps")}
    if out.get("status") == "failed":
        raise TrialFailed(out.get("error") or "trial failed")
    tune.report(result)


def _run_group(spec: TrialSpec, broker: Any) -> None:
    """A distributed trial: its Ray Train `TorchTrainer` is built here, in the Tune function (Ray's way of
    running Train inside Tune), the trial's result reported when it returns."""
    import ray  # lazy: ray only on the cluster path
    from ray import tune  # lazy: ray only on the cluster path

    from rayjobs.engine.trial import execute  # lazy: duckdb only when a store is opened

    ray.get(broker.group_start.remote())
    t0 = time.time()
    try:
        row = execute(spec)
    except Exception as e:
        raise TrialFailed(f"{type(e).__name__}: {e}"[:2000]) from e
    tune.report({"final": True, "status": row.get("status", "ok"), "score": row.get("score"), "worker": "",
                 "warm": False, "handed_at": t0, "busy_s": time.time() - t0, "trainable_pid": os.getpid(),
                 "steps": None})


class TrialFailed(RuntimeError):
    """The trial raised; its failed row is stored. Tune retries it up to `run.max_failures` times."""


def lost_worker_outcome(trial: TrialSpec, err: BaseException, wall: float) -> dict[str, Any]:
    """The worker died during the trial: nothing in it could store the failure, so the trial does
    (unless the run was stored just before the process ended)."""
    from ray.exceptions import RayActorError  # lazy: ray only on the cluster path

    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened
    from rayjobs.engine.trial import DECIDED, failed_row  # lazy: duckdb only when a store is opened

    store = ResultStore(trial.results_dir)
    stored = store.read_result(trial.run_key)
    if stored is not None and stored["status"] in DECIDED:
        return {"status": stored["status"]}
    if isinstance(err, RayActorError):
        lost: Exception = observe.TrialLost("trial process died without writing a result (killed, out of memory "
                                            f"or node lost): {type(err).__name__}: {err}"[:2000])
    else:
        lost = RuntimeError(f"trial worker failed: {type(err).__name__}: {err}"[:2000])
    store.write_result(failed_row(trial, lost, wall))
    return {"status": "failed", "error": str(lost)}


#: the broker's Ray namespace (named actors are looked up by name from Tune's trial processes)
NAMESPACE = "transferlab"
_BROKERS: dict[str, Any] = {}


def _broker(name: str) -> Any:
    import ray  # lazy: ray only on the cluster path

    if name not in _BROKERS:
        _BROKERS[name] = ray.get_actor(name, namespace=NAMESPACE)
    return _BROKERS[name]


def _shape_dict(s: Shape) -> dict[str, Any]:
    return {"cpu": s.cpu, "gpu": s.gpu, "memory": s.memory, "coordinator": s.coordinator}


# -- the searcher -----------------------------------------------------------------------------------------
def make_searcher(trials: list[TrialSpec], done: set[str], broker_name: str, own_pool: bool,
                  gate: Any = None, stopped: set[str] = frozenset()) -> Any:
    """The run's `DependencySearcher` (`rayjobs.engine.searcher`); with its own pool of warm workers, it
    tells the broker after each trial which worker shapes are still needed."""
    from rayjobs.engine.searcher import DependencySearcher  # lazy: ray only on the cluster path

    def keep_shapes(left: list[TrialSpec]) -> None:
        shapes = {_shape_key(worker_shape(t)) for t in left}
        _broker(broker_name).keep.remote([_json_shape(k) for k in shapes])

    return DependencySearcher(trials, done, broker_name, gate, stopped, keep_shapes if own_pool else None)


# -- schedulers, search algorithms, callbacks -------------------------------------------------------------
def make_scheduler(run: RunSpec) -> Any:
    """`run.scheduler` as a Tune trial scheduler (None: FIFO)."""
    spec = run.scheduler
    if spec is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule  # lazy: ray only on the cluster path

    if spec.asha is not None:
        a = spec.asha
        return ASHAScheduler(time_attr=a.time_attr, metric=a.metric, mode=a.mode, grace_period=a.grace_period,
                             reduction_factor=a.reduction_factor, max_t=a.max_t)
    m = spec.median
    return MedianStoppingRule(time_attr=m.time_attr, metric=m.metric, mode=m.mode, grace_period=m.grace_period,
                              min_samples_required=m.min_samples_required)


def make_callbacks(run: RunSpec, tracking_dir: Path, name: str) -> list[Any]:
    """`run.callbacks` as Tune logger callbacks; MLflow to a local file store (`tracking_dir/mlruns`) and W&B
    offline (`tracking_dir/wandb`) unless MLFLOW_TRACKING_URI / WANDB_MODE say otherwise; both name
    their experiment / project after the job."""
    out: list[Any] = []
    for kind in run.callbacks:
        if kind == "csv":
            from ray.tune.logger import CSVLoggerCallback  # lazy: ray only on the cluster path

            out.append(CSVLoggerCallback())
        elif kind == "json":
            from ray.tune.logger import JsonLoggerCallback  # lazy: ray only on the cluster path

            out.append(JsonLoggerCallback())
        elif kind == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback  # lazy: ray only on the cluster path

            out.append(TBXLoggerCallback())
        elif kind == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback  # lazy: ray only on the cluster path

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (tracking_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless asked: a laptop has no tracking server (`mlflow-skinny`
            # brings no SQL backend), so the local default opts in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name))
        elif kind == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback  # lazy: ray only on the cluster path

            os.environ.setdefault("WANDB_MODE", "offline")  # read by the callback's key check, here
            # Ray's per-trial W&B logging actors do not get this process's environment: mode and folder
            # travel as wandb.init arguments
            out.append(WandbLoggerCallback(project=name, mode=os.environ["WANDB_MODE"],
                                           dir=os.environ.get("WANDB_DIR", str(tracking_dir))))
    return out


# -- resuming an interrupted experiment -------------------------------------------------------------------
def restore(path: str, max_concurrent: int | None = None) -> int:
    """`Tuner.restore` of an interrupted experiment: unfinished trials resume (each returns its stored
    row if it has one), the searcher hands out what was left; then the results are ingested."""
    import ray  # lazy: ray only on the cluster path
    from ray import tune  # lazy: ray only on the cluster path

    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    tune_environment(max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1))))
    pool = WorkerPool()
    pool.ensure({}, name=broker_name(Path(path.rstrip("/")).name))
    try:
        grid = tune.Tuner.restore(path, trainable=tune_trainable(), resume_unfinished=True,
                                  restart_errored=True).fit()
    finally:
        pool.close()
    dirs = {r.config["trial"]["results_dir"] for r in grid if r.config and "trial" in r.config}
    for d in dirs:
        ResultStore(d).ingest()
    errors = sum(r.error is not None for r in grid)
    print(f"transferlab: restored {path}: {len(grid)} trials, {errors} failed; results in {', '.join(sorted(dirs))}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayjobs.engine.tuning",
                                 description="resume an interrupted transferlab Tune experiment")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore", help="Tuner.restore the experiment folder and run what is left")
    r.add_argument("path", help="the Tune experiment folder the run printed (results/<exp>/tune/<name>-<time>)")
    args = ap.parse_args(argv)
    return restore(args.path)


if __name__ == "__main__":
    raise SystemExit(main())
