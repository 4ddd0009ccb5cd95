"""The shipped configs stay runnable: each validates, its paper setup is what it claims, and its
`--smoke` variant passes every pre-training check and plans the staged grid on this machine.
(`make smoke-configs` trains every one of them for real; see the README.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rayjobs.config import load_config
from rayjobs.engine.preflight import check_setups
from rayjobs.engine.smoke import config_kind, smoke_variant
from rayjobs.plan import expand_pairwise
from rayjobs.tasks.registry import TaskRegistry

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAIRWISE = [p for p in CONFIGS if config_kind(p) == "pairwise"]


def test_there_is_a_config_per_paper_setup() -> None:
    """The issue's list: t5s/t5b/t5l finetune, t5b adapters, t5b BitFit, gpt2-medium, roberta-base,
    T5-3B multi-task, a 70B LoRA setup; with the model family and adaptation each needs."""
    found = {}
    for p in PAIRWISE:
        for s in load_config(p).setups:
            found[(s.model.family, s.adaptation.method, s.model.path)] = p.name
    want = [("seq2seq", "full", "google/t5-small-lm-adapt"), ("seq2seq", "full", "google/t5-base-lm-adapt"),
            ("seq2seq", "full", "google/t5-large-lm-adapt"), ("seq2seq", "adapter", "google/t5-base-lm-adapt"),
            ("seq2seq", "bitfit", "google/t5-base-lm-adapt"), ("causal", "full", "gpt2-medium"),
            ("encoder", "full", "roberta-base"), ("causal", "lora", "meta-llama/Llama-2-70b-hf"),
            ("encoder", "full", "builtin:minilm"), ("encoder", "lora", "builtin:minilm")]
    missing = [w for w in want if w not in found]
    assert not missing, missing
    big = load_config(REPO / "configs" / "llama2_70b_lora.yaml").setups[0]
    assert big.deepspeed is not None and big.deepspeed.stage == 3 and big.resources.gpu >= 1


@pytest.mark.parametrize("path", PAIRWISE, ids=lambda p: p.stem)
def test_smoke_variant_passes_preflight_and_plans(path: Path, tmp_path: Path) -> None:
    cfg = smoke_variant(load_config(path))
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    check_setups(cfg, registry)
    trials = expand_pairwise(cfg, registry, str(tmp_path))
    n_src, n_tgt = len(cfg.tasks.sources), len(cfg.tasks.target_list)
    pairs = sum(1 for s in cfg.tasks.sources for t in cfg.tasks.target_list if s != t or not cfg.tasks.exclude_self)
    assert len(trials) == n_src + n_tgt + pairs  # one seed
    for s in cfg.setups:  # nothing in a smoke run needs a GPU, a hub or half precision
        assert s.resources.gpu == 0 and (s.model.config is not None or s.model.path.startswith("builtin:"))
        assert s.deepspeed is None or s.deepspeed.precision == "fp32"
    assert all(registry.origin(t).startswith("local:") for t in {*cfg.tasks.sources, *cfg.tasks.target_list})
