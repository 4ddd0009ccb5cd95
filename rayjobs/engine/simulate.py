"""The `simulate` trial executor: a benchmark tool that stands in for training (benchmarks/bench_scale.py).

Why: the driver, the scheduler, the store and the analyses must be measured at TaskWeb's size (~30,000
runs, 1,000 predictions each) on a machine that cannot train that much. A setup with a `simulate:` block
(`rayjobs.config.SimulateSpec`) runs its trials here: the trial sleeps `sleep_s`, checks that the source
checkpoint it starts from is stored, and returns a row shaped like the training loop's with `examples`
prediction rows (choice lists, log-likelihoods, probabilities) and, for stages that keep one, a
checkpoint of `checkpoint_bytes`. The numbers are drawn deterministically from the run's identity:
a task's difficulty, a source -> target effect and seed noise, so transfer scores have structure.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any

import numpy as np

from rayjobs.plan import TrialSpec


def _unit(*parts: Any) -> float:
    """A number in [0, 1) fixed by `parts` (the same on every node and run)."""
    h = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def accuracy_of(trial: TrialSpec) -> float:
    """The simulated run's expected accuracy: task difficulty + source effect + seed noise."""
    task = trial.eval_task
    base = 0.55 + 0.35 * _unit("task", trial.setup.key, task)
    effect = 0.0
    if trial.kind == "transfer":
        effect = 0.12 * (_unit("effect", trial.setup.key, trial.source, task) - 0.4)
    noise = 0.03 * (_unit("seed", trial.run_key) - 0.5)
    return float(min(0.99, max(0.01, base + effect + noise)))


def simulate_trial(trial: TrialSpec, ctx: Any = None) -> dict[str, Any]:
    sim = trial.setup.simulate
    if sim is None:
        raise ValueError(f"{trial.label}: the simulate executor needs a setup with a `simulate:` block")
    t0 = time.time()
    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

    store = ResultStore(trial.results_dir)
    if trial.source_run_key and not (store.checkpoint_dir(trial.source_run_key) / "meta.json").is_file():
        raise FileNotFoundError(f"{trial.label}: source checkpoint {trial.source_run_key} is not stored")
    time.sleep(sim.sleep_s)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(trial.run_key.encode()).digest()[:8], "big"))
    n, k = sim.examples, sim.choices
    acc = accuracy_of(trial)
    gold = rng.integers(0, k, n)
    correct = rng.random(n) < acc
    wrong = (gold + rng.integers(1, k, n)) % k
    pred = np.where(correct, gold, wrong)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), pred] = logits.max(axis=1) + 0.05 + rng.exponential(1.0, n)  # the prediction is the argmax
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    probs = np.exp(logprobs)
    choices = [f"choice {j}" for j in range(k)]
    lp, pr = logprobs.round(6).tolist(), probs.round(6).tolist()
    predictions = [{"example_id": f"validation:{i}", "template": "input", "task": trial.eval_task, "split": "eval",
                    "gold": int(gold[i]), "choices": choices, "logprobs": lp[i], "logprobs_mean": lp[i],
                    "probs": pr[i], "prediction": int(pred[i]), "correct": bool(correct[i])} for i in range(n)]
    checkpoint = None
    if trial.save_checkpoint:
        d = store.checkpoint_dir(trial.run_key)
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter.bin").write_bytes(rng.bytes(sim.checkpoint_bytes))
        (d / "meta.json").write_text(json.dumps({"run_key": trial.run_key, "task": trial.train_task,
                                                 "setup": trial.setup.key, "simulated": True}))
        checkpoint = str(d)
    score = float(correct.mean())
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": trial.kind, "setup": trial.setup.key,
        "model": trial.setup.model.name, "adaptation": trial.setup.adaptation.method, "source": trial.source,
        "target": trial.target, "sources": trial.sources, "seed": trial.seed, "source_run_key": trial.source_run_key,
        "baseline_run_key": trial.baseline_run_key, "n_train": trial.n_train, "n_eval": n,
        "hparams": {**trial.hparams.model_dump(), "simulated": True,
                    **({"source_seed": trial.source_seed} if trial.source_seed is not None else {})},
        "metric": "accuracy", "score": score, "metrics": {"accuracy": score, "simulated": sim.model_dump()},
        "trainable_params": 0, "total_params": 0, "train_time_s": sim.sleep_s, "wall_time_s": time.time() - t0,
        "host": socket.gethostname(), "checkpoint": checkpoint, "status": "ok", "predictions": predictions,
    }
