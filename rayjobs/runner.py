"""Run a list of trials as one Ray Tune stage, with per-trial resources and progress lines.

Shared by every job kind: a job expands its config into `TrialSpec`s, filters out run keys already
stored, and hands each stage here. Resuming is by run key (results folder), not by Tune state, so a
killed driver, a lost node or an edited config all resume the same way.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayjobs import observe
from rayjobs.config import RunSpec
from rayjobs.plan import TrialSpec


@dataclass
class StageResult:
    name: str
    total: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


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
                        "TOKENIZERS_PARALLELISM": "false", **QUIET}}
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", runtime_env=env, include_dashboard=False, log_to_driver=True)


def trial_resources(spec: dict[str, Any]) -> Any:
    """Resources Tune reserves for a trial; distributed trials reserve only their coordinator."""
    from ray.tune import PlacementGroupFactory

    res = TrialSpec.model_validate(spec["trial"]).setup.resources
    distributed = TrialSpec.model_validate(spec["trial"]).setup.deepspeed is not None or res.workers > 1
    if distributed:
        # The Ray Train workers launched by the trial request cpu/gpu themselves (Train V2 builds its own
        # placement group; it cannot use bundles reserved here). The coordinator only waits on them, so
        # it reserves a little memory and no CPU: even a 0.01-CPU bundle fragments a node so that
        # workers asking for all of its CPUs never fit (seen with Ray 2.60 on a 2-CPU local cluster).
        return PlacementGroupFactory([{"memory": 256 * 2**20}])
    bundle: dict[str, float] = {"CPU": res.cpu}
    if res.gpu:
        bundle["GPU"] = res.gpu
    if res.memory_gb:
        bundle["memory"] = res.memory_gb * 2**30
    return PlacementGroupFactory([bundle])


def check_fits_local_cluster(trials: list[TrialSpec], run: RunSpec) -> None:
    """Fail a stage before training when a worker group is larger than the local Ray cluster.

    Preflight runs before Ray starts, when the cluster is not known; Ray Train would otherwise retry
    starting such a group forever. Only a cluster this process started (no address) is known not
    to grow; on a remote cluster the autoscaler may add nodes, so there Ray Train waits.
    """
    if run.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    import ray

    from rayjobs.preflight import check_distributed

    cluster = dict(ray.cluster_resources())
    for setup in {t.setup.key: t.setup for t in trials}.values():
        check_distributed(setup, cluster)


def distributed_concurrency(trials: list[TrialSpec]) -> int | None:
    """Default cap on concurrent trials when some launch worker groups: their coordinators reserve no
    CPU, so without a cap Tune would start every trial's Train controller at once and the groups would
    queue for resources. The cap is how many worker groups (of the smallest kind) fit the cluster now."""
    groups = [t.setup.resources for t in trials if t.setup.deepspeed is not None or t.setup.resources.workers > 1]
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


#: how progress lines name the trials of a kind
STAGE_NAMES = {"source": "sources", "target": "baselines", "transfer": "transfers"}


def run_trials(name: str, todo: list[TrialSpec], run: RunSpec, store: Any) -> list[str]:
    """Run trials in dependency order (a trial starts once every key in its `depends_on` is stored);
    ingest after each wave; returns the run keys that failed. Trials waiting on a failed run are
    reported and left for a re-run."""
    done = store.finished_keys()
    pending = list(todo)
    failed: list[str] = []
    while pending:
        ready = [t for t in pending if all(d in done for d in t.depends_on)]
        if not ready:
            break
        kinds = list(dict.fromkeys(STAGE_NAMES.get(t.kind, t.kind) for t in ready))
        failed += run_stage(f"{name}-{'-'.join(kinds)}", ready, run, store.root / "tune").failed
        store.ingest()
        observe.rows_ingested(store.last_ingested)
        done = store.finished_keys()
        ready_keys = {t.run_key for t in ready}
        pending = [t for t in pending if t.run_key not in ready_keys]
    if pending:
        print(f"transferlab: {len(pending)} runs wait for failed runs they depend on; re-run to retry", flush=True)
    return failed


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


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _progress_callback(stage: StageResult, t0: float) -> Any:
    from ray.tune import Callback

    class StageProgress(Callback):
        """One line per finished trial: done / total / failed / ETA."""

        def _line(self, trial: Any, status: str) -> None:
            n = stage.ok + len(stage.failed)
            rate = (time.time() - t0) / max(1, n)
            what = TrialSpec.model_validate(trial.config["trial"]).label
            print(f"[{stage.name}] {n}/{stage.total} done, {len(stage.failed)} failed, "
                  f"ETA {_fmt_s(rate * (stage.total - n))} | {status}: {what}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            stage.ok += 1
            self._line(trial, "ok")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            stage.failed.append(trial.config.get("trial", {}).get("run_key", "?"))
            self._line(trial, "FAILED")

    return StageProgress()


def run_stage(name: str, trials: list[TrialSpec], run: RunSpec, storage: Path) -> StageResult:
    """Run `trials` as one Tune experiment; returns counts (results are in the store)."""
    stage = StageResult(name, len(trials))
    if not trials:
        return stage
    from ray import tune

    from rayjobs.trial import tune_trainable

    init_ray(run)
    check_fits_local_cluster(trials, run)
    t0 = time.time()
    concurrent = run.max_concurrent_trials or distributed_concurrency(trials)

    def trainable(config: dict[str, Any]) -> None:
        tune_trainable(config)

    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources),
        param_space={"trial": tune.grid_search([t.model_dump(mode="json") for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=run.max_failures, fail_fast=False),
            callbacks=[_progress_callback(stage, t0), *observe.tune_callbacks()],
            verbose=run.verbose,
        ),
    )
    tuner.fit()
    stage.seconds = time.time() - t0
    print(f"[{name}] stage finished: {stage.ok}/{stage.total} ok, {len(stage.failed)} failed, "
          f"{_fmt_s(stage.seconds)}", flush=True)
    sys.stdout.flush()
    return stage
