"""Serving throughput and latency: batched vs unbatched Serve, and Serve's overhead over the scorer itself.

    .venv/bin/python benchmarks/bench_serve.py [--model builtin:minilm] [--examples 1] [--requests 256]
        [--concurrency 1 8 32] [--batch-size 32] [--wait 0.02] [--threads 1] [--ingress proxy direct]

For each ingress mode a fresh local Ray + Serve is started (in a child process: the mode is an environment
variable of the Ray processes): `proxy` is Serve's default path (HTTP proxy actor -> ingress replica),
`direct` is Ray's direct ingress (the ingress replica listens itself; `transferlab serve --direct-ingress`).
The application of serving/app.py is deployed per mode and arm with the `deployments:` section the
config file would give it (`serving.app.application`): `max_batch_size=B` (batched) or `max_batch_size=1`
(unbatched) in both deployments' user_config, one scorer replica with `--threads` CPUs. At each concurrency level c, c client threads send /v1/score requests back to back (closed
loop, keep-alive HTTP) for `--requests` requests; throughput = requests / wall time, latency percentiles
over all requests. "Direct" calls the same scorer in this process with the same torch threads: at c=1
`BlackBox.score` per request, at c>1 `serving.batching.score_jobs` over groups of c requests (exactly what
one full Serve batch runs), so direct / Serve is the price of the HTTP path, the ingress, the Ray calls
and the batch queues, and direct c / direct 1 is the most batching can gain with this model (its
ceiling). Tokens/s counts the model's tokens of every rendered prompt and choice. Every figure comes from
one run on one machine: on a shared machine compare the ratios, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rayjobs.engine.runner import QUIET  # noqa: E402 - the job logs' own: no model-loading bars, reports or notices

# here (the direct scorer, before transformers is imported) and, through the runtime env, in the replicas
os.environ.update(QUIET)

TEMPLATE = {"input": "Review: {input} Sentiment?", "answer_choices": ["negative", "positive"]}
TEXTS = ["a fine, moving film with a cast that clearly enjoyed every scene",
         "dull, far too long, and the jokes never land",
         "I would watch it again tomorrow, and take my parents along",
         "the plot makes no sense but the music is wonderful"]


def _body(model: str, i: int, n_examples: int) -> dict[str, Any]:
    return {"model": model, "template": TEMPLATE,
            "examples": [{"input": f"{TEXTS[(i + j) % len(TEXTS)]} ({i})"} for j in range(n_examples)]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _role(proc: Any) -> str:
    """Which part of the system a process of this Ray session is (its Ray process title)."""
    try:
        title = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - a process that just exited
        return "other"
    for key, role in (("Scorer", "scorer"), ("Ingress", "ingress"), ("ProxyActor", "proxy")):
        if key in title:
            return role
    return "ray"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the HTTP clients) and each role of its Ray."""
    import psutil

    me = psutil.Process()
    out = {"client": sum(me.cpu_times()[:2])}
    for proc in me.children(recursive=True):
        try:
            t = proc.cpu_times()
        except Exception:  # noqa: BLE001
            continue
        role = _role(proc)
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def load(url: str, model: str, concurrency: int, n_requests: int, n_examples: int) -> dict[str, float]:
    """Closed-loop HTTP load: `concurrency` threads, `n_requests` in all; throughput, latency percentiles and
    CPU milliseconds per request of each role (client, proxy, ingress, scorer, rest of Ray)."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker() -> None:
        http = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            r = http.post(url + "/v1/score", json=_body(model, i, n_examples), timeout=300)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                if r.status_code != 200:
                    errors.append(r.text[:200])

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu0 = cpu_snapshot()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = cpu_snapshot()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    cpu = {f"cpu_{k}": (cpu1[k] - cpu0.get(k, 0.0)) * 1000 / n_requests for k in cpu1}
    return {"rps": n_requests / wall, "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99), **cpu}


def direct(model: str, concurrency: int, n_requests: int, n_examples: int, threads: int) -> dict[str, float]:
    """The scorer without Serve, in this process: single requests at c=1, c-request batches above."""
    import torch

    from rayjobs.scoring.blackbox import open_black_box
    from serving.batching import ScoreJob, score_jobs
    from serving.schemas import ScoreRequest

    torch.set_num_threads(threads)
    box = direct.boxes.setdefault(model, open_black_box(model))  # type: ignore[attr-defined]
    reqs = [ScoreRequest.model_validate(_body(model, i, n_examples)) for i in range(n_requests)]
    jobs = [ScoreJob(box, r.template.template(), [e.example(r.template, j) for j, e in enumerate(r.examples)])
            for r in reqs]
    score_jobs(jobs[:1])  # warm
    latencies = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, n_requests, concurrency):
        t = time.perf_counter()
        if concurrency == 1:
            box.score(jobs[i].template, jobs[i].examples)
        else:
            score_jobs(jobs[i:i + concurrency])
        latencies += [time.perf_counter() - t] * len(jobs[i:i + concurrency])
    wall = time.perf_counter() - t0
    return {"rps": n_requests / wall, "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
            "cpu_scorer": (time.process_time() - c0) * 1000 / n_requests}


direct.boxes = {}  # type: ignore[attr-defined]


def tokens_per_request(model: str, n_examples: int) -> float:
    from rayjobs.scoring.blackbox import open_black_box

    box = direct.boxes.setdefault(model, open_black_box(model))  # type: ignore[attr-defined]
    tok = getattr(box.tm, "tokenizer", None) or box.tm.encoder.tokenizer
    body = _body(model, 0, n_examples)
    texts = [TEMPLATE["input"].format(input=e["input"]) for e in body["examples"]] + TEMPLATE["answer_choices"]
    return float(sum(len(tok(t)["input_ids"]) for t in texts))


def measure_serve(args: argparse.Namespace, mode: str) -> dict[str, dict[str, float]]:
    """Batched and unbatched arms through one Serve application with `mode` ingress (runs in a child)."""
    import ray
    import requests
    import torch
    from ray import serve

    from serving.app import application
    from serving.cli import answering_port, direct_ingress_env, free_port

    port = free_port("127.0.0.1")
    env = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **QUIET,
           **dict(kv.split("=", 1) for kv in args.ray_env)}
    if mode == "direct":
        direct_port = free_port("127.0.0.1")
        env.update(direct_ingress_env(direct_port))
    os.environ.update(env)  # inherited by the Ray this starts
    gpu = torch.cuda.is_available()
    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="tl-bench-", dir="/tmp"),
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"models": [args.model], "max_examples": max(256, args.examples), "torch_threads": args.threads,
                "access_log": args.access_log}
    n_for = {c: max(c, args.requests // 4 if c == 1 else args.requests) for c in args.concurrency}
    results: dict[str, dict[str, float]] = {}
    url = f"http://127.0.0.1:{port}"
    try:
        for arm, size in (("batched", args.batch_size), ("unbatched", 1)):
            batching = {"max_batch_size": size, "batch_wait_timeout_s": args.wait}
            deployments = [{"name": "Ingress", "user_config": batching},
                           {"name": "Scorer", "num_replicas": 1, "user_config": batching,
                            "ray_actor_options": {"num_cpus": args.threads, "num_gpus": 1 if gpu else 0}}]
            serve.run(application(settings, deployments), name="bench", route_prefix="/")
            if mode == "direct":
                got = answering_port("127.0.0.1", range(direct_port, direct_port + 10))
                assert got is not None, "the direct-ingress replica does not answer"
                url = f"http://127.0.0.1:{got}"
            stats = requests.get(url + "/v1/stats", timeout=60).json()
            assert stats["max_batch_size"] == size and stats["ingress"]["max_batch_size"] == size, stats
            load(url, args.model, 4, 16, args.examples)  # warm: model loaded, connections open
            for c in args.concurrency:
                s0 = requests.get(url + "/v1/stats", timeout=60).json()
                r = load(url, args.model, c, n_for[c], args.examples)
                s1 = requests.get(url + "/v1/stats", timeout=60).json()
                r["batch"] = (s1["batched_requests"] - s0["batched_requests"]) / max(1, s1["batches"] - s0["batches"])
                r["calls"] = (s1["calls"] - s0.get("calls", 0)) / n_for[c]
                results[f"{arm}/{c}"] = r
                print(f"  {mode:6s} {arm:9s} c={c:<3d} {r['rps']:8.1f} req/s, mean batch {r['batch']:.1f} requests, "
                      f"{r['calls']:.2f} Ray calls per request", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--examples", type=int, default=1, help="examples per request")
    ap.add_argument("--requests", type=int, default=256, help="requests per concurrency level (c=1: a quarter)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched arm")
    ap.add_argument("--wait", type=float, default=0.02,
                    help="batch_wait_timeout_s of the batched arm (the application's default is 5 ms; 20 ms fills "
                         "batches of 32 at concurrency 32 here)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (scorer replica and direct)")
    ap.add_argument("--ingress", nargs="+", choices=["proxy", "direct"], default=["proxy", "direct"],
                    help="ingress modes to measure, each on a fresh Ray (default: both)")
    ap.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                    help="Serve's per-request access log in the replicas (the application's default is on)")
    ap.add_argument("--ray-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment of the Ray processes, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    ap.add_argument("--child", choices=["proxy", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(measure_serve(args, args.child)))
        return 0

    import torch

    results: dict[tuple[str, int], dict[str, float]] = {}
    n_for = {c: max(c, args.requests // 4 if c == 1 else args.requests) for c in args.concurrency}
    # the scorer alone before and after the Serve runs (a shared machine's speed drifts): the mean is the baseline
    before = {c: direct(args.model, c, n_for[c], args.examples, args.threads) for c in args.concurrency}
    argv = list(sys.argv[1:])
    for mode in args.ingress:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, *argv, "--child", mode, "--out", f.name], check=True)
            for key, r in json.loads(Path(f.name).read_text()).items():
                arm, c = key.split("/")
                results[(f"{mode} {arm}", int(c))] = r
    for c in args.concurrency:
        after = direct(args.model, c, n_for[c], args.examples, args.threads)
        results[("direct", c)] = {k: (before[c][k] + after[k]) / 2 for k in after}
        results[("direct", c)]["drift"] = after["rps"] / before[c]["rps"]
    tpr = tokens_per_request(args.model, args.examples)
    gpu = torch.cuda.is_available()
    arms = [f"{m} {a}" for m in args.ingress for a in ("batched", "unbatched")] + ["direct"]

    print(f"\nbench-serve: model {args.model}, {args.examples} example(s) x {len(TEMPLATE['answer_choices'])} "
          f"choices per request, {tpr:.0f} tokens per request, torch threads {args.threads}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if gpu else f'CPU ({os.cpu_count()} cores)'}, "
          f"batched max_batch_size={args.batch_size} wait={args.wait * 1000:g} ms, access log "
          f"{'on' if args.access_log else 'off'}{', ' + ' '.join(args.ray_env) if args.ray_env else ''}")
    print(f"{'arm':18s} {'c':>3s} {'req/s':>8s} {'tokens/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s} "
          f"{'calls/req':>9s}")
    for arm in arms:
        for c in args.concurrency:
            r = results[(arm, c)]
            print(f"{arm:18s} {c:3d} {r['rps']:8.1f} {r['rps'] * tpr:9.0f} {r['p50'] * 1000:8.1f} "
                  f"{r['p99'] * 1000:8.1f} {r.get('batch', c):6.1f} {r.get('calls', float('nan')):9.2f}")
    roles = ["client", "proxy", "ingress", "scorer", "ray"]
    print("\nCPU ms per request (all processes of each Ray session; independent of other load on the machine):")
    print(f"{'arm':18s} {'c':>3s} " + " ".join(f"{r:>8s}" for r in roles) + f" {'total':>8s}")
    for arm in arms:
        for c in args.concurrency:
            r = results[(arm, c)]
            vals = [r.get(f"cpu_{k}", 0.0) for k in roles]
            print(f"{arm:18s} {c:3d} " + " ".join(f"{v:8.2f}" for v in vals) + f" {sum(vals):8.2f}")
    c = max(args.concurrency)
    d1, dc = results[("direct", min(args.concurrency))], results[("direct", c)]
    print("\ndirect = the mean of the scorer alone before and after the Serve runs; after / before throughput: "
          + ", ".join(f"c={c} {results[('direct', c)]['drift']:.2f}" for c in args.concurrency))
    print(f"the model's own batching gain (direct c={c} / direct c={min(args.concurrency)}): "
          f"{dc['rps'] / d1['rps']:.2f}x, the ceiling of batched / unbatched")
    print("ratios (same run):")
    for mode in args.ingress:
        for cc in args.concurrency:
            b, u, d = (results[(f"{mode} batched", cc)], results[(f"{mode} unbatched", cc)],
                       results[("direct", cc)])
            print(f"  {mode:6s} c={cc:<3d} batched / unbatched throughput {b['rps'] / u['rps']:5.2f}x   "
                  f"Serve overhead per request vs direct {d['rps'] / b['rps'] - 1:+6.1%}")
    lo = min(args.concurrency)
    print(f"\nceiling fractions (Serve batched / the scorer's own batched throughput, same run) and the c={lo} "
          "cost of batching (targets: >= 0.85 direct, >= 0.55 proxy; >= 0.9 at c=1):")
    for mode in args.ingress:
        b, bl, ul = (results[(f"{mode} batched", c)], results[(f"{mode} batched", lo)],
                     results[(f"{mode} unbatched", lo)])
        print(f"ceiling fraction {mode} c={c}: {b['rps'] / dc['rps']:.2f}")
        print(f"batched/unbatched c={lo} {mode}: {bl['rps'] / ul['rps']:.2f}")
        print(f"  c={lo} p50 latency {mode}: batched {bl['p50'] * 1000:.1f} ms, unbatched {ul['p50'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
