"""Warm trial workers: Ray actors that run trials one after another in one process.

A fresh process per trial pays its start-up and the torch/transformers imports (about 5 s on a
laptop CPU) before any work; a warm worker pays them once. Between trials it restores the process
state a trial may change (threads, deterministic-algorithm flags, default dtype, grad mode, working
directory; every trial seeds its own RNGs) and frees the trial's memory, so a trial's result does not
depend on which trials ran before it in the same process (tests/rayjobs/engine/test_warm_trials.py).

Workers are grouped by `Shape`, the Ray resources one trial asks for; a worker only runs trials of its
shape. A distributed trial's worker is only its coordinator (no CPU, see `worker_shape`): its Ray
Train workers are started per trial by `TorchTrainer`, so nothing is kept warm for them.
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
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
    """One warm process (a Ray actor): imports once, then runs trials one after another.

    `run` is a streaming generator: it yields each periodic validation result while the trial trains
    (`{"type": "progress", ...}`) and the outcome last (`{"type": "done", ...}`), so a Tune trial can
    report them as they come. The trial runs in a thread of this actor so that `stop()` (another call,
    the actor takes a few at once) can reach it: the trial stops at its next validation."""

    def __init__(self, coordinator: bool = False) -> None:
        from rayjobs.train import loop as train_loop  # lazy: torch stays out of CLI start-up

        if not coordinator:  # pay the model-side imports now, while the driver is still dispatching
            import transformers  # lazy: transformers loads only when a model is built  # noqa: F401

            from rayjobs.models import encoder, text_to_text  # lazy: torch stays out of CLI start-up  # noqa: F401
        self.defaults = train_loop.capture_process_state()
        self.trials = 0
        self.stop_event = threading.Event()
        self.idle_lock = threading.Lock()
        gc.freeze()  # the imported modules: the collection after each trial need not scan them again

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def stop(self) -> None:
        self.stop_event.set()

    def wait_idle(self) -> bool:
        """Returns once no trial runs here (a stopped trial may still be writing its row)."""
        with self.idle_lock:
            return True

    def run(self, trial: dict[str, Any]) -> Any:
        from rayjobs.engine.trial import TrialStopped  # lazy: duckdb only when a store is opened

        events: queue.Queue = queue.Queue()
        with self.idle_lock:
            self.stop_event.clear()

            def report(metrics: dict[str, Any]) -> None:
                events.put({"type": "progress", **metrics})
                if self.stop_event.is_set():
                    raise TrialStopped(metrics)

            def work() -> None:  # the outcome always comes back, or the stream would wait forever
                try:
                    out = self._run(trial, report)
                except BaseException as e:  # noqa: BLE001 - _run catches trial errors; this is the worker's own
                    out = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
                events.put({"type": "done", **out})

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            while True:
                event = events.get()
                yield event
                if event["type"] == "done":
                    break
            worker.join()

    def _run(self, trial: dict[str, Any], report: Any) -> dict[str, Any]:
        """Run one trial to its stored result; returns an outcome (never raises for a failing trial)."""
        from rayjobs.engine.trial import execute  # lazy: duckdb only when a store is opened
        from rayjobs.train import loop as train_loop  # lazy: torch stays out of CLI start-up

        spec = TrialSpec.model_validate(trial)
        train_loop.restore_process_state(self.defaults)
        out: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "warm": self.trials > 0,
                               "started": time.time()}
        try:
            row = execute(spec, report=report)
            out.update(status=row.get("status", "ok"), score=row.get("score"), train_time_s=row.get("train_time_s"),
                       wall_time_s=row.get("wall_time_s"), steps=(row.get("hparams") or {}).get("steps")
                       if isinstance(row.get("hparams"), dict) else None)
            del row
        except Exception as e:  # noqa: BLE001 - execute stored the failed row; Tune decides on retries
            out.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        finally:
            self.trials += 1
            train_loop.release_memory()
            if self.trials == 1:  # what the first trial imported lazily (model classes) stays too
                gc.freeze()
        out["finished"] = time.time()
        return out
