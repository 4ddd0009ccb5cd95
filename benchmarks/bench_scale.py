"""Scale benchmark (issue 20): a TaskWeb-shaped study run by the real driver on simulated work, swept in size.

    python benchmarks/bench_scale.py                       # 500, 2,000, 8,000 trials (+ faults at 8,000), direct
    python benchmarks/bench_scale.py --sizes 500,2000,8000,30000      # make bench-scale-full
    python benchmarks/bench_scale.py --sizes 500 --direct-rows 0      # quick look

Sweep: per size, a pairwise config with TaskWeb's structure (its 22 sources and 21 targets from
configs/taskweb_t5b_finetune.yaml, 8 seeds, 1-8 setups) whose setups carry a `simulate:` block
(rayjobs.engine.simulate: each trial sleeps, writes a run row, N prediction rows and, for sources, a small
checkpoint). It runs through `python -m rayjobs.pairwise` (rayjobs.engine.driver.run_job, whatever scheduler is
behind it) against a multi-node cluster on this machine: `ray.cluster_utils.Cluster`, NODES nodes of SLOTS
GPU slots each (Ray's GPU count stands in for GPUs; trials ask 0.01 CPU and 1 GPU, so NODES x SLOTS run at
once on 2 cores). At the largest default size a worker node is removed and another added, and the driver is
killed once and restarted; the store must end with every run exactly once.

Printed per size: driver CPU seconds (per trial), scheduling overhead per trial (= span of the run rows x
slots / trials - sleep: slot-seconds a trial holds beyond its sleep, worker-side writes included), peak driver
RSS, ingest time per new run (100 new runs on top of the store), the time of `finished_keys`, `status`,
`transfer_scores`, a TaskShop evaluation and the PVI and per-example views, file counts and store size; then
the growth ratios smallest -> largest.

Direct: DIRECT_ROWS prediction rows (30 M: 30,000 runs x 1,000 examples, PVI pairs among them) written straight
into the compacted, hive-partitioned layout, ingested into a fresh store, then every analysis query over them
timed (target <= 10 s each) and `status` of the 30,000-run experiment (target <= 5 s).

The machine is shared (2 cores, other work running): figures are under load; ratios of one run compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.store import compaction, status  # noqa: E402
from analysis.store.duck import read_store  # noqa: E402
from analysis.store.results import ResultStore  # noqa: E402

TASKWEB = yaml.safe_load((REPO / "configs" / "taskweb_t5b_finetune.yaml").read_text())
SEEDS = TASKWEB["seeds"]
SETUPS = ["finetune:t5b", "finetune:t5s", "finetune:t5l", "adapter:t5b", "bitfit:t5b", "finetune:gpt2m",
          "finetune:roberta", "lora:t5b", "prompt:t5b"]


#: TaskWeb's tasks with a choice answer (squad_v2, a free-text source, needs a text-to-text setup)
CHOICE_TASKS = list(TASKWEB["tasks"]["targets"])


def study_shape(target: int) -> tuple[list[str], list[str], int]:
    """(sources, targets, setups) of a TaskWeb-shaped study of about `target` trials (8 seeds)."""
    sources = targets = CHOICE_TASKS
    if target >= 3000:
        return sources, targets, max(1, round(target / trials_of(sources, targets, 1)))
    n = 2
    while n < len(targets) and trials_of(targets[:n + 1], targets[:n + 1], 1) <= target:
        n += 1
    return targets[:n], targets[:n], 1


def trials_of(sources: list[str], targets: list[str], setups: int) -> int:
    pairs = sum(1 for s in sources for t in targets if s != t)
    return setups * len(SEEDS) * (len(sources) + len(targets) + pairs)


def write_config(path: Path, target: int, sim: dict[str, Any]) -> int:
    sources, targets, n_setups = study_shape(target)
    cfg = {"job": "pairwise", "name": f"scale-{target}", "data_root": str(REPO / ".." / "shared" / "data"),
           "tasks": {"sources": sources, "targets": targets}, "seeds": SEEDS,
           "sizes": {"target_train": 1000, "eval": sim["examples"]},
           # setups differ in what enters the run key (learning rate), as real setups differ in their model
           "setups": [{"name": f"sim-{s}", "model": {"name": s.split(":")[1], "path": "builtin:minilm"},
                       "train": {"learning_rate": 1e-4 * (i + 1)},
                       "resources": {"cpu": 0.01, "gpu": 1}, "simulate": sim} for i, s in enumerate(SETUPS[:n_setups])],
           "run": {"max_failures": 3}}
    path.write_text(yaml.safe_dump(cfg))
    return trials_of(sources, targets, n_setups)


# -- the sweep ---------------------------------------------------------------------------------------------
class Cluster:
    def __init__(self, nodes: int, slots: int):
        self.tmp = tempfile.mkdtemp(prefix="tlsc", dir="/tmp")  # short: Unix socket paths
        os.environ["RAY_TMPDIR"] = self.tmp
        from ray.cluster_utils import Cluster as RayCluster

        self.slots = slots
        self.cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.nodes = [self.add() for _ in range(nodes)]

    def add(self):
        return self.cluster.add_node(num_cpus=self.slots, num_gpus=self.slots)

    def replace_one(self) -> None:
        self.cluster.remove_node(self.nodes.pop(0), allow_graceful=False)
        self.nodes.append(self.add())

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.cluster.address, "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false"}

    def stop(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _stored(results: Path) -> int:
    try:
        t = ResultStore(results).read_runs(["status"])
    except Exception:  # noqa: BLE001 - written meanwhile
        return 0
    return sum(1 for s in t["status"].to_pylist() if s == "ok")


def run_driver(cfg: Path, results: Path, cluster: Cluster, log: Path, faults: bool, planned: int) -> dict[str, Any]:
    """The driver as a job runs it; with `faults`, a node replaced at 25 % and the driver killed at 50 %."""
    cmd = [sys.executable, "-m", "rayjobs.pairwise", "--config", str(cfg), "--results", str(results)]
    cpu, rss, t0, starts = 0.0, 0, time.monotonic(), 0
    events = []
    for attempt in range(2 if faults else 1):
        with open(log, "a") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env(), stdout=out, stderr=subprocess.STDOUT)
        starts += 1
        code, ru = None, None
        if faults and attempt == 0:
            replaced = False
            while (status_ := _reap(proc.pid, block=False)) is None:
                done = _stored(results)
                if not replaced and done >= planned // 4:
                    cluster.replace_one()
                    replaced = True
                    events.append(f"node replaced at {done} runs")
                if replaced and done >= planned // 2:
                    proc.send_signal(signal.SIGKILL)
                    events.append(f"driver killed at {done} runs")
                    break
                time.sleep(1.0)
            else:
                code, ru = status_
        if code is None:
            code, ru = _reap(proc.pid, block=True)
        cpu += ru.ru_utime + ru.ru_stime
        rss = max(rss, ru.ru_maxrss * 1024)
    return {"wall_s": time.monotonic() - t0, "driver_cpu_s": cpu, "peak_rss": rss, "rc": os.waitstatus_to_exitcode(code),
            "events": events}


def taskshop(con: Any, setup: str) -> dict[str, Any]:
    """TaskShop (paper 000) with the `random` few-shot selector as F, evaluated leave-one-out (NDCG, Regret@5)."""
    from analysis.ranking.evaluate import evaluate_selection
    from analysis.selection import selectors as sel

    f = sel.resolve(con, "random", setup=setup)  # the stored name, e.g. random[seed=0]
    return evaluate_selection(con, f"taskshop-{f}", setup)


def _reap(pid: int, block: bool) -> tuple[int, Any] | None:
    """(wait status, rusage) of the child `pid` once it has exited; None while it runs (block=False)."""
    p, code, ru = os.wait4(pid, 0 if block else os.WNOHANG)
    return None if p == 0 else (code, ru)


def _timed(fn, repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure_store(results: Path, planned: int, sim: dict[str, Any]) -> dict[str, Any]:
    """The store after the run, fully compacted (as a long run keeps it: at most COMPACT_MIN_FILES runs in
    their own files), so sizes compare at the same state."""
    store = ResultStore(results)
    compaction.compact(store)
    out: dict[str, Any] = {}
    out["finished_keys_s"], keys = _timed(store.finished_keys, 3)
    out["status_s"], summary = _timed(lambda: status.render(status.summarise(store)), 3)
    with store.connect() as con:
        n_runs, n_distinct, n_ok = con.execute(
            "SELECT count(*), count(DISTINCT run_key), count(*) FILTER (status = 'ok') FROM runs").fetchone()
        n_pred = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
    out.update(runs=n_runs, distinct=n_distinct, ok=n_ok, finished=len(keys), predictions=n_pred,
               exactly_once=n_runs == n_distinct == planned == len(keys))
    with read_store(store.db_path) as con:
        out["transfer_scores_s"], _ = _timed(lambda: con.execute("SELECT * FROM transfer_scores").fetchall(), 3)
        setup = con.execute("SELECT min(setup) FROM transfer_scores").fetchone()[0]
        out["taskshop_s"], ev = _timed(lambda: taskshop(con, setup))
        out["taskshop_ndcg"] = ev.get("ndcg")
        out["pvi_s"], _ = _timed(lambda: con.execute("SELECT count(*) FROM pvi_tasks").fetchall())
        out["per_example_s"], _ = _timed(lambda: con.execute(
            "SELECT key, avg(CAST(correct AS DOUBLE)), avg(list_max(probs)) FROM predictions GROUP BY key").fetchall())
    out["files"] = compaction.file_counts(store)
    out["store_bytes"] = sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
    out["ingest_per_run_s"] = ingest_cost(store, sim)
    return out


def ingest_per_new_run(store: ResultStore, sim: dict[str, Any], n: int = 100) -> float:
    """Ingest of `n` new runs (rows + predictions like the simulated ones) on top of the store, per run."""
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(n):
        key = f"ingestbench{i:05d}{time.time_ns() % 10**6:06d}"
        m = sim["examples"]
        store.write_predictions(key, [{"example_id": f"validation:{j}", "template": "input", "task": "rte",
                                       "split": "eval", "gold": j % 2, "choices": ["a", "b"],
                                       "probs": [float(p), 1 - float(p)], "prediction": 0, "correct": j % 2 == 0}
                                      for j, p in enumerate(rng.random(m))])
        store.write_result({"run_key": key, "experiment": "ingest-bench", "kind": "bench", "score": 0.5})
    t, _ = _timed(lambda: store.ingest(compact=False))
    return t / n


def ingest_cost(store: ResultStore, sim: dict[str, Any], repeat: int = 3) -> float:
    """The cheapest of `repeat` ingests of 100 new runs, per run (the machine is shared: take the least disturbed)."""
    return min(ingest_per_new_run(store, sim) for _ in range(repeat))


def sweep(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    sim = {"sleep_s": args.sleep, "examples": args.examples, "checkpoint_bytes": args.checkpoint_bytes}
    cluster = Cluster(args.nodes, args.slots)
    rows = []
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        for size in sizes:
            cfg, results = work / f"scale-{size}.yaml", work / f"results-{size}"
            planned = write_config(cfg, size, sim)
            faults = size == args.faults_at
            print(f"-- {planned} trials{' (node replaced, driver killed and restarted)' if faults else ''}", flush=True)
            drv = run_driver(cfg, results, cluster, work / f"driver-{size}.log", faults, planned)
            store = ResultStore(results)
            t = store.read_runs(["created_at"])["created_at"].to_pylist()
            span = (max(t) - min(t)).total_seconds() if t else 0.0
            slots = args.nodes * args.slots
            m = measure_store(results, planned, sim)
            row = {"size": planned, **drv, **m, "span_s": span,
                   "overhead_per_trial_s": span * slots / planned - args.sleep,
                   "driver_cpu_per_trial_ms": 1000 * drv["driver_cpu_s"] / planned}
            rows.append(row)
            print_row(row)
            if not args.keep:
                shutil.rmtree(results, ignore_errors=True)
    finally:
        cluster.stop()
    return rows


def print_row(r: dict[str, Any]) -> None:
    f = r["files"]
    print(f"size {r['size']}: driver rc {r['rc']} {', '.join(r['events'])}\n"
          f"  wall {r['wall_s']:.1f} s, span of run rows {r['span_s']:.1f} s, driver CPU {r['driver_cpu_s']:.1f} s "
          f"({r['driver_cpu_per_trial_ms']:.2f} ms/trial), scheduling overhead per trial {r['overhead_per_trial_s']:.3f} s, "
          f"peak driver memory {r['peak_rss'] / 2**20:.0f} MiB\n"
          f"  ingest per new run {1000 * r['ingest_per_run_s']:.2f} ms, finished_keys {r['finished_keys_s']:.3f} s, "
          f"status {r['status_s']:.3f} s, transfer_scores {r['transfer_scores_s']:.3f} s, TaskShop evaluation "
          f"{r['taskshop_s']:.3f} s, PVI view {r['pvi_s']:.3f} s, per-example view {r['per_example_s']:.3f} s\n"
          f"  runs {r['runs']} (distinct {r['distinct']}, ok {r['ok']}, exactly once: {r['exactly_once']}), "
          f"predictions {r['predictions']}, files runs/ {f['runs']} predictions/ {f['predictions']} "
          f"checkpoints/ {f['checkpoints']}, store {r['store_bytes'] / 2**20:.0f} MiB", flush=True)


# -- direct queries over 30 M prediction rows ----------------------------------------------------------------
DIRECT_QUERIES = {
    "transfer_scores": "SELECT * FROM transfer_scores",
    "commutativity": "SELECT count(*), avg(CAST(commutative AS DOUBLE)) FROM commutativity",
    "transitive_triples": "SELECT setup, count(*) FROM transitive_triples GROUP BY setup",
    "setup_similarity": "SELECT * FROM setup_similarity",
    "target_performance": "SELECT count(*) FROM target_performance",
    "pvi (every instance)": "SELECT count(*), avg(pvi) FROM pvi",
    "pvi_tasks": "SELECT * FROM pvi_tasks",
    "per-run accuracy from predictions": "SELECT key, avg(CAST(correct AS DOUBLE)) FROM predictions GROUP BY key",
    "prompt-selection entropies (one task)": """
        SELECT key, template, avg(-list_sum(list_transform(probs, lambda p: p * ln(p)))) AS local_e
        FROM predictions WHERE task = 'rte' GROUP BY key, template""",
    "one run's predictions": "SELECT * FROM predictions WHERE key = (SELECT max(key) FROM predictions)",
}


def direct(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """30,000 runs of 8 setups (a pairwise study plus PVI pairs) with DIRECT_ROWS prediction rows."""
    import duckdb

    root = work / "direct"
    store = ResultStore(root)
    store.runs_dir.mkdir(parents=True, exist_ok=True)
    per_run = max(1, args.direct_rows // 30000)
    sources, targets = CHOICE_TASKS, CHOICE_TASKS
    con = duckdb.connect()
    con.execute("SET memory_limit = '3GB'")  # a shared machine; DuckDB spills what does not fit
    con.execute(f"SET temp_directory = '{work / 'duckdb-tmp'}'")
    t0 = time.perf_counter()
    con.execute("CREATE TABLE src AS SELECT unnest($s) AS t", {"s": sources})
    con.execute("CREATE TABLE tgt AS SELECT unnest($t) AS t", {"t": targets})
    con.execute("CREATE TABLE seeds AS SELECT unnest($x) AS seed", {"x": SEEDS})
    con.execute("CREATE TABLE setups AS SELECT unnest($x) AS setup", {"x": SETUPS[:8]})
    con.execute("""CREATE TABLE runs AS
        WITH base AS (SELECT setup, t AS target, seed, md5(setup || t || seed || 'b')[:20] AS run_key FROM setups, tgt, seeds),
             srcs AS (SELECT setup, t AS source, seed, md5(setup || t || seed || 's')[:20] AS run_key FROM setups, src, seeds),
             xfer AS (SELECT s.setup, s.source, b.target, s.seed, md5(s.setup || s.source || b.target || s.seed)[:20] AS run_key,
                             s.run_key AS source_run_key, b.run_key AS baseline_run_key
                      FROM srcs s JOIN base b ON b.setup = s.setup AND b.seed = s.seed AND b.target <> s.source),
             pvi AS (SELECT 'pvi:t5b' AS setup, t AS target, seed, k AS kind,
                            md5('pvi' || t || seed || k)[:20] AS run_key FROM tgt, seeds, (VALUES ('pvi_x'), ('pvi_null')) v(k))
        SELECT run_key, 'direct' AS experiment, 'source' AS kind, setup, source, NULL AS target, seed,
               NULL AS source_run_key, NULL AS baseline_run_key FROM srcs
        UNION ALL SELECT run_key, 'direct', 'target', setup, NULL, target, seed, NULL, NULL FROM base
        UNION ALL SELECT run_key, 'direct', 'transfer', setup, source, target, seed, source_run_key, baseline_run_key FROM xfer
        UNION ALL SELECT run_key, 'direct', kind, setup, NULL, target, seed, NULL,
                         CASE WHEN kind = 'pvi_x' THEN md5('pvi' || target || seed || 'pvi_null')[:20] END FROM pvi""")
    n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    con.execute("""CREATE TABLE runrows AS SELECT run_key, experiment, kind, setup, split_part(setup, ':', 2) AS model,
            split_part(setup, ':', 1) AS adaptation, source, target, seed, source_run_key, baseline_run_key,
            1000 AS n_train, $n AS n_eval, 'accuracy' AS metric,
            0.55 + 0.35 * (hash(coalesce(target, source)) % 1000) / 1000.0 + 0.02 * (hash(run_key) % 100) / 100.0 AS score,
            'ok' AS status, 'local' AS provenance, now()::TIMESTAMP AS created_at, kind AS stage FROM runs""",
                {"n": per_run})
    con.execute(f"COPY runrows TO '{store.runs_dir}' (FORMAT parquet, PARTITION_BY (stage), FILENAME_PATTERN 'part-{{uuid}}', "
                "OVERWRITE_OR_IGNORE)")
    for d in list(store.runs_dir.glob("stage=*")):  # runs/part-<stage>-*.parquet, flat as the compactor writes them
        for p in d.glob("*.parquet"):
            p.rename(store.runs_dir / f"part-{d.name[6:]}-{p.stem[5:]}.parquet")
        d.rmdir()
    pred = store.predictions_dir
    # one file per chunk of 1,000 runs: a key's rows stay in one part, as the compactor writes them
    con.execute("CREATE TABLE chunks AS SELECT run_key, kind, experiment, target, source, "
                "(row_number() OVER (PARTITION BY kind ORDER BY run_key) - 1) // 1000 AS chunk FROM runs")
    for kind, chunk in con.execute("SELECT DISTINCT kind, chunk FROM chunks ORDER BY ALL").fetchall():
        dest = pred / "experiment=direct" / f"kind={kind}" / f"part-{chunk:04d}.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"""COPY (
            SELECT r.run_key AS key, 'validation:' || i AS example_id, 'input' AS template,
                   coalesce(r.target, r.source) AS task, 'eval' AS split, CAST(hash(r.run_key || i) % 2 AS BIGINT) AS gold,
                   ['yes', 'no'] AS choices, [ln(p), ln(1 - p)] AS logprobs, [ln(p), ln(1 - p)] AS logprobs_mean,
                   [p, 1 - p] AS probs, CAST(p < 0.5 AS BIGINT) AS prediction,
                   (p < 0.5) = (hash(r.run_key || i) % 2 = 1) AS correct
            FROM (SELECT * FROM chunks WHERE kind = '{kind}' AND chunk = {chunk} ORDER BY run_key) r,
                 range({per_run}) t(i),
                 LATERAL (SELECT 0.02 + 0.96 * ((hash(r.run_key || i || 'p') % 10000) / 10000.0) AS p)
        ) TO '{dest}' (FORMAT parquet)""")
    con.close()
    made = time.perf_counter() - t0
    store.write_json("plan.json", {"experiment": "direct", "job": "pairwise", "started_at": time.time() - 3600,
                                   "trials": {}})
    t_ing, _ = _timed(lambda: store.ingest(compact=False))
    out: dict[str, float] = {}
    with store.connect() as c:
        n_pred = c.execute("SELECT count(*) FROM predictions").fetchone()[0]
    if n_pred != n_runs * per_run:
        print(f"ERROR: {n_runs * per_run - n_pred} prediction rows were not ingested", flush=True)
    print(f"-- direct: {n_runs} runs, {n_pred} prediction rows written in {made:.0f} s, ingested into a fresh "
          f"store in {t_ing:.0f} s; store {sum(p.stat().st_size for p in root.rglob('*') if p.is_file()) / 2**30:.2f} GiB",
          flush=True)
    keys = [k for k in ResultStore(root).read_runs(["run_key"])["run_key"].to_pylist()]
    store.write_json("plan.json", {"experiment": "direct", "job": "pairwise", "started_at": time.time() - 3600,
                                   "trials": {k: "transfer" for k in keys}})
    out["status (30,000-run experiment)"], lines = _timed(lambda: status.render(status.summarise(store)), 3)
    out["finished_keys"], _ = _timed(store.finished_keys, 3)
    with read_store(store.db_path) as con:
        for name, sql in DIRECT_QUERIES.items():
            out[name], _ = _timed(lambda sql=sql: con.execute(sql).fetchall())
        out["TaskShop evaluation"], _ = _timed(lambda: taskshop(con, SETUPS[0]))
    for name, s in out.items():
        target = 5.0 if name.startswith("status") else 10.0
        print(f"  {name}: {s:.3f} s (target <= {target:g} s: {'met' if s <= target else 'NOT met'})", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def growth(rows: list[dict[str, Any]], queries: dict[str, float]) -> None:
    a, b = rows[0], rows[-1]

    def ratio(key: str) -> float:
        return b[key] / a[key] if a[key] else float("nan")

    print(f"growth from {a['size']} to {b['size']} trials ({b['size'] / a['size']:.1f}x the study):")
    for label, key in (("driver CPU per trial", "driver_cpu_per_trial_ms"), ("finished_keys", "finished_keys_s"),
                       ("transfer_scores", "transfer_scores_s"), ("TaskShop evaluation", "taskshop_s"),
                       ("PVI view", "pvi_s"), ("per-example view", "per_example_s"), ("store size", "store_bytes")):
        print(f"  {label}: {ratio(key):.2f}x")
    print(f"peak driver memory at {b['size']} trials: {b['peak_rss'] / 2**20:.0f} MiB (target < 2048 MiB at 30,000)")
    worst_query = max(queries.values()) if queries else float("nan")
    status_30k = queries.get("status (30,000-run experiment)", float("nan"))
    print(f"growth scheduling overhead per trial: {ratio('overhead_per_trial_s'):.2f}x")
    print(f"growth ingest time per new run: {ratio('ingest_per_run_s'):.2f}x")
    print(f"growth peak driver memory: {ratio('peak_rss'):.2f}x")
    print(f"growth status: {ratio('status_s'):.2f}x (status of a 30,000-run experiment {status_30k:.2f} s)")
    slowest = ("transfer_scores_s", "taskshop_s", "pvi_s", "per_example_s")
    q = max(b[k] for k in slowest) / max(a[k] for k in slowest)
    print(f"growth slowest analysis query: {q:.2f}x (slowest over 30 M rows {worst_query:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000,8000", help="study sizes in trials, smallest first")
    ap.add_argument("--faults-at", type=int, default=8000, help="the size run with a node replaced and the driver "
                                                               "killed (0: none)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4, help="GPU slots per node (trials at once = nodes x slots; each "
                                                         "slot keeps a warm worker of ~0.5 GiB)")
    ap.add_argument("--sleep", type=float, default=0.2, help="seconds a simulated trial sleeps")
    ap.add_argument("--examples", type=int, default=100, help="prediction rows per simulated evaluation")
    ap.add_argument("--checkpoint-bytes", type=int, default=4096)
    ap.add_argument("--direct-rows", type=int, default=30_000_000, help="prediction rows of the direct query "
                                                                         "benchmark (0: skip)")
    ap.add_argument("--work", help="folder for configs, results and logs (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the results folders")
    ap.add_argument("--report", metavar="JSON", help="print the table and growth of an earlier run's bench_scale.json")
    args = ap.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        for r in saved["sweep"]:
            print_row(r)
        for name, sec in saved["direct"].items():
            print(f"  {name}: {sec:.3f} s")
        growth(saved["sweep"], saved["direct"])
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench-scale in {work} (shared 2-core machine: figures under load)", flush=True)
    rows = sweep(args, work) if args.sizes else []
    queries = direct(args, work) if args.direct_rows else {}
    if rows:
        growth(rows, queries)
    (work / "bench_scale.json").write_text(json.dumps({"sweep": rows, "direct": queries}, default=str, indent=1))
    return 0 if all(r["exactly_once"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
