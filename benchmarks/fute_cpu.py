"""FUTE's CPU experiment (paper 004) in one command: embeddings, evaluations, report and figures.

    make fute-cpu                      # = python benchmarks/fute_cpu.py
    python benchmarks/fute_cpu.py --skip-jobs          # only re-evaluate and re-draw from the store

1. `transferlab embed configs/fute_cpu.yaml`: the pairwise quickstart grid (MiniLM source models and their
   transfer matrix), every black box labelling the probe pool, eval scoring of every prompt, and two MiniLM
   TaskEmb spaces (pair-scoring and classification heads), each with 8 DTEs and the MTEs of 3 source models
   and 11 MiniLM zero-shot prompts;
2. `transferlab embed configs/fute_taskweb.yaml`: few-shot DTEs of the TaskWeb tasks (32 prompted examples);
3. the TaskWeb release imported into the same store (published transfers, RoE, LLM-similarity);
4. reports/fute_cpu/report.md with retrieval.png, projection.png, taskshop.png, prompts.png and the cost
   count (analysis.reports.fute, analysis.selection.fute_cost). Both jobs resume: re-running redoes nothing stored.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKWEB_SETUPS = ["finetune:t5l", "finetune:t5b", "finetune:t5s", "finetune:gpt2m", "finetune:roberta",
                  "pfeiffer:t5b", "bitfit:t5b"]


def run_job(config: str, results: Path) -> float:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "rayjobs.cli", "embed", config, "--results", str(results)], cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{config} did not finish (exit {r.returncode}); re-run to resume")
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results/fute_cpu", help="results folder of both jobs")
    ap.add_argument("--out", default="reports/fute_cpu", help="report folder")
    ap.add_argument("--skip-jobs", action="store_true", help="evaluate and draw from what is stored")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="reference data folder")
    args = ap.parse_args(argv)
    results = Path(args.results)
    times = {}
    if not args.skip_jobs:
        times["fute_cpu.yaml"] = run_job("configs/fute_cpu.yaml", results)
        times["fute_taskweb.yaml"] = run_job("configs/fute_taskweb.yaml", results)

    from analysis.importers.taskweb import import_taskweb
    from analysis.ranking.evaluate import set_category_source
    from analysis.reports.fute import write_fute_report
    from analysis.selection.fute_cost import cost_report
    from analysis.store.duck import open_store
    from rayjobs.cli import _registry_categories

    set_category_source(_registry_categories)
    with open_store(results / "transferlab.duckdb") as con:
        import_taskweb(con, Path(args.data) / "taskweb")
        have = {r[0] for r in con.execute("SELECT DISTINCT setup FROM setup_transfers").fetchall()}
        setups = [s for s in TASKWEB_SETUPS if s in have]
        n_prompts = con.execute("""SELECT count(DISTINCT prompt) FROM task_embeddings WHERE experiment = 'fute-cpu'
                                   AND kind = 'MTE' AND task = 'cb' AND prompt IS NOT NULL""").fetchone()[0]
        cost = cost_report(con, "fute-cpu", k_p=n_prompts, k_d=4, what_if_call_seconds=[0.5, 2.0])
        cost["lines"].insert(0, f"Scenario: the {n_prompts} cb prompts of MiniLM to be ranked for each of k_D = 4 NLI "
                                "datasets (the paper's setting: one prompt set, several datasets of a category).")
        notes = [f"wall time of the jobs in this invocation: {', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())}"
                 if times else "jobs not run in this invocation (--skip-jobs): numbers from the stored results"]
        numbers = write_fute_report(con, args.out, space="minilm-pairs", model="minilm-zs",
                                    prompt_tasks=["cb", "scitail"], local_setup="full:minilm",
                                    taskweb_space="minilm-taskemb-mc", taskweb_setups=setups, cost=cost, notes=notes,
                                    compare_spaces=["minilm-taskemb"])
    (Path(args.out) / "numbers.json").write_text(json.dumps(numbers, indent=1, default=str))
    print(f"wrote {Path(args.out) / 'report.md'} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
