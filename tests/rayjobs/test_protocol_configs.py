"""The papers' protocols in the shipped configs: FUTE's T5-base surrogate (Sec. 3.3) by default with the
LM-adapted one as an override, SST-2 and WANLI in the prompt-selection config (Sec. 4.2.1), Self-Select
scored, a Llama-2-70B-chat few-shot config beside the 7B one (paper 003 Sec. 4.2) reporting accuracy and
macro-F1 (checked against sklearn on a hand case)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from rayjobs.fewshot import accuracy_and_macro_f1
from rayjobs.job import load_job_config
from rayjobs.tasks.registry import TaskRegistry

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")


@needs_data
@pytest.mark.parametrize("name", ["fute_llm_prompts.yaml", "fute_t5b_models.yaml"])
def test_fute_gpu_configs_use_t5_base_and_take_the_lm_adapted_one_as_an_override(name: str) -> None:
    _, cfg = load_job_config(str(REPO / "configs" / name))
    assert {s.surrogate.path for s in cfg.spaces} == {"google/t5-base"}
    _, alt = load_job_config(str(REPO / "configs" / name), ["spaces.0.surrogate.path=google/t5-base-lm-adapt"])
    assert alt.spaces[0].surrogate.path == "google/t5-base-lm-adapt"


@needs_data
def test_fute_prompt_config_has_the_papers_six_datasets_and_self_select() -> None:
    _, cfg = load_job_config(str(REPO / "configs" / "fute_llm_prompts.yaml"))
    assert {"rotten_tomatoes", "imdb", "sst2", "cb", "anli_r3", "wanli"} <= set(cfg.dte.tasks)
    assert {p.task for p in cfg.mte.prompts} == {"rotten_tomatoes", "imdb", "sst2", "cb", "anli_r3", "wanli"}
    assert cfg.mte.self_select and cfg.mte.perplexity
    reg = TaskRegistry.load(cfg.task_files, cfg.data_root)
    assert reg.get("wanli").choices == ["Entailment", "Neutral", "Contradiction"]  # the NLI verbalisers' order
    assert reg.get("sst2").choices == ["negative", "positive"]
    assert all(len(t.answer_choices) == 3 for p in cfg.mte.prompts if p.task == "wanli" for t in p.templates)


@needs_data
def test_llama2_70b_chat_fewshot_config_beside_the_7b_one() -> None:
    _, big = load_job_config(str(REPO / "configs" / "fewshot_llama2_70b_chat.yaml"))
    _, small = load_job_config(str(REPO / "configs" / "fewshot_llama2.yaml"))
    assert big.setups[0].model.path == "meta-llama/Llama-2-70b-chat-hf" and big.setups[0].model.family == "causal"
    assert big.tasks == small.tasks and big.shots == small.shots == "classes" and big.seeds == small.seeds
    assert big.results_dir == small.results_dir and big.name != small.name  # one store, two experiments


def test_fewshot_rows_give_accuracy_and_macro_f1_as_sklearn() -> None:
    gold = [0, 0, 1, 2, 2, 1, 0, 2]
    pred = [0, 1, 1, 2, 0, 1, 0, 1]
    rows = [{"template": "a", "gold": g, "prediction": p} for g, p in zip(gold, pred, strict=True)]
    rows += [{"template": "b", "gold": g, "prediction": 0} for g in gold] + [{"template": "b", "gold": None}]
    got = accuracy_and_macro_f1(rows, 3)
    acc_a, acc_b = np.mean(np.array(pred) == gold), np.mean(np.array(gold) == 0)
    f1_a = f1_score(gold, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    f1_b = f1_score(gold, [0] * len(gold), labels=[0, 1, 2], average="macro", zero_division=0)
    assert got["accuracy"] == pytest.approx((acc_a + acc_b) / 2)  # per template, then the mean
    assert got["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert accuracy_and_macro_f1([{"template": "a", "gold": None, "prediction": 1}], 3) == {}
