"""What the staged plan saves, and what Ray/Tune costs per trial: a 3-source x 3-target x 1-seed grid.

    .venv/bin/python benchmarks/bench_pairwise.py [--config configs/quickstart.yaml]
        [--source-train 96] [--target-train 32] [--eval 32] [--epochs 1] [--overhead-trials stage1|all]

All arms run in this one process, on one local Ray started once and warmed up with two untimed
trials (both timed apart), each arm in its own temporary results folder so nothing is reused:

1. staged (transferlab): one source model per source, one baseline per target, every transfer
   starts from its source's checkpoint -- 3 + 3 + 6 = 12 trainings (`rayjobs.pairwise`'s two stages);
2. naive: the same grid where every (source, target) pair trains its own source model first --
   6 + 3 + 6 = 15 trainings, same sizes, same runner, same concurrency;
3. per-trial overhead of Ray/Tune: the same trials (stage 1 by default) once through
   `rayjobs.trial.execute` in this process, one after the other with one torch thread (what a
   1-CPU trial gets), and once through `rayjobs.runner.run_stage` with one trial at a time;
   (Tune - direct) / trials is the price of a trial: a fresh worker process (imports), Tune's
   bookkeeping, result reporting.

The model and tasks come from the config (MiniLM on the quickstart tasks by default), the sizes from
the flags. Timings are wall-clock; on a shared machine they are noisy, so compare the ratios of one
run rather than seconds across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.store import ResultStore  # noqa: E402
from rayjobs.config import ExperimentConfig, RunSpec, load_config  # noqa: E402
from rayjobs.plan import TrialSpec, expand_pairwise, run_key  # noqa: E402
from rayjobs.runner import init_ray, run_stage  # noqa: E402
from rayjobs.tasks import TaskRegistry  # noqa: E402


def bench_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config's first setup and first 3 tasks, 1 seed, the benchmark's sizes and epochs."""
    cfg = load_config(args.config)
    setup = cfg.setups[0]
    upd = {"epochs": args.epochs, "max_steps": None}
    setup = setup.model_copy(update={
        "train": setup.train.model_copy(update=upd),
        "source_train": setup.source_hparams.model_copy(update=upd),
        "resources": setup.resources.model_copy(update={"cpu": 1, "gpu": 0, "workers": 1}),
    })
    tasks = cfg.tasks.sources[:3]
    return cfg.model_copy(update={
        "name": "bench-pairwise", "seeds": [cfg.seeds[0]], "setups": [setup],
        "tasks": cfg.tasks.model_copy(update={"sources": tasks, "targets": None, "exclude_self": True}),
        "sizes": cfg.sizes.model_copy(update={"source_train": args.source_train, "target_train": args.target_train,
                                              "eval": args.eval}),
    })


def staged_trials(cfg: ExperimentConfig, results: Path) -> list[TrialSpec]:
    return expand_pairwise(cfg, TaskRegistry.load(cfg.task_files, cfg.data_root), str(results))


def naive_trials(cfg: ExperimentConfig, results: Path) -> list[TrialSpec]:
    """The plan without source reuse: each transfer gets a source model trained for it alone."""
    trials = staged_trials(cfg, results)
    sources = {t.run_key: t for t in trials if t.kind == "source"}
    out = [t for t in trials if t.kind == "target"]
    for x in (t for t in trials if t.kind == "transfer"):
        src = sources[x.source_run_key]  # type: ignore[index]
        own_key = run_key({"naive_source": src.run_key, "for_target": x.target})
        out.append(src.model_copy(update={"run_key": own_key}))
        out.append(x.model_copy(update={"source_run_key": own_key,
                                        "run_key": run_key({"naive_transfer": x.run_key, "init": own_key})}))
    return out


def run_two_stages(name: str, trials: list[TrialSpec], run: RunSpec, results: Path) -> int:
    """What `rayjobs.pairwise.run` does with a plan: sources and baselines, ingest, transfers, ingest."""
    store = ResultStore(results)
    failed = run_stage(f"{name}-1", [t for t in trials if t.kind != "transfer"], run, results / "tune").failed
    store.ingest()
    failed += run_stage(f"{name}-2", [t for t in trials if t.kind == "transfer"], run, results / "tune").failed
    store.ingest()
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} trials failed; see {results}")
    return len(trials)


def run_direct(trials: list[TrialSpec]) -> int:
    """The same trials without Ray: `rayjobs.trial.execute` in this process, one torch thread."""
    import torch

    from rayjobs.trial import execute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what Ray gives a 1-CPU trial (OMP_NUM_THREADS=1)
    try:
        for t in trials:
            execute(t)
    finally:
        torch.set_num_threads(threads)
    return len(trials)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mean_train_s(results: Path) -> float:
    store = ResultStore(results)
    store.ingest()
    with store.connect(read_only=True) as con:
        return float(con.execute("SELECT avg(train_time_s) FROM runs WHERE status = 'ok'").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"),
                   help="model and tasks come from its first setup and first 3 tasks")
    p.add_argument("--source-train", type=int, default=96)
    p.add_argument("--target-train", type=int, default=32)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--overhead-trials", choices=["stage1", "all"], default="stage1",
                   help="trials timed with and without Ray: sources+baselines (6) or the whole grid (12)")
    p.add_argument("--workdir", help="keep results here instead of a temporary folder")
    args = p.parse_args(argv)

    cfg = bench_config(args)
    setup = cfg.setups[0]
    model = setup.model.path or f"tiny {setup.model.config.get('model_type')} from config"  # type: ignore[union-attr]
    print(f"model: {setup.model.name} ({model}), adaptation {setup.adaptation.method}, "
          f"max_length {setup.model.max_length}; tasks {cfg.tasks.sources}; seed {cfg.seeds[0]}")
    print(f"sizes: source {args.source_train}, target {args.target_train}, eval {args.eval} examples, "
          f"{args.epochs:g} epoch(s), batch {setup.train.batch_size}; 1 CPU per trial; cpus on this machine: "
          f"{os.cpu_count()}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-pairwise-", dir=args.workdir) as tmp:
        root = Path(tmp)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # inherited by the local Ray's workers
        ray_start, _ = timed(lambda: init_ray(cfg.run))
        parallel = cfg.run.model_copy(update={"verbose": 0, "max_concurrent_trials": None})
        serial = cfg.run.model_copy(update={"verbose": 0, "max_concurrent_trials": 1})
        # One untimed trial first: the first Ray workers pay cold imports and file caches that would
        # otherwise be charged to whichever arm runs first.
        warm = [t for t in staged_trials(cfg, root / "warmup") if t.kind == "target"][:2]
        t_warm, _ = timed(lambda: run_stage("warmup", warm, parallel, root / "warmup" / "tune"))

        staged = staged_trials(cfg, root / "staged")
        t_staged, n_staged = timed(lambda: run_two_stages("staged", staged, parallel, root / "staged"))
        naive = naive_trials(cfg, root / "naive")
        t_naive, n_naive = timed(lambda: run_two_stages("naive", naive, parallel, root / "naive"))

        def overhead_set(results: Path) -> list[TrialSpec]:
            ts = staged_trials(cfg, results)
            return ts if args.overhead_trials == "all" else [t for t in ts if t.kind != "transfer"]

        direct = overhead_set(root / "direct")
        t_direct, n_direct = timed(lambda: run_direct(direct))
        tune1 = overhead_set(root / "tune1")
        t_tune1, _ = timed(lambda: run_two_stages("tune-serial", tune1, serial, root / "tune1"))
        train_direct, train_tune = mean_train_s(root / "direct"), mean_train_s(root / "tune1")

    rows = [
        ("staged plan (transferlab), Ray Tune", n_staged, t_staged),
        ("naive plan (source retrained per pair), Ray Tune", n_naive, t_naive),
        (f"{args.overhead_trials} trials, direct trial.execute, serial", n_direct, t_direct),
        (f"{args.overhead_trials} trials, runner.run_stage, 1 at a time", n_direct, t_tune1),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'arm':<{w}}  trainings  wall s  s/training")
    for name, n, t in rows:
        print(f"{name:<{w}}  {n:9d}  {t:6.1f}  {t / n:10.2f}")
    print(f"\nnaive / staged wall time:                 {t_naive / t_staged:5.2f}x "
          f"({n_naive} vs {n_staged} trainings)")
    print(f"Ray/Tune overhead per trial:              {(t_tune1 - t_direct) / n_direct:5.2f} s "
          f"(({t_tune1:.1f} - {t_direct:.1f}) / {n_direct}; mean training time per trial {train_direct:.2f} s "
          f"direct, {train_tune:.2f} s in Tune)")
    print(f"not in the arms: local Ray start-up {ray_start:.1f} s, warm-up ({len(warm)} trials) {t_warm:.1f} s")
    print("wall-clock times on a shared machine are noisy: compare the ratios of one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
