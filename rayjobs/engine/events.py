"""What a run reports: one record per trial attempt, the stage's result, and the hooks that receive them
(progress lines, ingest, Ray metrics), apart from the runner so the Tune callback can fill them in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    tune_pid: int = 0  # the Tune trial process that forwarded it


@dataclass
class StageResult:
    name: str
    total: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # waiting for a failed (or stopped) run
    stopped: list[str] = field(default_factory=list)  # stopped early by Tune's scheduler (decided runs)
    skipped: list[str] = field(default_factory=list)  # never proposed by the run's budget policy
    seconds: float = 0.0
    records: list[TrialRecord] = field(default_factory=list)
    experiment_path: str = ""  # Tune's experiment folder
    workers: dict[str, Any] = field(default_factory=dict)  # warm workers started, their start seconds


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
