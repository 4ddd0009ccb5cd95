"""What the staged plan saves, what Ray Tune costs per trial, and what releasing transfers early saves.

    .venv/bin/python benchmarks/bench_pairwise.py [--config configs/quickstart.yaml]
        [--source-train 96] [--target-train 32] [--eval 32] [--epochs 1] [--slow-factor 8]

A 3-source x 3-target x 1-seed grid, two 1-CPU trials at a time. All arms run in this one process, on
one local Ray started once, with one pool of warm workers (`rayjobs.engine.tuning.WorkerPool`) warmed up by two
untimed trials, each arm in its own temporary results folder so nothing is reused. Every arm runs
through Ray Tune (one Tuner per `run_trials` call, the dependency searcher, thin Tune trials on the
warm workers), as `transferlab run` does:

1. staged (transferlab): one source model per source, one baseline per target, every transfer
   starts from its source's checkpoint -- 3 + 3 + 6 = 12 trainings; naive: every (source, target)
   pair trains its own source model first -- 6 + 3 + 6 = 15 trainings. The wall-time ratio
   naive / staged is printed next to the compute ratio (the sum of the naive trials' compute over the
   staged trials', each trial's compute being its time in `trial.execute` as its worker measured it):
   with no per-trial overhead and no idle workers the two are equal.
2. per-trial overhead: stage 1 (sources and baselines, 6 trials) through `trial.execute` in this
   process, one after the other with one torch thread (what a 1-CPU worker gets), and through
   `runner.run_trials` with one trial at a time on a warm worker, each twice in the order direct,
   runner, runner, direct (so a load that drifts over the run cancels out), this process at the
   niceness Ray gives its workers (15) so both get the same share of a shared CPU; (runner - direct) /
   trials. Also the runner's time around the trials: (wall - the trials' compute) / trials, which
   machine load does not blur. A cold worker's start-up (process start, torch/transformers imports) is
   paid once per worker, not per trial: printed apart.
3. idle time: a grid whose first source trains on `--slow-factor` times more examples, run once in
   dependency waves (every source and baseline, then every transfer: the old runner's barrier) and once
   with each transfer released as soon as its own source is stored. Worker-idle seconds = slots x wall
   - the trials' compute.
4. processes per run: a fresh run of the staged grid with its own workers, as `transferlab run` makes
   it: warm workers started and distinct Tune trial processes (Tune reuses its trial actors; at a
   dependency frontier it may end one, and its replacement costs a Ray/Tune process, not torch).

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

from analysis.store.results import ResultStore  # noqa: E402
from rayjobs.config import PairwiseConfig, RunSpec, load_config  # noqa: E402
from rayjobs.engine.runner import QUIET, StageResult, init_ray, run_trials  # noqa: E402
from rayjobs.engine.tuning import WorkerPool  # noqa: E402
from rayjobs.plan import TrialSpec, expand_pairwise, run_key  # noqa: E402
from rayjobs.tasks.registry import TaskRegistry  # noqa: E402

SLOTS = 2  # trials at a time


def bench_config(args: argparse.Namespace) -> PairwiseConfig:
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
        "run": cfg.run.model_copy(update={"verbose": 0, "max_concurrent_trials": SLOTS}),
    })


def staged_trials(cfg: PairwiseConfig, results: Path) -> list[TrialSpec]:
    return expand_pairwise(cfg, TaskRegistry.load(cfg.task_files, cfg.data_root), str(results))


def naive_trials(cfg: PairwiseConfig, results: Path) -> list[TrialSpec]:
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


def slow_source_trials(cfg: PairwiseConfig, results: Path, factor: float) -> list[TrialSpec]:
    """The staged grid with the first source trained on `factor` times more examples (trial lengths differ)."""
    trials = staged_trials(cfg, results)
    slow = next(t for t in trials if t.kind == "source")
    n = int((slow.n_train or 0) * factor)
    key = run_key({"slow_source": slow.run_key, "n_train": n})
    return [t.model_copy(update={"n_train": n, "run_key": key}) if t is slow else
            t.model_copy(update={"source_run_key": key}) if t.source_run_key == slow.run_key else t for t in trials]


def waves(trials: list[TrialSpec]) -> list[list[TrialSpec]]:
    """The trials in dependency waves: a wave starts when every trial of the one before is done."""
    keys = {t.run_key for t in trials}
    done: set[str] = set()
    out, left = [], list(trials)
    while left:
        wave = [t for t in left if all(d in done or d not in keys for d in t.depends_on)]
        out.append(wave)
        done |= {t.run_key for t in wave}
        left = [t for t in left if t.run_key not in done]
    return out


def run_all(name: str, trials: list[TrialSpec], run: RunSpec, results: Path, pool: WorkerPool | None,
            barrier: bool = False) -> list[StageResult]:
    """The trials through the runner on the warm pool: in one run (early release) or one run per wave."""
    store = ResultStore(results)
    parts = waves(trials) if barrier else [trials]
    out = [run_trials(f"{name}-{i + 1}" if barrier else name, part, run, store, pool=pool)
           for i, part in enumerate(parts)]
    failed = [k for r in out for k in r.failed]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} trials failed; see {results}")
    return out


def run_direct(trials: list[TrialSpec]) -> int:
    """The same trials without Ray: `rayjobs.engine.trial.execute` in this process, one torch thread."""
    import torch

    from rayjobs.engine.trial import execute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what Ray gives a 1-CPU worker (OMP_NUM_THREADS=1)
    try:
        for t in trials:
            execute(t)
    finally:
        torch.set_num_threads(threads)
    return len(trials)


def worker_niceness() -> int:
    """The niceness of this Ray's worker processes."""
    import ray

    return int(ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compute_s(results: list[StageResult]) -> float:
    """The trials' compute: each one's time in `trial.execute`, measured by its worker."""
    return sum(r.busy_s for res in results for r in res.records if r.status == "ok")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"),
                   help="model and tasks come from its first setup and first 3 tasks")
    p.add_argument("--source-train", type=int, default=96)
    p.add_argument("--target-train", type=int, default=32)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--slow-factor", type=float, default=8,
                   help="the idle-time grid's first source trains on this many times more examples")
    p.add_argument("--workdir", help="keep results here instead of a temporary folder")
    args = p.parse_args(argv)

    cfg = bench_config(args)
    setup = cfg.setups[0]
    model = setup.model.path or f"tiny {setup.model.config.get('model_type')} from config"  # type: ignore[union-attr]
    print(f"model: {setup.model.name} ({model}), adaptation {setup.adaptation.method}, "
          f"max_length {setup.model.max_length}; tasks {cfg.tasks.sources}; seed {cfg.seeds[0]}")
    print(f"sizes: source {args.source_train}, target {args.target_train}, eval {args.eval} examples, "
          f"{args.epochs:g} epoch(s), batch {setup.train.batch_size}; {SLOTS} trials of 1 CPU at a time; "
          f"cpus on this machine: {os.cpu_count()}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-pairwise-", dir=args.workdir) as tmp:
        root = Path(tmp)
        for k, v in QUIET.items():  # model-loading chatter, here and in the local Ray's workers
            os.environ.setdefault(k, v)
        ray_start, _ = timed(lambda: init_ray(cfg.run))
        # Ray runs its workers at niceness 15 (its raylet and GCS keep priority); this process runs the
        # direct arm, so it takes the same share of a shared CPU (after Ray's own processes started)
        os.nice(max(0, worker_niceness() - os.nice(0)))
        parallel, serial = cfg.run, cfg.run.model_copy(update={"max_concurrent_trials": 1})
        pool = WorkerPool()
        try:
            # Two untimed trials start the two warm workers (process start, imports, file caches).
            warm = [t for t in staged_trials(cfg, root / "warmup") if t.kind == "target"][:SLOTS]
            t_warm, _ = timed(lambda: run_all("warmup", warm, parallel, root / "warmup", pool))

            staged = staged_trials(cfg, root / "staged")
            t_staged, r_staged = timed(lambda: run_all("staged", staged, parallel, root / "staged", pool))
            naive = naive_trials(cfg, root / "naive")
            t_naive, r_naive = timed(lambda: run_all("naive", naive, parallel, root / "naive", pool))

            def stage1(results: Path) -> list[TrialSpec]:
                return [t for t in staged_trials(cfg, results) if t.kind != "transfer"]

            # this process's first model build pays lazy imports too: one untimed trial first
            t_warm_direct, _ = timed(lambda: run_direct(stage1(root / "warmup-direct")[:1]))
            t_direct, n_direct = timed(lambda: run_direct(stage1(root / "direct-a")))
            t_serial, r_serial = timed(lambda: run_all("serial-a", stage1(root / "serial-a"), serial,
                                                       root / "serial-a", pool))
            t, r = timed(lambda: run_all("serial-b", stage1(root / "serial-b"), serial, root / "serial-b", pool))
            t_serial, r_serial = t_serial + t, r_serial + r
            t, _ = timed(lambda: run_direct(stage1(root / "direct-b")))
            t_direct, n_direct = t_direct + t, 2 * n_direct

            slow = slow_source_trials(cfg, root / "waves", args.slow_factor)
            t_waves, r_waves = timed(lambda: run_all("waves", slow, parallel, root / "waves", pool, barrier=True))
            slow = slow_source_trials(cfg, root / "early", args.slow_factor)
            t_early, r_early = timed(lambda: run_all("early", slow, parallel, root / "early", pool))
            cold_starts = list(pool.figures()["start_s"])
        finally:
            pool.close()
        # a run as `transferlab run` makes it: its own warm workers, one Tuner
        t_fresh, r_fresh = timed(lambda: run_all("fresh", staged_trials(cfg, root / "fresh"), parallel,
                                                 root / "fresh", None))

    c_staged, c_naive = compute_s(r_staged), compute_s(r_naive)
    rows = [
        ("staged plan (transferlab)", len(staged), t_staged, c_staged),
        ("naive plan (source retrained per pair)", len(naive), t_naive, c_naive),
        ("stage 1 twice, direct trial.execute, serial", n_direct, t_direct, None),
        ("stage 1 twice, runner on a warm worker, 1 at a time", n_direct, t_serial, compute_s(r_serial)),
        ("slow-source grid, waves (barrier after stage 1)", len(slow), t_waves, compute_s(r_waves)),
        ("slow-source grid, transfers released early", len(slow), t_early, compute_s(r_early)),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'arm':<{w}}  trainings  wall s  compute s")
    for name, n, t, c in rows:
        print(f"{name:<{w}}  {n:9d}  {t:6.1f}  {'' if c is None else f'{c:9.1f}'}")
    wall_ratio, compute_ratio = t_naive / t_staged, c_naive / c_staged
    print(f"\nnaive / staged wall time:     {wall_ratio:5.2f}x ({len(naive)} vs {len(staged)} trainings); "
          f"compute ratio {compute_ratio:5.2f}x; wall ratio / compute ratio {wall_ratio / compute_ratio:5.3f}")
    handoff = [r.finished_s - r.started_s - r.busy_s for res in r_serial for r in res.records]
    print(f"per-trial overhead:           {(t_serial - t_direct) / n_direct:5.2f} s "
          f"(({t_serial:.1f} - {t_direct:.1f}) / {n_direct}, warm worker); around the trials "
          f"{(t_serial - compute_s(r_serial)) / n_direct:.2f} s (run start, hand-over "
          f"{sum(handoff) / len(handoff):.3f} s, final ingest)")
    idle_waves = SLOTS * t_waves - compute_s(r_waves)
    idle_early = SLOTS * t_early - compute_s(r_early)
    print(f"worker-idle time, slow-source grid ({args.slow_factor:g}x first source): waves {idle_waves:.1f} s, "
          f"early release {idle_early:.1f} s: {idle_waves - idle_early:.1f} s saved "
          f"(wall {t_waves:.1f} -> {t_early:.1f} s)")
    fresh = r_fresh[0]
    tune_procs = len({r.tune_pid for r in fresh.records if r.tune_pid})
    print(f"processes per run (fresh run of the staged grid, {len(fresh.records)} trials, {SLOTS} slots): "
          f"{fresh.workers.get('started', 0)} warm workers started, {tune_procs} Tune trial processes "
          f"(wall {t_fresh:.1f} s, cold starts included)")
    print(f"this process and the workers ran at niceness {os.nice(0)}")
    print(f"not in the arms: local Ray start-up {ray_start:.1f} s, warm-up ({len(warm)} trials) {t_warm:.1f} s "
          f"including {len(cold_starts)} cold worker starts of {sum(cold_starts) / max(1, len(cold_starts)):.1f} s "
          f"each (once per worker), untimed first direct trial {t_warm_direct:.1f} s")
    print("wall-clock times on a shared machine are noisy: compare the ratios of one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
