"""Export a stored LoRA run as a peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

Why: the one checkpoint format (rayjobs/models/checkpoint.py) stores trained parameters by name for our own
loader; the LLM ecosystem (vLLM's `--lora-modules`, `ray.serve.llm` multi-LoRA, `PeftModel.from_pretrained`)
reads peft's layout. The run's model is rebuilt from its self-describing checkpoint (as `run:<key>` is
served), its LoRA weights loaded, and peft itself writes the folder, so the names and the config are
peft's own. Only runs whose trained parameters are all LoRA weights can be exported: a task head trained
beside LoRA (encoder classifiers) is not part of an adapter, and vLLM serves LMs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rayjobs.config import ConfigError, SetupSpec


def export_peft(run_key: str, results: str | Path, out: str | Path) -> dict[str, Any]:
    """Write run `run_key`'s adapter under `out` (a new or empty folder); what was written."""
    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened
    from rayjobs.models import checkpoint  # lazy: torch stays out of CLI start-up
    from rayjobs.scoring.blackbox import open_black_box  # lazy: torch stays out of CLI start-up

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export-peft: {out} exists and is not an empty folder")
    folder = ResultStore(results).checkpoint_dir(run_key)
    meta = checkpoint.read_meta(folder)
    if "setup_spec" not in meta:
        raise ConfigError(f"export-peft: run {run_key} has no self-describing checkpoint under {folder}")
    setup = SetupSpec.model_validate(meta["setup_spec"])
    if setup.adaptation.method != "lora":
        raise ConfigError(f"export-peft: run {run_key} is a {setup.adaptation.method} run; only LoRA runs "
                          "export to peft's adapter layout")
    if setup.model.family not in ("causal", "seq2seq"):
        raise ConfigError(f"export-peft: run {run_key} is an {setup.model.family} classifier with a trained task "
                          "head, which an adapter cannot hold; export LoRA runs of causal or seq2seq LMs")
    extra = [n for n in checkpoint.read_state(folder) if ".lora_" not in n]
    if extra:
        raise ConfigError(f"export-peft: run {run_key} trained parameters outside LoRA ({extra[0]}, ...), "
                          "which an adapter cannot hold")
    module = open_black_box(f"run:{run_key}", results=results).tm.module  # type: ignore[attr-defined]
    if setup.model.path and not setup.model.path.startswith("builtin:"):
        module.peft_config["default"].base_model_name_or_path = setup.model.path
    module.save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    return {"run_key": run_key, "out": str(out), "base_model": config.get("base_model_name_or_path"),
            "files": sorted(p.name for p in out.iterdir())}
