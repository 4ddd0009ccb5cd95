"""Training throughput and peak memory per setup, with ratios vs full fine-tuning in the same run.

    .venv/bin/python benchmarks/bench_training.py                      # built-in setups on this machine
    .venv/bin/python benchmarks/bench_training.py --steps 20 --task mrpc
    # on a GPU box: a config's setups as configured (e.g. T5-large; T5-3B / 70B under ZeRO-3)
    python benchmarks/bench_training.py --config configs/taskweb_t5l_finetune.yaml --steps 30
    python benchmarks/bench_training.py --model google/t5-large-lm-adapt --family seq2seq \\
        --gpu 1 --workers 4 --precision bf16 --stages 3

Each setup trains `--steps` optimiser steps of the one training loop in a fresh process (a fresh
Ray Train worker group for multi-worker / DeepSpeed setups), so peak memory is that setup's alone:
process peak RSS on CPU (busiest rank for worker groups), `torch.cuda.max_memory_allocated` on GPU.
Throughput = training examples / training seconds (model building and evaluation excluded). GPU
utilisation is sampled from this process with `torch.cuda.utilization` (needs pynvml) while a setup
runs. A setup whose model family or adaptation is not available yet is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rayjobs.config import PairwiseConfig, SetupSpec, load_config  # noqa: E402
from rayjobs.engine.smoke import TINY  # noqa: E402

DATA = REPO.parent / "shared" / "data"
MINILM = {"name": "minilm", "path": "builtin:minilm", "family": "encoder", "max_length": 64}


def default_setups(batch: int) -> list[dict[str, Any]]:
    """MiniLM (encoder) under every adaptation method, tiny T5 / GPT-2 under every method, and
    MiniLM full fine-tuning under ZeRO-2/3 on two workers; full fine-tuning of each model first."""
    train = {"epochs": 100, "batch_size": batch, "learning_rate": 5e-5}
    one = {"cpu": 1}
    two = {"cpu": 1, "workers": 2}
    small = {"lora": {"r": 8}, "prompt_tuning": {"num_virtual_tokens": 10},
             "prefix_tuning": {"num_virtual_tokens": 10}}
    models = {"encoder": ("minilm", MINILM, ["full", "bitfit", "lora", "adapter", "prompt_tuning"]),
              "seq2seq": ("t5-tiny", {"name": "t5-tiny", "family": "seq2seq", "config": TINY["seq2seq"],
                                      "max_length": 64},
                          ["full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"]),
              "causal": ("gpt2-tiny", {"name": "gpt2-tiny", "family": "causal", "config": TINY["causal"],
                                       "max_length": 64},
                         ["full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"])}
    out = []
    for name, model, methods in models.values():
        for m in methods:
            out.append({"name": f"{name}-{m}", "model": model, "train": train, "resources": one,
                        "adaptation": {"method": m, "params": small.get(m, {})}})
    for stage in (2, 3):
        out.append({"name": f"minilm-full-zero{stage}-2w", "model": MINILM, "train": train, "resources": two,
                    "deepspeed": {"stage": stage}})
    return out


def model_setups(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--model`: full fine-tuning of that model on one process/GPU, then under each ZeRO stage."""
    model = {"name": Path(args.model).name, "path": args.model, "family": args.family,
             "max_length": args.max_length}
    train = {"epochs": 100, "batch_size": args.batch, "learning_rate": 1e-4,
             "gradient_checkpointing": args.gradient_checkpointing}
    out = [{"name": "full", "model": model, "train": train, "resources": {"cpu": args.cpu, "gpu": args.gpu}}]
    for stage in args.stages:
        out.append({"name": f"full-zero{stage}-{args.workers}w", "model": model, "train": train,
                    "resources": {"cpu": args.cpu, "gpu": args.gpu, "workers": args.workers},
                    "deepspeed": {"stage": stage, "precision": args.precision,
                                  "offload_optimizer": args.offload, "offload_params": args.offload and stage == 3}})
    return out


def experiment(setup: dict[str, Any], task: str, steps: int, data_root: str | None) -> PairwiseConfig:
    s = SetupSpec.model_validate(setup)
    s = s.model_copy(update={"train": s.train.model_copy(update={"max_steps": steps, "epochs": 100})})
    n = steps * s.train.batch_size
    return PairwiseConfig.model_validate({
        "name": "bench", "data_root": data_root, "tasks": {"sources": [task]}, "seeds": [1],
        "sizes": {"source_train": n, "eval": 16}, "setups": [s.model_dump()]})


def run_one(payload: dict[str, Any]) -> dict[str, Any]:
    """In the child process: train one setup's source trial, return throughput and memory."""
    from rayjobs.plan import expand_pairwise
    from rayjobs.tasks.registry import TaskRegistry

    cfg = PairwiseConfig.model_validate(payload["config"])
    trial = next(t for t in expand_pairwise(cfg, TaskRegistry.load(data_root=cfg.data_root), payload["results"])
                 if t.kind == "source")
    setup = trial.setup
    if setup.deepspeed is not None or setup.resources.workers > 1:
        import ray

        from rayjobs.engine.distributed import train_distributed

        need = setup.resources.cpu * setup.resources.workers
        ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
        row = train_distributed(trial)
        ray.shutdown()
        rss, gpu = row["metrics"]["peak_rss_mib"], row["metrics"].get("peak_gpu_mib")
    else:
        import torch

        from rayjobs.train.loop import TrainContext, train_and_evaluate

        row = train_and_evaluate(trial, TrainContext())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    steps = row["hparams"]["steps"]
    examples = steps * trial.hparams.batch_size
    return {"examples": examples, "train_s": row["train_time_s"], "examples_per_s": examples / row["train_time_s"],
            "peak_rss_mib": rss, "peak_gpu_mib": gpu, "trainable": row["trainable_params"],
            "total": row["total_params"], "workers": setup.resources.workers}


class GpuSampler:
    """Mean GPU utilisation (%) over a setup's run, sampled from this process; None without NVML."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.utilization()  # raises without pynvml
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        except Exception:  # noqa: BLE001 - no NVML: report n/a
            self._thread = None
        return self

    def _run(self) -> None:
        import torch

        while not self._stop.wait(0.5):
            self.samples.append(float(sum(torch.cuda.utilization(i) for i in range(torch.cuda.device_count()))
                                      / torch.cuda.device_count()))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def measure(name: str, cfg: PairwiseConfig, timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        payload = json.dumps({"config": cfg.model_dump(mode="json"), "results": tmp})
        with GpuSampler() as gpu:
            p = subprocess.run([sys.executable, __file__, "--one", payload], capture_output=True, text=True,
                               timeout=timeout, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        err = [x for x in p.stderr.strip().splitlines() if x.strip()]
        reason = next((x for x in reversed(err) if "Error" in x), err[-1] if err else f"exit {p.returncode}")
        return {"name": name, "error": reason.strip()[:160]}
    return {"name": name, **json.loads(lines[-1][len("RESULT "):]), "gpu_util": gpu.mean}


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--config", help="benchmark this config's setups as configured (resources, DeepSpeed)")
    ap.add_argument("--model", help="hub id / folder: full fine-tuning on one process, then under ZeRO --stages")
    ap.add_argument("--family", default="encoder", choices=["encoder", "seq2seq", "causal"])
    ap.add_argument("--stages", type=int, nargs="*", default=[3], help="ZeRO stages for --model (default 3)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", type=float, default=0, help="GPUs per worker for --model")
    ap.add_argument("--cpu", type=float, default=1, help="CPUs per worker for --model")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--offload", action="store_true", help="ZeRO offload (optimizer; params too for stage 3)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch size")
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per setup")
    ap.add_argument("--task", default="snli")
    ap.add_argument("--data-root", default=str(DATA) if DATA.is_dir() else None)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per setup")
    args = ap.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if args.config:
        setups = [s.model_dump() | {"name": s.key} for s in load_config(args.config).setups]
    elif args.model:
        setups = model_setups(args)
    else:
        setups = default_setups(args.batch)

    results = []
    for s in setups:
        cfg = experiment(s, args.task, args.steps, args.data_root)
        t0 = time.time()
        r = measure(s["name"], cfg, args.timeout)
        results.append(r)
        status = "error: " + r["error"] if "error" in r else f"{r['examples_per_s']:.1f} ex/s"
        print(f"  {s['name']}: {status} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    ok = [r for r in results if "error" not in r]

    def base_of(r: dict[str, Any]) -> dict[str, Any]:
        """Each setup against the first (full fine-tuning) setup of the same model."""
        return next(b for b in ok if b["name"].split("-")[0] == r["name"].split("-")[0])

    print(f"\ntraining throughput and peak memory: task {args.task}, {args.steps} steps; "
          "'x base' = ratio to full fine-tuning of the same model, same run")
    head = (f"{'setup':<26}{'workers':>8}{'trainable':>12}{'ex/s':>9}{'x base':>8}{'peak RSS MiB':>14}"
            f"{'x base':>8}{'peak GPU MiB':>14}{'GPU util %':>12}")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<26}  not run: {r['error']}")
            continue
        base = base_of(r)
        print(f"{r['name']:<26}{r['workers']:>8}{r['trainable']:>12,}{r['examples_per_s']:>9.1f}"
              f"{r['examples_per_s'] / base['examples_per_s']:>8.2f}{r['peak_rss_mib']:>14.0f}"
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}{fmt(r['peak_gpu_mib'], '>14.0f'):>14}"
              f"{fmt(r['gpu_util'], '>12.0f'):>12}")
    print("peak RSS of a worker group is its busiest rank; ex/s of a worker group counts the global batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
