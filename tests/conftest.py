"""Shared test fixtures: where the repository and the reference data are, tiny models, the task
registry, a CLI runner, and a small trained run (checkpoint + predictions) to score and serve."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

#: tiny random-weight models per family (MiniLM's WordPiece vocabulary), fast enough for unit tests
TINY_BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512}
#: a pairwise grid on a tiny BERT (default: snli and mrpc, 16 examples each: 6 trainings in seconds)
TINY_GRID = """
name: {name}
data_root: {data}
tasks: {{sources: {sources}, targets: {targets}}}
seeds: [7]
sizes: {{source_train: 16, target_train: 16, eval: 16}}
setups:
  - model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 1, batch_size: 8}}
run: {{max_failures: {max_failures}}}
"""


@contextmanager
def local_ray(**env_vars: str) -> Iterator[Any]:
    """A fresh 2-CPU local Ray whose workers import this checkout, with `env_vars` in their environment."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **env_vars}})
    try:
        yield ray
    finally:
        ray.shutdown()


def tiny_grid(name: str, data: Path | str = DATA, sources: str = "[snli, mrpc]", targets: str = "null",
              max_failures: int = 0) -> str:
    """The YAML text of `TINY_GRID` (targets null: the sources)."""
    return TINY_GRID.format(name=name, data=data, sources=sources, targets=targets, max_failures=max_failures)


TINY_T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "decoder_start_token_id": 0}


def cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """`transferlab ARGS` in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "rayjobs.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def registry() -> Any:
    from rayjobs.tasks.registry import TaskRegistry

    return TaskRegistry.load(data_root=DATA)


@pytest.fixture(scope="session")
def trained_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One source run of a tiny bert on snli, trained in this process (no Ray): results folder, run key,
    its stored row and predictions. Session-scoped: several test files score and serve it."""
    from analysis.store.results import ResultStore
    from rayjobs.config import PairwiseConfig
    from rayjobs.engine.trial import execute
    from rayjobs.plan import expand_pairwise
    from rayjobs.tasks.registry import TaskRegistry

    results = tmp_path_factory.mktemp("trained")
    cfg = PairwiseConfig.model_validate({
        "name": "fixture", "data_root": str(DATA), "tasks": {"sources": ["snli", "scitail"]}, "seeds": [3],
        "sizes": {"source_train": 64, "target_train": 16, "eval": 40},
        "setups": [{"model": {"name": "tiny", "config": TINY_BERT, "max_length": 64},
                    "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3}}]})
    trials = expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(results))
    out: dict[str, Any] = {"results": results, "runs": {}}
    for t in trials:
        if t.kind == "source":
            row = execute(t)
            out["runs"][t.source] = {"key": t.run_key, "row": row,
                                     "predictions": ResultStore(results).read_predictions(t.run_key)}
    ResultStore(results).ingest()
    return out


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 saved as a model folder, as a user's local LM would be (shared by the scoring and serving tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayjobs.config import ModelSpec
    from rayjobs.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = load_tokenizer(ModelSpec(name="t", config=dict(TINY_GPT2), family="causal"))
    cfg = dict(TINY_GPT2)
    cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=len(tok), **cfg,
                                                                  eos_token_id=tok.sep_token_id,
                                                                  bos_token_id=tok.cls_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
