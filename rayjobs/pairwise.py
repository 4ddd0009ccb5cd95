"""Pairwise (intermediate-task) transfer job.

    python -m rayjobs.pairwise --config configs/quickstart.yaml [--results DIR] [--smoke]
    ray job submit --working-dir . -- python -m rayjobs.pairwise --config configs/quickstart.yaml

Stage 1 trains one source model per (setup, source, seed) and one target-only baseline per
(setup, target, seed); stage 2 fine-tunes every source checkpoint on every target. Runs already in
the results folder are skipped, so re-submitting the same config resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.store import ResultStore
from rayjobs.config import ExperimentConfig, load_config
from rayjobs.plan import TrialSpec, expand_pairwise
from rayjobs.preflight import check_setups
from rayjobs.runner import finish, run_stage
from rayjobs.smoke import smoke_variant
from rayjobs.tasks import TaskRegistry


def plan(cfg: ExperimentConfig, results_dir: str) -> tuple[ResultStore, list[TrialSpec]]:
    """Validate everything that can be validated before Ray starts; return the store and all trials."""
    store = ResultStore(results_dir)
    store.ensure_writable()
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    check_setups(cfg, registry)
    return store, expand_pairwise(cfg, registry, str(store.root))


def transfer_matrix_lines(store: ResultStore, cfg: ExperimentConfig) -> list[str]:
    setups = [s.key for s in cfg.setups]
    with store.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT setup, source, target, score, n_seeds FROM transfer_scores "
            "WHERE provenance = 'local' AND list_contains($setups, setup)", {"setups": setups}).fetchall()
    lines = []
    for setup in setups:
        cells = {(s, t): (sc, n) for su, s, t, sc, n in rows if su == setup}
        if not cells:
            continue
        srcs = [s for s in cfg.tasks.sources if any(k[0] == s for k in cells)]
        tgts = [t for t in cfg.tasks.target_list if any(k[1] == t for k in cells)]
        w = max(len(x) for x in srcs + tgts + ["source \\ target"]) + 1
        lines.append(f"Transfer scores for {setup} (0.5*PC + 0.5*(0.2*PM - 0.1), rows = source):")
        lines.append("source \\ target".ljust(w) + "".join(t.rjust(w) for t in tgts))
        for s in srcs:
            vals = [f"{cells[(s, t)][0]:+.3f}" if (s, t) in cells else "-" for t in tgts]
            lines.append(s.ljust(w) + "".join(v.rjust(w) for v in vals))
    return lines


def run(cfg: ExperimentConfig, results_dir: str) -> int:
    store, trials = plan(cfg, results_dir)
    store.ingest()
    done = store.finished_keys()
    todo = [t for t in trials if t.run_key not in done]
    print(f"transferlab: experiment {cfg.name!r}: {len(trials)} runs, {len(trials) - len(todo)} already stored, "
          f"{len(todo)} to run; results in {store.root}", flush=True)
    storage = store.root / "tune"
    failed: list[str] = []
    if todo:
        stage1 = [t for t in todo if t.kind in ("source", "target")]
        r1 = run_stage(f"{cfg.name}-sources-baselines", stage1, cfg.run, storage)
        failed += r1.failed
        store.ingest()
        done = store.finished_keys()
        ready = [t for t in todo if t.kind == "transfer" and t.source_run_key in done]
        blocked = [t for t in todo if t.kind == "transfer" and t.source_run_key not in done]
        if blocked:
            print(f"transferlab: {len(blocked)} transfers wait for failed source runs; re-run to retry", flush=True)
        r2 = run_stage(f"{cfg.name}-transfers", ready, cfg.run, storage)
        failed += r2.failed
        store.ingest()
    for line in transfer_matrix_lines(store, cfg):
        print(line)
    return finish(store, trials, "transfer_scores")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayjobs.pairwise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--results", help="results folder (overrides the config's results_dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one seed, tiny models for hub ids")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.smoke:
        cfg = smoke_variant(cfg)
    results_dir = args.results or cfg.results_dir
    return run(cfg, str(Path(results_dir)))


if __name__ == "__main__":
    from rayjobs.cli import guarded

    sys.exit(guarded(main))
