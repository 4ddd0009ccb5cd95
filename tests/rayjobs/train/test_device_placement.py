"""Where a single-process trial runs: on the GPU its setup asks for when the worker has one, else where
its context says (a Ray Train worker's context names its GPU). No GPU here: the 'worker has a GPU' case
is injected; the GPU run itself is for a machine with one."""

from __future__ import annotations

import pytest
import torch

from rayjobs.config import ModelSpec, ResourceSpec, SetupSpec, TrainSpec
from rayjobs.plan import TrialSpec
from rayjobs.train.loop import TrainContext, trial_device


def _trial(gpu: float) -> TrialSpec:
    setup = SetupSpec(model=ModelSpec(name="m", path="m", family="encoder"), resources=ResourceSpec(cpu=1, gpu=gpu))
    return TrialSpec(run_key="k", experiment="e", kind="source", setup=setup, hparams=TrainSpec(), train_task="t",
                     eval_task="t", seed=0, n_train=1, n_eval=None, eval_fraction=0.2, split_seed=0,
                     results_dir="/tmp")


def test_a_trial_runs_on_a_gpu_only_when_it_asks_for_one_and_the_worker_has_one(monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert trial_device(_trial(1), TrainContext()) == here
    assert trial_device(_trial(0), TrainContext()) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a worker with a GPU
    assert trial_device(_trial(1), TrainContext()) == "cuda"
    assert trial_device(_trial(0), TrainContext()) == "cpu"  # no GPU asked for: Ray gave it none
    assert trial_device(_trial(1), TrainContext(device="cuda:1")) == "cuda:1"  # Ray Train's choice stands
