"""Plain-Python loop implementations of the analysis formulas, straight from the paper and
TaskWeb's scripts, reading the release CSVs directly (no DuckDB, no store).

Why keep them: they are the independent cross-check of the vectorised SQL in the tests, and the
baseline the benchmark (benchmarks/bench_analysis.py) times the SQL against. Not for production
use: they loop over rows and triples.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

Scores = dict[tuple[str, str], float]


def combined(pc: float, pm: float) -> float:
    return 0.5 * pc + 0.5 * (0.2 * pm - 0.1)


def load_transfer_csv(path: str | Path) -> dict[str, Scores]:
    """{setup 'adaptation:model': {(source, target): T}} from transfer_scores.csv."""
    out: dict[str, Scores] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out[f"{r['adaptation']}:{r['model']}"][(r["source"], r["target"])] = combined(float(r["pc"]), float(r["pm"]))
    return dict(out)


def mean_setup(setups: dict[str, Scores]) -> Scores:
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, sc in setups.items():
        if name == "all:all":
            continue
        for k, v in sc.items():
            acc[k].append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def load_pairs_csv(path: str | Path, a: str = "source", b: str = "target") -> Scores:
    with open(path, newline="") as f:
        return {(r[a], r[b]): float(r["score"]) for r in csv.DictReader(f)}


_METRICS = {"cb": ["accuracy", "f1"], "mrpc": ["accuracy", "f1"], "qqp": ["accuracy", "f1"],
            "stsb": ["pearson", "spearmanr"], "squad_v2": ["exact", "f1"]}


def run_metric(target: str, metrics: dict[str, float]) -> float:
    """TaskWeb load.py: mean of the target's metrics present, each /100 when above 1."""
    vals = []
    for m in _METRICS.get(target, ["accuracy"]):
        if f"eval_{m}" in metrics:
            v = metrics[f"eval_{m}"]
            vals.append(v / 100.0 if v > 1.0 else v)
    return sum(vals) / len(vals)


def load_runs_csv(path: str | Path) -> dict[tuple, list[float]]:
    """{(setup, source, target, epochs, lr, batch): [p per seed]} with NaN runs left out."""
    out: dict[tuple, list[float]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            p = run_metric(r["target"], json.loads(r["metrics_json"]))
            if math.isnan(p):
                continue
            key = (f"{r['adaptation']}:{r['model']}", r["source"], r["target"], int(r["epochs"]),
                   float(r["learning_rate"]), int(r["batch_size"]))
            out[key].append(p)
    return dict(out)


def target_performance(runs: dict[tuple, list[float]], setup: str, hparams: dict[str, tuple[int, float, int]]
                       ) -> dict[tuple[str, str], float]:
    """Mean p over seeds per (source, target), from the target's config (TaskWeb configs/*.json)."""
    out = {}
    for (su, s, t, e, lr, b), ps in runs.items():
        if su == setup and hparams.get(t, (e, lr, b)) == (e, lr, b):
            out[(s, t)] = sum(ps) / len(ps)
    return out


def commutativity(T: Scores) -> tuple[int, int]:
    """(pairs with both directions, pairs whose directions are both > 0 or both <= 0)."""
    n = same = 0
    for (a, b), v in T.items():
        if a < b and (b, a) in T:
            n += 1
            same += (v > 0) == (T[(b, a)] > 0)
    return n, same


def transitivity(T: Scores, thresholds: list[float]) -> list[tuple[float, int, int]]:
    """(threshold, triples with A->B, B->C above it, of which A->C > 0), by nested loops."""
    out = []
    tasks = sorted({x for k in T for x in k})
    for h in thresholds:
        n = pos = 0
        for a in tasks:
            for b in tasks:
                if (a, b) not in T or T[(a, b)] <= h:
                    continue
                for c in tasks:
                    if c == a or (b, c) not in T or T[(b, c)] <= h or (a, c) not in T:
                        continue
                    n += 1
                    pos += T[(a, c)] > 0
        out.append((h, n, pos))
    return out


def similarity(x: Scores, y: Scores) -> float:
    keys = [k for k in x if k in y]
    dot = sum(x[k] * y[k] for k in keys)
    return dot / math.sqrt(sum(x[k] ** 2 for k in keys) * sum(y[k] ** 2 for k in keys))


def taskshop(T: Scores, F: Scores, source: str, target: str, lam: float, symmetric: bool = False,
             pivot_norm: str = "none", direct_norm: str = "none") -> float:
    """Eq. 1 for one pair, TaskWeb's taskshop_predict.py style (pivots: tasks that are T targets)."""
    mu = sd = lo = hi = 0.0
    if pivot_norm != "none" or direct_norm != "none":  # statistics over all raw F scores
        raw = list(F.values())
        mu = sum(raw) / len(raw)
        sd = math.sqrt(sum((v - mu) ** 2 for v in raw) / len(raw))
        lo, hi = min(raw), max(raw)

    def f(a: str, b: str) -> float | None:
        if symmetric:
            if (a, b) not in F:
                return None
            return (F[(a, b)] + F[(b, a)]) / 2 if (b, a) in F else F[(a, b)]
        return F.get((a, b))

    def norm(v: float, kind: str) -> float:
        return v if kind == "none" else (v - mu) / sd if kind == "zscore" else (v - lo) / (hi - lo)

    pivots = sorted({t for (_, t) in T})
    terms = []
    for p in pivots:
        if p in (source, target) or (source, p) not in T or f(p, target) is None:
            continue
        terms.append((T[(source, p)] + norm(f(p, target), pivot_norm)) / 2)
    return lam * sum(terms) / len(terms) + (1 - lam) * norm(f(source, target), direct_norm)


def ndcg(pred: list[str], gold: list[str]) -> float:
    """TaskWeb metrics.py: relevance n - gold rank, gain 2^rel - 1, discount log2(i + 2)."""
    rank = {g: i for i, g in enumerate(gold)}
    n = len(gold)

    def dcg(order: list[str]) -> float:
        return sum((2 ** (n - rank[s]) - 1) / math.log2(i + 2) for i, s in enumerate(order))

    return dcg(pred) / dcg(gold)


def regret_at_k(pred: list[str], gold: list[str], perf: dict[str, float], k: int) -> float:
    best = sum(perf[s] for s in gold[:k]) / k
    got = sum(perf[s] for s in pred[:k]) / k
    return (best - got) / best


def rank(scores: dict[str, float]) -> list[str]:
    """Descending by score; ties keep alphabetical order (stable sort over sorted names)."""
    return [s for s, _ in sorted(sorted(scores.items()), key=lambda kv: kv[1], reverse=True)]


def evaluate(T: Scores, pred: Scores, perf: dict[tuple[str, str], float], targets: list[str], k: int = 5
             ) -> dict[str, tuple[float, float]]:
    """{target: (NDCG, Regret@k)} over the sources with T(s -> target) known."""
    out = {}
    for t in targets:
        sources = sorted(s for (s, tt) in T if tt == t and s != t)
        gold = rank({s: T[(s, t)] for s in sources})
        got = rank({s: pred[(s, t)] for s in sources})
        out[t] = (ndcg(got, gold), regret_at_k(got, gold, {s: perf[(s, t)] for s in sources}, k))
    return out
