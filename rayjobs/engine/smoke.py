"""`--smoke`: the same config shrunk to run end to end on a laptop CPU in minutes.

Tiny sample sizes, one seed, a few optimiser steps, a few tasks; models named by hub id are replaced
by a tiny random-weight model of the same family (MiniLM's tokenizer), of the same architecture where
the id names one whose module names LoRA params refer to (Llama); GPUs, half precision and DeepSpeed
offload dropped (ZeRO stages still run, on at most 2 CPU workers).
"""

from __future__ import annotations

import argparse
import glob
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rayjobs.config import (
    AdaptationSpec,
    JobConfig,
    ModelSpec,
    PairwiseConfig,
    SetupSpec,
    TaskSelection,
    TrainSpec,
    ValidationSpec,
)
from rayjobs.job import get_job
from rayjobs.tasks.registry import DEFAULT_DATA_ROOT, TaskRegistry

TINY = {
    "encoder": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 512},
    "seq2seq": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                "num_heads": 4, "decoder_start_token_id": 0},
    "causal": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512},
}


#: tiny stand-ins of architectures a hub id names, so that module names in adaptation params (LoRA
#: `target_modules: [q_proj, ...]`) exist in the stand-in too; Mistral and Qwen share Llama's names
TINY_ARCH = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512},
}
ARCH_OF_ID = {"llama": "llama", "mistral": "llama", "qwen": "llama"}


def _arch(spec: ModelSpec) -> str | None:
    ident = f"{spec.path or ''} {spec.name}".lower()
    return next((arch for key, arch in ARCH_OF_ID.items() if key in ident), None) if spec.family == "causal" else None


def tiny_model(spec: ModelSpec) -> ModelSpec:
    if spec.config is not None or (spec.path or "").startswith("builtin:"):
        return spec
    arch = _arch(spec)
    return ModelSpec(name=spec.name, config=dict(TINY_ARCH[arch] if arch else TINY[spec.family]),
                     family=spec.family, max_length=min(spec.max_length, 128), head=spec.head)


def _smoke_adaptation(s: SetupSpec) -> AdaptationSpec:
    """LoRA `target_modules` name modules of the original architecture; when the tiny stand-in is of
    another one (no known architecture in the id), peft's defaults for the stand-in are used."""
    replaced = s.model.config is None and not (s.model.path or "").startswith("builtin:")
    if not replaced or _arch(s.model) or "target_modules" not in s.adaptation.params:
        return s.adaptation
    params = {k: v for k, v in s.adaptation.params.items() if k != "target_modules"}
    return s.adaptation.model_copy(update={"params": params})


def _smoke_batch(batch_size: int, workers: int) -> int:
    """At most 8, and a multiple of the worker count (each rank gets an equal micro-batch)."""
    return max(workers, min(batch_size, 8) // workers * workers)


def _smoke_train(hp: TrainSpec, workers: int) -> TrainSpec:
    """A few steps; periodic evaluation (if on) every 2 steps on 4 held-out examples."""
    update: dict[str, Any] = {"epochs": 1, "max_steps": 3, "grad_accum_steps": 1,
                              "batch_size": _smoke_batch(hp.batch_size, workers)}
    if hp.eval_every is not None:
        update.update(eval_every=2, validation=ValidationSpec(n=4))
    return hp.model_copy(update=update)


def smoke_setup(s: SetupSpec) -> SetupSpec:
    workers = min(s.resources.workers, 2)
    train = _smoke_train(s.train, workers)
    src = _smoke_train(s.source_train, workers) if s.source_train else None
    res = s.resources.model_copy(update={"gpu": 0, "cpu": 1, "workers": workers, "memory_gb": None})
    # GPU-only DeepSpeed settings go: half precision, offload, and `extra` (bucket sizes, NVMe paths...)
    ds = s.deepspeed.model_copy(update={"precision": "fp32", "offload_optimizer": False, "offload_params": False,
                                        "extra": {}}) if s.deepspeed else None
    # search spaces stay, except on the fields the smoke run fixes (a few steps)
    fixed = {"epochs", "max_steps", "grad_accum_steps", "batch_size", "eval_every"}
    spaces = {f"{stage}_space": {k: v for k, v in getattr(s, f"{stage}_space").items() if k not in fixed}
              for stage in ("train", "source_train")}
    return s.model_copy(update={"name": s.key, "model": tiny_model(s.model), "adaptation": _smoke_adaptation(s),
                                "train": train, "source_train": src, "resources": res, "deepspeed": ds, **spaces})


def has_local_data(registry: TaskRegistry, task: str) -> bool:
    try:
        return registry.origin(task).startswith("local:")
    except Exception:  # noqa: BLE001 - unknown task / missing file: preflight reports it
        return False


def smoke_tasks(cfg: PairwiseConfig) -> TaskSelection:
    """A few tasks of a large grid, only those with local data where there are any (no hub needed): at
    most 3 (a full 3-task pairwise grid), or 1 source and 1 target when a setup is distributed (a Ray
    Train worker group per trial costs ~40 s on a laptop)."""
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)

    def pick(names: list[str], k: int, avoid: list[str] | None = None) -> list[str]:
        pool = [t for t in names if t not in (avoid or [])] or list(names)
        local = [t for t in pool if has_local_data(registry, t)]
        return (local or pool)[:k]  # fewer tasks rather than ones that need the hub

    sel = cfg.tasks
    if any(s.deepspeed is not None or s.resources.workers > 1 for s in cfg.setups):
        src = pick(sel.sources, 1)
        return sel.model_copy(update={"sources": src, "targets": pick(sel.target_list, 1, avoid=src)})
    src = pick(sel.sources, 3)
    return sel.model_copy(update={"sources": src, "targets": None if sel.targets is None else pick(sel.targets, 3)})


def shrink_per_task(cfg: Any, train: int, eval: int, k: int = 2) -> Any:
    """A per-task job (pvi, fewshot) shrunk: `k` tasks (local data first), `train` + `eval` examples, one seed."""
    sizes = cfg.sizes.model_copy(update={"train": train, "eval": eval})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1], "sizes": sizes,
                                  "tasks": local_first(cfg, cfg.tasks, k),
                                  "setups": [smoke_setup(s) for s in cfg.setups]})


def local_first(cfg: JobConfig, tasks: list[str], k: int) -> list[str]:
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    return sorted(tasks, key=lambda t: not has_local_data(registry, t))[:k]


def smoke_variant(cfg: JobConfig) -> JobConfig:
    """The config shrunk for `--smoke`, by its job kind (`Job.smoke`: the kind module's `smoke(cfg)`)."""
    return get_job(cfg.job).smoke(cfg)


def config_kind(path: Path) -> str | None:
    """The job kind a config names (`job:`, default pairwise), or None for a task-registry file."""
    raw = yaml.safe_load(path.read_text()) or {}
    if "tasks" in raw and isinstance(raw["tasks"], dict) and "name" not in raw:  # a task registry file
        return None
    return str(raw.get("job", "pairwise"))


def smoke_all(paths: list[Path], results: Path, timeout: int = 600) -> list[dict[str, Any]]:
    """Every config's `--smoke` run, each in its own process and results folder, timed."""
    rows = []
    taskweb = Path("results/taskweb.duckdb")
    for path in paths:
        kind = config_kind(path)
        if kind is None:
            continue
        if kind == "multitask" and not taskweb.exists():  # the selection store the example configs name
            subprocess.run([sys.executable, "-m", "rayjobs.cli", "import", "taskweb",
                            str(DEFAULT_DATA_ROOT / "taskweb"), "--db", str(taskweb)], check=True,
                           capture_output=True)
        cmd = [sys.executable, "-m", "rayjobs.cli", "run", str(path), "--smoke", "--results", str(results / path.stem)]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            status, out = ("ok" if r.returncode == 0 else f"exit {r.returncode}"), r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            status, out = f"timeout {timeout}s", ""
        runs = re.search(r"(\d+) (?:distinct )?runs", out)
        rows.append({"config": path.name, "job": kind, "runs": int(runs.group(1)) if runs else None,
                     "seconds": round(time.time() - t0, 1), "status": status})
        print(f"{path.name:32s} {kind:9s} {rows[-1]['runs']!s:>5s} runs {rows[-1]['seconds']:7.1f}s  {status}",
              flush=True)
        if status != "ok":
            print("\n".join(out.splitlines()[-15:]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayjobs.engine.smoke",
                                 description="run every config's --smoke variant end to end and time it")
    ap.add_argument("configs", nargs="*", default=sorted(glob.glob("configs/*.yaml")))
    ap.add_argument("--results", default="results/smoke")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    rows = smoke_all([Path(c) for c in args.configs], Path(args.results), args.timeout)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} configs ran end to end; slowest "
          f"{max((r['seconds'] for r in rows), default=0):.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
