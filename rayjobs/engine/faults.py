"""Failure injection for the fault tests, read from the environment by every trial process and Ray Train worker.

Apart from `rayjobs.engine.trial` because both the trial and its distributed workers (`rayjobs.engine.distributed`)
call it, and the trial starts the distributed run.
"""

from __future__ import annotations

import os
import signal
import time

from rayjobs.plan import TrialSpec


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
