"""Warm trial workers: Ray actors that run trials one after another in one process.

A fresh process per trial pays its start-up and the torch/transformers imports (about 5 s on a
laptop CPU) before any work; a warm worker pays them once. Between trials it restores the process
state a trial may change (threads, deterministic-algorithm flags, default dtype, grad mode, working
directory; every trial seeds its own RNGs) and frees the trial's memory, so a trial's result does not
depend on which trials ran before it in the same process (tests/test_warm_trials.py).

Workers are grouped by `Shape`, the Ray resources one trial asks for; a worker only runs trials of its
shape. A distributed trial's worker is only its coordinator (no CPU, see `worker_shape`): its Ray
Train workers are started per trial by `TorchTrainer`, so nothing is kept warm for them.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from rayjobs.plan import TrialSpec

#: memory a distributed trial's coordinator reserves (it only waits on its Ray Train workers)
COORDINATOR_MEMORY = 256 * 2**20


@dataclass(frozen=True)
class Shape:
    """Ray resources of one worker (= of one trial)."""

    cpu: float
    gpu: float = 0.0
    memory: float = 0.0  # bytes; 0 = not reserved
    coordinator: bool = False  # a distributed trial's coordinator

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpu, "num_gpus": self.gpu, "max_restarts": 0}
        if self.memory:
            opts["memory"] = self.memory
        return opts

    def fits(self, resources: dict[str, float]) -> int:
        """How many workers of this shape `resources` hold (a large number when it reserves nothing)."""
        counts = [int(resources.get(key, 0.0) // need) for key, need in
                  (("CPU", self.cpu), ("GPU", self.gpu), ("memory", self.memory)) if need]
        return min(counts) if counts else 10**6

    def __str__(self) -> str:
        parts = [f"{self.cpu:g} CPU"] + ([f"{self.gpu:g} GPU"] if self.gpu else [])
        return ("coordinator " if self.coordinator else "") + ", ".join(parts)


def is_distributed(trial: TrialSpec) -> bool:
    return trial.setup.deepspeed is not None or trial.setup.resources.workers > 1


def worker_shape(trial: TrialSpec) -> Shape:
    """The worker a trial runs in. A distributed trial's worker only coordinates: its Ray Train workers
    ask for cpu/gpu themselves (Train V2 builds its own placement group), so the coordinator reserves a
    little memory and no CPU; even a fraction of a CPU would fragment a node so that a worker group
    asking for all of its CPUs never fits (seen with Ray 2.60 on a 2-CPU local cluster)."""
    res = trial.setup.resources
    if is_distributed(trial):
        return Shape(cpu=0.0, memory=COORDINATOR_MEMORY, coordinator=True)
    return Shape(cpu=res.cpu, gpu=res.gpu, memory=(res.memory_gb or 0.0) * 2**30)


class TrialWorker:
    """One warm process (a Ray actor): imports once, then runs trials one after another."""

    def __init__(self, coordinator: bool = False) -> None:
        from rayjobs import train_loop

        if not coordinator:  # pay the model-side imports now, while the driver is still dispatching
            import transformers  # noqa: F401

            from rayjobs.models import encoder, text_to_text  # noqa: F401
        self.defaults = train_loop.capture_process_state()
        self.trials = 0
        gc.freeze()  # the imported modules: the collection after each trial need not scan them again

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def run(self, trial: dict[str, Any]) -> dict[str, Any]:
        """Run one trial to its stored result; returns an outcome (never raises for a failing trial)."""
        from rayjobs import train_loop
        from rayjobs.trial import execute

        spec = TrialSpec.model_validate(trial)
        train_loop.restore_process_state(self.defaults)
        out: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "warm": self.trials > 0,
                               "started": time.time()}
        try:
            row = execute(spec)
            out.update(status="ok", score=row.get("score"), train_time_s=row.get("train_time_s"),
                       wall_time_s=row.get("wall_time_s"))
            del row
        except Exception as e:  # noqa: BLE001 - execute stored the failed row; the driver decides on retries
            out.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        finally:
            self.trials += 1
            train_loop.release_memory()
            if self.trials == 1:  # what the first trial imported lazily (model classes) stays too
                gc.freeze()
        out["finished"] = time.time()
        return out


@dataclass
class Worker:
    """The driver's handle on one worker."""

    handle: Any
    shape: Shape
    ready_ref: Any = None  # set until the actor is up
    requested: float = field(default_factory=time.monotonic)
    name: str = ""  # pid@host once up
    busy: bool = False
    trials: int = 0  # trials handed to it so far


class WorkerPool:
    """Warm workers by shape, owned by one driver. Pass one pool to several `runner.run_trials` calls to
    keep its workers warm between them (benchmarks); `close()` ends them."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.start_s: list[float] = []  # seconds from request to ready, per worker started (cold starts)

    def idle(self, shape: Shape) -> Worker | None:
        return next((w for w in self.workers if w.shape == shape and w.ready_ref is None and not w.busy), None)

    def count(self, shape: Shape) -> int:
        return sum(w.shape == shape for w in self.workers)

    def start(self, shape: Shape) -> Worker:
        import ray

        handle = ray.remote(TrialWorker).options(**shape.options()).remote(shape.coordinator)
        worker = Worker(handle, shape, ready_ref=handle.ready.remote())
        self.workers.append(worker)
        return worker

    def starting(self) -> dict[Any, Worker]:
        return {w.ready_ref: w for w in self.workers if w.ready_ref is not None}

    def mark_ready(self, worker: Worker) -> None:
        """The worker's ready() returned (or raised: then it is dropped and the error re-raised)."""
        import ray

        try:
            info = ray.get(worker.ready_ref)
        except Exception:
            self.discard(worker)
            raise
        worker.ready_ref = None
        worker.name = f"{info['pid']}@{info['host']}"
        self.start_s.append(time.monotonic() - worker.requested)

    def submit(self, worker: Worker, trial: TrialSpec) -> Any:
        worker.busy = True
        worker.trials += 1
        return worker.handle.run.remote(trial.model_dump(mode="json"))

    def release(self, worker: Worker) -> None:
        worker.busy = False

    def discard(self, worker: Worker) -> None:
        """Forget a worker and end its process (a dead worker is only forgotten)."""
        import ray

        if worker in self.workers:
            self.workers.remove(worker)
        try:
            ray.kill(worker.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def make_room(self, ready_shapes: set[Shape], distributed_active: bool) -> None:
        """End idle workers that hold resources other work needs: every idle non-coordinator while a
        distributed trial is ready or running (its Ray Train workers ask the cluster for CPUs this pool
        cannot see), and idle workers of shapes with no trial ready when a ready trial's worker waits
        for resources (mixed shapes in one job)."""
        idle = [w for w in self.workers if not w.busy and w.ready_ref is None]
        if not idle:
            return
        if distributed_active:
            for w in idle:
                if not w.shape.coordinator:
                    self.discard(w)
            idle = [w for w in idle if w.shape.coordinator]
        others = [w for w in idle if w.shape not in ready_shapes]
        if others and self._starved(ready_shapes):
            for w in others:
                self.discard(w)

    def prune_dead(self, timeout: float = 2.0) -> None:
        """Forget idle workers whose process is gone (after one died: a lost node takes all of its
        workers); one that does not answer within `timeout` is only busy and kept."""
        import ray

        idle = {w.handle.ready.remote(): w for w in self.workers if not w.busy and w.ready_ref is None}
        if not idle:
            return
        answered, _ = ray.wait(list(idle), num_returns=len(idle), timeout=timeout)
        for ref in answered:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - its process died
                self.discard(idle[ref])

    def end_idle(self, keep: set[Shape]) -> None:
        """End idle and starting workers of shapes outside `keep` (no trial left for them)."""
        for w in list(self.workers):
            if not w.busy and w.shape not in keep:
                self.discard(w)

    def _starved(self, ready_shapes: set[Shape]) -> bool:
        """A worker for a ready trial is starting but the cluster has no room for it."""
        import ray

        waiting = {w.shape for w in self.workers if w.ready_ref is not None} & ready_shapes
        if not waiting:
            return False
        free = ray.available_resources()
        return any(s.fits(free) == 0 for s in waiting)

    def close(self) -> None:
        for w in list(self.workers):
            self.discard(w)
