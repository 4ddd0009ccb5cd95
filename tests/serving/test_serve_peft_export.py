"""`transferlab export-peft`: a stored LoRA run of a causal LM becomes a peft adapter folder that peft itself
reloads onto the base model, giving the log-likelihoods the run stored as its predictions (a hand-written
unpadded forward pass per choice, no project scoring code). Runs an adapter cannot hold are refused (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import DATA, needs_data

pytestmark = [needs_data]


@pytest.fixture(scope="module")
def lora_run(tiny_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    """One LoRA source run of the tiny GPT-2 folder on snli (base rendering, so the prompt is the example's
    text), trained in this process; its key, results folder and stored predictions."""
    from analysis.store.results import ResultStore
    from rayjobs.config import PairwiseConfig
    from rayjobs.engine.trial import execute
    from rayjobs.plan import expand_pairwise
    from rayjobs.tasks.registry import TaskRegistry

    results = tmp_path_factory.mktemp("lora")
    cfg = PairwiseConfig.model_validate({
        "name": "lora-export", "data_root": str(DATA), "tasks": {"sources": ["snli"]}, "seeds": [5],
        "sizes": {"source_train": 32, "target_train": 16, "eval": 12},
        "setups": [{"model": {"name": "tiny-gpt2", "path": str(tiny_lm_folder), "family": "causal", "max_length": 96},
                    "adaptation": {"method": "lora", "params": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                                "target_modules": ["c_attn"]}},
                    "prompts": {"train": "input", "eval": "input"},
                    "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3}}]})
    trial = next(t for t in expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(results)) if t.kind == "source")
    execute(trial)
    preds = ResultStore(results).read_predictions(trial.run_key).to_pylist()
    return {"key": trial.run_key, "results": results, "predictions": preds}


def _loglik(model: Any, tok: Any, prompt: str, choice: str) -> float:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(" " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
    return float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)))


def test_export_reloads_with_peft_to_the_stored_loglikelihoods(lora_run: dict[str, Any], tiny_lm_folder: Path,  # noqa: F811
                                                                tmp_path: Path, registry: Any,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.cli import main

    out = tmp_path / "adapter"
    assert main(["export-peft", lora_run["key"], str(out), "--results", str(lora_run["results"])]) == 0
    assert "exported to" in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_lm_folder)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_folder))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_lm_folder))
    texts = {e.uid: e.text for e in registry.load_data("snli", 0, 12, seed=5).eval}
    stored = [p for p in lora_run["predictions"] if p["split"] == "eval"]
    assert stored and all(p["template"] == "input" for p in stored)
    for p in stored:
        got = [_loglik(model, tok, texts[p["example_id"]], c) for c in p["choices"]]
        assert got == pytest.approx(p["logprobs"], abs=1e-4), p["example_id"]
    # the adapter matters: the bare base model scores differently
    p = stored[0]
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_lm_folder))
    assert [_loglik(bare, tok, texts[p["example_id"]], c) for c in p["choices"]] != pytest.approx(p["logprobs"],
                                                                                                  abs=1e-4)


def test_export_refuses_what_an_adapter_cannot_hold(trained_source: dict[str, Any], lora_run: dict[str, Any],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rayjobs.cli import main

    full = trained_source["runs"]["snli"]["key"]  # full fine-tuning of an encoder
    assert main(["export-peft", full, str(tmp_path / "a"), "--results", str(trained_source["results"])]) == 2
    assert "only LoRA runs" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    assert main(["export-peft", lora_run["key"], str(busy), "--results", str(lora_run["results"])]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (busy / "x").read_text() == "keep"
    assert main(["export-peft", "0000nosuchkey", str(tmp_path / "b"), "--results", str(lora_run["results"])]) == 2
