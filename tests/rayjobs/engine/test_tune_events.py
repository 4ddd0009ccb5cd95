"""The run's records from Tune's trial events, in the orders Tune sends them.

A Tune trial process placed on a node that is then lost fails before Tune reports its start: Tune
calls `on_trial_recover` (or `on_trial_error`) for a trial it never called `on_trial_start` for. The
callback must record that attempt as failed, not end the driver (found by the lost-node study of
`test_scale_faults.py`: the driver died with a KeyError).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from analysis.store.results import ResultStore
from rayjobs.config import SetupSpec
from rayjobs.engine.events import RunCallback, StageResult, TrialRecord
from rayjobs.engine.tune_events import TuneEvents
from rayjobs.plan import TrialSpec


class Seen(RunCallback):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def on_trial_start(self, record: TrialRecord) -> None:
        self.events.append(("start", record.run_key, record.status))

    def on_trial_retry(self, record: TrialRecord) -> None:
        self.events.append(("retry", record.run_key, record.status))

    def on_trial_end(self, record: TrialRecord) -> None:
        self.events.append(("end", record.run_key, record.status))


def _spec(key: str, results: Path) -> TrialSpec:
    setup = SetupSpec.model_validate({"model": {"name": "tiny", "config": {"model_type": "bert"}}})
    return TrialSpec(run_key=key, experiment="e", kind="source", setup=setup, hparams=setup.train, train_task="snli",
                     eval_task="snli", seed=1, n_train=8, n_eval=8, eval_fraction=0.2, split_seed=0,
                     results_dir=str(results))


def test_a_trial_that_fails_before_its_start_event_is_recorded_as_failed(tmp_path: Path) -> None:
    specs = {"u1": _spec("k1", tmp_path), "u2": _spec("k2", tmp_path)}
    searcher = SimpleNamespace(released_at={}, completed_at={})
    result = StageResult("stage", total=2)
    seen = Seen()
    events = TuneEvents(result, [seen], searcher, specs, t0=0.0)
    lost = SimpleNamespace(trial_id="t1", config={"uid": "u1"}, last_result={})
    events.on_trial_recover(0, [], lost)  # no on_trial_start came first
    events.on_trial_start(0, [], lost)  # Tune's retry of it
    events.on_trial_error(0, [], lost)
    never = SimpleNamespace(trial_id="t2", config={"uid": "u2"}, last_result={})
    events.on_trial_error(0, [], never)
    assert seen.events == [("retry", "k1", "failed"), ("start", "k1", "running"), ("end", "k1", "failed"),
                           ("end", "k2", "failed")]
    assert [(r.run_key, r.attempt, r.status) for r in result.records] == [("k1", 1, "failed"), ("k1", 2, "failed"),
                                                                         ("k2", 1, "failed")]
    assert result.failed == ["k1", "k2"]
    assert all("Tune trial process died" in r.error for r in result.records)
    # nothing in the lost process stored the failure, so the driver did: a row a run
    assert ResultStore(str(tmp_path)).read_result("k2")["status"] == "failed"
