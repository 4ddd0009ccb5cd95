"""Pairwise (intermediate-task) transfer job.

    transferlab run configs/quickstart.yaml [--results DIR] [--smoke] [KEY=VALUE ...]
    ray job submit --working-dir . -- python -m rayjobs.pairwise --config configs/quickstart.yaml

Stage 1 trains one source model per (setup, source, seed) and one target-only baseline per
(setup, target, seed); each transfer fine-tunes its source checkpoint on its target as soon as that
checkpoint is stored. Runs already in the results folder are skipped, so re-submitting the same config
resumes it.
"""

from __future__ import annotations

from analysis.store.results import ResultStore
from rayjobs.config import PairwiseConfig
from rayjobs.engine.budget import budget_gate
from rayjobs.engine.driver import module_entry
from rayjobs.engine.preflight import check_setups
from rayjobs.engine.smoke import smoke_setup, smoke_tasks
from rayjobs.job import Job, Plan
from rayjobs.plan import TrialSpec, expand_pairwise
from rayjobs.tasks.registry import TaskRegistry


def plan(cfg: PairwiseConfig, results_dir: str) -> tuple[ResultStore, list[TrialSpec]]:
    """Validate everything that can be validated before Ray starts; return the store and all trials."""
    store = ResultStore(results_dir)
    store.ensure_writable()
    return store, PairwiseJob().plan(cfg, store).trials


def transfer_matrix_lines(store: ResultStore, cfg: PairwiseConfig) -> list[str]:
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


# -- --smoke: the config shrunk to run end to end on a laptop CPU in minutes ------------------------------
def smoke(cfg: PairwiseConfig) -> PairwiseConfig:
    """One seed (one source and one target seed where the stages have their own), tiny sizes, <= 3 tasks."""
    sizes = cfg.sizes.model_copy(update={"source_train": 24, "target_train": 24, "eval": 24})
    seeds = cfg.seeds[:1] if isinstance(cfg.seeds, list) else \
        cfg.seeds.model_copy(update={"source": cfg.seeds.source[:1], "target": cfg.seeds.target[:1]})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": seeds, "sizes": sizes,
                                  "tasks": smoke_tasks(cfg), "setups": [smoke_setup(s) for s in cfg.setups]})


class PairwiseJob(Job, kind="pairwise", config=PairwiseConfig):
    def plan(self, cfg: PairwiseConfig, store: ResultStore) -> Plan:
        registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
        check_setups(cfg, registry)
        trials = expand_pairwise(cfg, registry, str(store.root))
        gate = budget_gate(cfg, trials, store)
        summary = (f"{len(trials)} runs in the full grid, a budget of {cfg.budget.budget_runs(len(trials))} "
                   f"({cfg.budget.policy})") if gate is not None else ""
        return Plan(trials, summary=summary, view="transfer_scores", gate=gate)

    def report(self, cfg: PairwiseConfig, store: ResultStore) -> list[str]:
        return transfer_matrix_lines(store, cfg)


JOB = PairwiseJob()
main = module_entry(JOB.kind, __name__)
