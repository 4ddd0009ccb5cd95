"""Timings of the vectorised analyses against plain-Python loop implementations of the same formulas
(`loop_reference`), in the same run, on the published TaskWeb release and on a synthetic
larger web.

    .venv/bin/python benchmarks/bench_analysis.py [--data ../shared/data] [--tasks 60] [--repeat 3]

Both sides compute the same numbers (asserted); the ratio is loop time / vectorised time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import loop_reference as ref  # noqa: E402

from analysis import transfer as an  # noqa: E402
from analysis.importers.taskweb import import_taskweb  # noqa: E402
from analysis.ranking.evaluate import evaluate_selection  # noqa: E402
from analysis.selection import selectors as sel  # noqa: E402
from analysis.store.duck import open_store, registered  # noqa: E402
from analysis.store.results import ResultStore  # noqa: E402

THRESHOLDS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Median wall time over `repeat` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def row(name: str, vec: float, loop: float) -> None:
    print(f"  {name:<52} vectorised {vec:8.3f} s   loops {loop:8.3f} s   loops/vectorised {loop / vec:7.1f}x")


def bench_taskweb(data: Path, repeat: int, workdir: Path) -> None:
    tw = data / "taskweb"
    print(f"TaskWeb release ({tw})")
    db = workdir / "tw.duckdb"

    def vec_import() -> None:
        db.unlink(missing_ok=True)
        with open_store(db, create=True) as con:
            import_taskweb(con, tw)

    def loop_import() -> tuple:
        """Parse and score row by row, then INSERT row by row (the plain DB-API way)."""
        setups = ref.load_transfer_csv(tw / "transfer_scores.csv")
        runs = ref.load_runs_csv(tw / "runs.csv")
        roe = ref.load_pairs_csv(tw / "roe_scores_minilm_dot32.csv")
        loop_db = workdir / "loop.duckdb"
        loop_db.unlink(missing_ok=True)
        con = duckdb.connect(str(loop_db))
        try:
            con.execute("CREATE TABLE runs (setup VARCHAR, source VARCHAR, target VARCHAR, epochs INT, lr DOUBLE, "
                        "batch_size INT, seed INT, score DOUBLE)")
            con.execute("CREATE TABLE scores (setup VARCHAR, source VARCHAR, target VARCHAR, score DOUBLE)")
            con.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(*key, i, p) for key, ps in runs.items() for i, p in enumerate(ps)])
            con.executemany("INSERT INTO scores VALUES (?, ?, ?, ?)",
                            [(su, s, t, v) for su, sc in setups.items() for (s, t), v in sc.items()])
        finally:
            con.close()
        return setups, runs, roe

    tv, _ = timed(vec_import, repeat)
    tl, (setups, runs, roe) = timed(loop_import)
    row("import 31,936 runs + 3,528 scores + selectors", tv, tl)
    print("    (both parse, score and write to DuckDB: Arrow columns vs row-by-row executemany)")

    setups["mean"] = ref.mean_setup(setups)
    names = [s for s in setups if s != "all:all"]
    with open_store(db) as con:
        tv, got = timed(lambda: an.transitivity(con, THRESHOLDS), repeat)
        tl, want = timed(lambda: {s: ref.transitivity(setups[s], THRESHOLDS) for s in names})
        for s in names:
            g = got[got.setup == s].sort_values("threshold")
            assert list(zip(g.threshold, g.n_triples, g.n_positive, strict=True)) == want[s]
        row(f"transitivity: {len(names)} setups x {len(THRESHOLDS)} thresholds", tv, tl)

        tv, got = timed(lambda: dict(an.commutativity_counts(con)[["setup", "n_commutative"]].itertuples(index=False)),
                        repeat)
        tl, want = timed(lambda: {s: ref.commutativity(setups[s])[1] for s in names})
        assert got == want
        row(f"commutativity: {len(names)} setups", tv, tl)

        T = setups["finetune:t5l"]
        perf = ref.target_performance(runs, "finetune:t5l", {"copa": (5, 1e-4, 8)})
        TARGETS = sorted({t for _, t in T})

        def vec_eval() -> dict:
            return evaluate_selection(con, "taskshop-roe", "finetune:t5l", lam=0.7, targets=TARGETS)

        def loop_eval() -> dict:
            ts = {(s, t): ref.taskshop(T, roe, s, t, 0.7) for (s, t) in roe if (s, t) in T}
            return ref.evaluate(T, ts, perf, TARGETS)

        tv, got = timed(vec_eval, repeat)
        tl, want = timed(loop_eval)
        for t in TARGETS:
            assert abs(got["by_target"][t]["ndcg"] - want[t][0]) < 1e-12
        row(f"TaskShop-RoE (t5l) + NDCG/Regret@5, {len(TARGETS)} targets", tv, tl)


def synthetic_runs(n_tasks: int, n_setups: int, n_seeds: int, seed: int = 0) -> tuple[pa.Table, ref.Scores]:
    """Run rows shaped like the pairwise job's (sources, target baselines, seed-paired transfers) + an F."""
    rng = np.random.default_rng(seed)
    tasks = [f"task{i:03d}" for i in range(n_tasks)]
    cols: dict[str, list] = {c: [] for c in ("run_key", "kind", "setup", "model", "adaptation", "source", "target",
                                              "seed", "score", "baseline_run_key", "status")}

    def add(key: str, kind: str, setup: str, src: str | None, tgt: str | None, sd: int, score: float,
            base: str | None) -> None:
        for c, v in zip(cols, (key, kind, setup, setup.split(":")[1], "ft", src, tgt, sd, score, base, "ok"),
                        strict=True):
            cols[c].append(v)

    for j in range(n_setups):
        setup = f"ft:m{j}"
        skill = rng.normal(0.0, 0.03, size=(n_tasks, n_tasks))
        for sd in range(n_seeds):
            base = rng.uniform(0.5, 0.9, size=n_tasks)
            for ti, t in enumerate(tasks):
                add(f"{setup}-b-{t}-{sd}", "target", setup, None, t, sd, float(base[ti]), None)
            p = base[None, :] * (1 + skill + rng.normal(0.0, 0.02, size=(n_tasks, n_tasks)))
            for si, s in enumerate(tasks):
                for ti, t in enumerate(tasks):
                    if si != ti:
                        add(f"{setup}-x-{s}-{t}-{sd}", "transfer", setup, s, t, sd, float(p[si, ti]),
                            f"{setup}-b-{t}-{sd}")
    F = {(s, t): float(rng.uniform(0.2, 0.6)) for s in tasks for t in tasks if s != t}
    return pa.table(cols), F


def loop_transfer_scores(runs: pa.Table) -> tuple[dict[str, ref.Scores], dict[tuple[str, str], float]]:
    """PC / PM per (setup, source, target) from seed-paired rows, and mean transfer p (setup 0)."""
    d = runs.to_pydict()
    base = {d["run_key"][i]: d["score"][i] for i in range(runs.num_rows) if d["kind"][i] == "target"}
    acc: dict[tuple, list[tuple[float, float]]] = {}
    perf: dict[tuple[str, str], list[float]] = {}
    for i in range(runs.num_rows):
        if d["kind"][i] != "transfer":
            continue
        b = base[d["baseline_run_key"][i]]
        x = d["score"][i]
        acc.setdefault((d["setup"][i], d["source"][i], d["target"][i]), []).append(((x - b) / b, 1.0 if x > b else 0.0))
        if d["setup"][i] == "ft:m0":
            perf.setdefault((d["source"][i], d["target"][i]), []).append(x)
    out: dict[str, ref.Scores] = {}
    for (setup, s, t), v in acc.items():
        pc = sum(a for a, _ in v) / len(v)
        pm = sum(b for _, b in v) / len(v)
        out.setdefault(setup, {})[(s, t)] = ref.combined(pc, pm)
    return out, {k: sum(v) / len(v) for k, v in perf.items()}


def bench_synthetic(n_tasks: int, n_setups: int, n_seeds: int, repeat: int, workdir: Path) -> None:
    runs, F = synthetic_runs(n_tasks, n_setups, n_seeds)
    print(f"Synthetic web from runs: {n_tasks} tasks x {n_setups} setups x {n_seeds} seeds = "
          f"{runs.num_rows:,} runs (seed-paired transfers + target baselines)")
    db = workdir / "syn.duckdb"
    store = ResultStore(workdir, db_path=db)
    with open_store(db, create=True) as con:
        def vec_ingest() -> None:
            with registered(con, "_syn", runs):
                con.execute("DELETE FROM runs")
                con.execute(f"INSERT INTO runs ({', '.join(runs.column_names)}) SELECT * FROM _syn")

        tv, _ = timed(vec_ingest, 1)
        print(f"  {'ingest the runs (Arrow -> DuckDB)':<52} vectorised {tv:8.3f} s")
        sel.store_scores(con, "f", "synthetic", {}, pa.table({"source": [k[0] for k in F], "target": [k[1] for k in F],
                                                               "score": list(F.values())}))
        names = [f"ft:m{j}" for j in range(n_setups)]
        targets = sorted({t for _, t in F})

        def vec_all() -> tuple:
            trans = an.transitivity(con, THRESHOLDS)
            ev = evaluate_selection(con, "taskshop-f", names[0], lam=0.7, targets=targets)
            return trans, ev

        def loop_all() -> tuple:
            setups, perf = loop_transfer_scores(runs)
            setups["mean"] = ref.mean_setup(setups)
            trans = {s: ref.transitivity(sc, THRESHOLDS) for s, sc in setups.items()}
            T = setups[names[0]]
            ts = {(s, t): ref.taskshop(T, F, s, t, 0.7) for (s, t) in F}
            return trans, ref.evaluate(T, ts, perf, targets)

        tv, (trans, ev) = timed(vec_all, repeat)
        tl, (want_trans, want_ev) = timed(loop_all)
        for s, want in want_trans.items():
            g = trans[trans.setup == s].sort_values("threshold")
            assert list(zip(g.threshold, g.n_triples, g.n_positive, strict=True)) == want
        for t in targets:
            assert abs(ev["by_target"][t]["ndcg"] - want_ev[t][0]) < 1e-9
            assert abs(ev["by_target"][t]["regret_at_5"] - want_ev[t][1]) < 1e-9
        row(f"PC/PM from runs + transitivity ({n_setups}+mean setups x {len(THRESHOLDS)})", tv, tl)
        print(f"    + TaskShop and NDCG/Regret@5 for all {len(targets)} targets (same timing, both sides)")
    del store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("TRANSFERLAB_DATA") or str(ROOT.parent / "shared" / "data"))
    p.add_argument("--tasks", type=int, default=100, help="tasks of the synthetic web (default 100)")
    p.add_argument("--setups", type=int, default=2, help="setups of the synthetic web (default 2)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per transfer of the synthetic web (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="vectorised timings: median of this many runs")
    args = p.parse_args(argv)
    print(f"cpus: {os.cpu_count()}; times are wall-clock seconds, same process, same data\n")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data)
        if (data / "taskweb" / "runs.csv").is_file():
            bench_taskweb(data, args.repeat, Path(tmp))
        else:
            print(f"TaskWeb release not found under {data}: skipping that part (set --data)")
        print()
        bench_synthetic(args.tasks, args.setups, args.seeds, args.repeat, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
