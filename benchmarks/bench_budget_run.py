"""A real budgeted grid next to the exhaustive one (issue 19, point 4): trained runs, not a replay.

    .venv/bin/python benchmarks/bench_budget_run.py [--tasks scitail,cb,qqp,snli,mrpc,anli_r3]
        [--seeds 10] [--fraction 0.5] [--policy prior-topk] [--priors roe] [--out DIR] [--tiny]

Both grids are the same pairwise config (MiniLM, full fine-tuning, the given tasks of ../shared/data
as sources and targets, two 1-CPU trials at a time), run by `transferlab run` in a fresh results
folder each: once exhaustive (every source, baseline and transfer), once with a `budget:` block
(`--fraction` of the exhaustive grid's runs, baselines and sources counted). The priors are stored
selectors computed first in the budgeted store without training anything (`roe`: RoE over TaskWeb's
32 prompted examples per task with the bundled MiniLM; their time is printed apart). The budgeted
store then gets `transferlab predict-transfers` (the pairs never trained are predicted), and its
ranking of each target's sources is scored against the exhaustive grid's, with TaskWeb's NDCG and
Regret@k (k = 1 by default: each target has only n-1 candidate sources). Next to it, on the
exhaustive grid without training: the priors alone, and random pairs at the same budget with the
same completion (mean over 30 draws). The same policy replayed on the exhaustive grid
(`analysis.budget.evaluate.run_episode`) shows whether the real run chose the runs the replay
would (it does when training is deterministic, so replay figures transfer to real runs).

The gold here is one exhaustive grid on the same seeds (the replay on TaskWeb's release scores
against held-out seeds; with one seed that is not possible), so this measures which pairs the budget
trains and how well the rest is completed, not seed noise. `--tiny` swaps MiniLM for a 1-layer model
built from a config (seconds per trial: a check of the pipeline, its ranking is noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.budget import metrics as M  # noqa: E402
from analysis.budget.evaluate import run_episode  # noqa: E402
from analysis.budget.predictor import TransferPredictor, _standardise  # noqa: E402
from analysis.budget.replay import Grid, full_grid_cost, load_grid, released_setups  # noqa: E402

MINILM = """  - model: {{name: minilm, path: "builtin:minilm", family: encoder, max_length: 64}}
    adaptation: {{method: full}}
    source_train: {{epochs: 1, learning_rate: 2.0e-4, batch_size: 8, warmup_ratio: 0.1}}
    train: {{epochs: 2, learning_rate: 2.0e-4, batch_size: 8, warmup_ratio: 0.1}}
    resources: {{cpu: 1}}
"""
TINY = """  - model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 1, batch_size: 8}}
    resources: {{cpu: 1}}
"""
CONFIG = """job: pairwise
name: {name}
data_root: {data}
tasks: {{sources: [{tasks}], targets: null}}
seeds: [{seeds}]
sizes: {{source_train: {src}, target_train: {tgt}, eval: {eval}}}
setups:
{setup}{budget}"""


def write_config(path: Path, args: argparse.Namespace, budget: str = "") -> Path:
    setup = TINY if args.tiny else MINILM
    sizes = (16, 16, 16) if args.tiny else (args.source_train, args.target_train, args.eval)
    path.write_text(CONFIG.format(name=path.stem, data=args.data, tasks=", ".join(args.tasks),
                                  seeds=", ".join(map(str, args.seeds)), src=sizes[0], tgt=sizes[1],
                                  eval=sizes[2], setup=setup.format(), budget=budget))
    return path


def transferlab(*argv: str) -> tuple[float, str]:
    """One `transferlab` command in its own process (as a user runs it); its wall time and stdout."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rayjobs.cli", *argv], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        sys.exit(f"`transferlab {' '.join(argv)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def run_counts(db: Path) -> dict[str, int]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT kind, count(*) FROM runs WHERE status = 'ok' GROUP BY 1").fetchall()
    return {k: int(n) for k, n in rows}


def predicted(db: Path, setup: str, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(S, T) predicted mean and observed flag of the budgeted store, in the exhaustive grid's order."""
    si = {s: i for i, s in enumerate(grid.sources)}
    ti = {t: i for i, t in enumerate(grid.targets)}
    mean = np.full((len(si), len(ti)), np.nan)
    obs = np.zeros(mean.shape, bool)
    with duckdb.connect(str(db), read_only=True) as con:
        for s, t, o, m in con.execute("SELECT source, target, observed, mean FROM predicted_transfer_scores "
                                      "WHERE setup = ?", [setup]).fetchall():
            mean[si[s], ti[t]], obs[si[s], ti[t]] = m, o
    return mean, obs


def stored_priors(db: Path, names: list[str], grid: Grid) -> dict[str, np.ndarray]:
    """{selector: (S, T) score} from a store's selector_scores, in the grid's order (NaN: none)."""
    si = {s: i for i, s in enumerate(grid.sources)}
    ti = {t: i for i, t in enumerate(grid.targets)}
    out = {n: np.full((len(si), len(ti)), np.nan) for n in names}
    with duckdb.connect(str(db), read_only=True) as con:
        for n, s, t, v in con.execute("SELECT selector, source, target, score FROM selector_scores "
                                      "WHERE list_contains($n, selector)", {"n": names}).fetchall():
            if s in si and t in ti:
                out[n][si[s], ti[t]] = v
    return out


def random_completion(grid: Grid, n_transfers: int, draws: int = 30, seed: int = 0) -> np.ndarray:
    """NDCG-ready predictions of `draws` random pair subsets of n_transfers pairs (one seed each, the
    first), each completed by the same predictor as the budgeted run's (no priors)."""
    rng = np.random.default_rng(seed)
    z = grid.z()[:, :, 0]
    pairs = np.argwhere(grid.pairs)
    out = []
    for _ in range(draws):
        pick = pairs[rng.choice(len(pairs), size=min(n_transfers, len(pairs)), replace=False)]
        m = np.zeros(grid.pairs.shape, bool)
        m[pick[:, 0], pick[:, 1]] = True
        zz = np.where(m, z, 0.0)
        post = TransferPredictor(grid.pairs, {}).fit(zz, m.astype(int), zz ** 2)
        out.append(post.mean)
    return np.stack(out)


def run_both(args: argparse.Namespace, priors: list[str], full_db: Path, bud_db: Path) -> tuple[float, float, float]:
    """The priors, then the exhaustive and the budgeted grid, each fresh: their wall times."""
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty: each grid must start from a fresh results folder (remove it)")
    args.out.mkdir(parents=True, exist_ok=True)
    budget = f"budget: {{runs: {args.fraction}, policy: {args.policy}, priors: [{', '.join(priors)}]}}\n"
    full_cfg = write_config(args.out / "exhaustive.yaml", args)
    bud_cfg = write_config(args.out / "budgeted.yaml", args, budget)
    t_prior = 0.0
    bud_db.parent.mkdir(parents=True)
    for p in priors:
        dt, _ = transferlab("compute-selector", p, "--db", str(bud_db), "--tasks", ",".join(args.tasks), "--name", p)
        t_prior += dt
        print(f"prior {p}: {dt:.1f} s", flush=True)
    print(f"exhaustive grid: transferlab run {full_cfg.name} ...", flush=True)
    w_full, _ = transferlab("run", str(full_cfg), "--results", str(full_db.parent))
    print(f"  {w_full:.1f} s", flush=True)
    print(f"budgeted grid: transferlab run {bud_cfg.name} ...", flush=True)
    w_bud, out = transferlab("run", str(bud_cfg), "--results", str(bud_db.parent))
    print(f"  {w_bud:.1f} s; " + next((ln.strip() for ln in out.splitlines() if "budget:" in ln), ""), flush=True)
    (args.out / "summary.json").write_text(json.dumps({"wall_s": {"exhaustive": w_full, "budgeted": w_bud,
                                                                  "priors": t_prior}}))
    return w_full, w_bud, t_prior


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=lambda s: s.split(","), default="scitail,cb,qqp,snli,mrpc,anli_r3".split(","))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[10])
    ap.add_argument("--fraction", type=float, default=0.5, help="budget: share of the exhaustive grid's runs")
    ap.add_argument("--policy", default="prior-topk", help="racing | prior-topk | active | random")
    ap.add_argument("--priors", default="roe", help="stored selectors computed before the run ('' for none)")
    ap.add_argument("--source-train", type=int, default=400)
    ap.add_argument("--target-train", type=int, default=200)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--regret-k", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_budget_run")
    ap.add_argument("--data", default=os.environ.get("TRANSFERLAB_DATA") or str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model from a config: a pipeline check")
    ap.add_argument("--score-only", action="store_true", help="score the stores already in --out (no training)")
    args = ap.parse_args()
    if not Path(args.data, "tasks").is_dir():
        print(f"skipped: no task data under {args.data}")
        return 0
    priors = [p for p in args.priors.split(",") if p]
    full_db, bud_db = args.out / "exhaustive" / "transferlab.duckdb", args.out / "budgeted" / "transferlab.duckdb"
    if args.score_only:  # re-score the stores of an earlier run (its wall times are in its summary.json)
        walls = json.loads((args.out / "summary.json").read_text())["wall_s"]
        w_full, w_bud, t_prior = walls["exhaustive"], walls["budgeted"], walls["priors"]
    else:
        w_full, w_bud, t_prior = run_both(args, priors, full_db, bud_db)

    with duckdb.connect(str(full_db), read_only=True) as con:
        (setup,) = released_setups(con)
        grid = load_grid(con, setup, priors=[])
    grid.priors = stored_priors(bud_db, priors, grid)  # computed in the budgeted store, without training
    transferlab("predict-transfers", "--setup", setup, "--db", str(bud_db), "--tasks", ",".join(args.tasks),
                *(["--priors", ",".join(priors)] if priors else []))
    pred, observed = predicted(bud_db, setup, grid)

    valid = grid.pairs
    gold = grid.score(np.ones(len(grid.seeds), bool))[2]
    perf = grid.perf(np.ones(len(grid.seeds), bool))
    k = args.regret_k
    n_full, n_bud = run_counts(full_db), run_counts(bud_db)
    cost = full_grid_cost(grid)

    def scores(p: np.ndarray) -> tuple[float, float]:
        return float(M.ndcg(p, gold, valid).mean()), float(M.regret(p, gold, perf, valid, k).mean())

    rows: list[tuple[str, float, tuple[float, float]]] = [("exhaustive grid (the gold)", 1.0, scores(gold)),
                                                         (f"budgeted run ({args.policy})", sum(n_bud.values()) / cost.total,
                                                          scores(pred))]
    if priors:
        rows.append((f"priors alone ({'+'.join(priors)})", 0.0,
                     scores(np.mean([_standardise(grid.priors[p], valid) for p in priors], 0))))
    rnd = random_completion(grid, int(n_bud.get("transfer", 0)))
    nd = [scores(r) for r in rnd]
    rows.append(("random pairs + completion (30 draws)", sum(n_bud.values()) / cost.total,
                 (float(np.mean([a for a, _ in nd])), float(np.mean([b for _, b in nd])))))
    pol, rep = run_episode(grid, args.policy, grid.seeds, int(sum(n_bud.values())), prior=priors or None)
    rows.append((f"{args.policy} replayed on the exhaustive grid", rep.cost.total / cost.total,
                 scores(pol.posterior().mean)))
    with duckdb.connect(str(bud_db), read_only=True) as con:
        real = {(s, t, int(kk)) for s, t, kk in con.execute(
            "SELECT source, target, seed FROM runs WHERE kind = 'transfer' AND status = 'ok'").fetchall()}

    print(f"\nsetup {setup}: {len(grid.sources)} tasks, seeds {grid.seeds}; full grid {cost.total} runs "
          f"({cost.transfers} transfers, {cost.baselines} baselines, {cost.sources} sources)")
    print(f"{'method':44s} {'runs':>6s} {'NDCG':>7s} {f'Regret@{k}':>10s}")
    for name, frac, (nd_, rg) in rows:
        print(f"{name:44s} {100 * frac:5.1f}% {100 * nd_:7.2f} {100 * rg:10.2f}")
    def best(x: np.ndarray, j: int) -> int:
        return int(np.argmax(np.where(valid[:, j], np.nan_to_num(x[:, j], nan=-np.inf), -np.inf)))

    top1 = sum(best(pred, j) == best(gold, j) for j in range(len(grid.targets)))
    same = real == set(rep.done)
    summary = {"setup": setup, "runs": {"exhaustive": n_full, "budgeted": n_bud}, "wall_s":
               {"exhaustive": w_full, "budgeted": w_bud, "priors": t_prior}, "trained_pairs": sorted(real),
               "replay_chose_the_same_runs": same}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=list))
    print(f"replay chose the same transfer runs as the real run: {same} ({len(real)} real, {len(rep.done)} replayed)")
    print(f"top-1 source agreement with the exhaustive grid: {top1} of {len(grid.targets)} targets "
          f"({int(observed.sum())} of {int(valid.sum())} pairs trained)")
    print(f"runs: exhaustive {sum(n_full.values())}, budgeted {sum(n_bud.values())} "
          f"({100 * sum(n_bud.values()) / sum(n_full.values()):.1f}%)")
    print(f"wall: exhaustive {w_full:.1f} s, budgeted {w_bud:.1f} s + priors {t_prior:.1f} s "
          f"(saved {100 * (1 - (w_bud + t_prior) / w_full):.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
