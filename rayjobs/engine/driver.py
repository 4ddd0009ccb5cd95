"""The one driver: runs any job kind from its config, with the same flags everywhere.

    transferlab run CONFIG [--results DIR] [--db FILE] [--smoke] [KEY=VALUE ...]
    python -m rayjobs.<kind> --config CONFIG [...]          # the same, for `ray job submit`

Every kind goes the same way: load and validate the config as the kind it names (`job:`), apply
`KEY=VALUE` overrides (dotted keys: `seeds=[1,2]`, `setups.0.train.epochs=1`), shrink it with
`--smoke`, plan (every check that can fail before Ray starts), skip run keys already stored, run the
rest on Ray (each trial as soon as its dependencies are stored), ingest, print the kind's report and where the results are.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from analysis.store.remote import display, is_uri
from analysis.store.results import ResultStore
from analysis.store.status import write_plan
from rayjobs.config import ConfigError, JobConfig
from rayjobs.engine.runner import finish, run_trials
from rayjobs.engine.smoke import smoke_variant
from rayjobs.errors import guarded
from rayjobs.job import JOB_MODULES, Job, get_job, job_kinds, load_job_config
from rayjobs.models.check import check_model_available


def run_job(job: Job, cfg: JobConfig, results_dir: str, db: str | None = None) -> int:
    """Plan, skip what is stored, run the rest, report; exit status 0 when every run is stored.

    `results_dir` may be a `pyarrow.fs` URI (s3://...): trial files and checkpoints go there, and this
    driver keeps its mirror of run rows and predictions, and the DuckDB file, in `results/<name>`."""
    remote = results_dir if is_uri(results_dir) else None
    local = Path("results") / cfg.name if remote else Path(results_dir)
    store = ResultStore(local, db_path=db, remote=remote)
    with created_only_if_planned(store):
        store.ensure_writable()
        plan = job.plan(cfg, store)
        if remote:
            plan.trials = [t.model_copy(update={"results_uri": remote}) for t in plan.trials]
        done = store.finished_keys()  # finished or stopped early: decided
        stopped = store.finished_keys(statuses=("stopped",))
        todo = [t for t in plan.trials if t.run_key not in done and not t.stopped_out(stopped)]
        check_models(todo)
    if remote:
        print(f"transferlab: results at {display(remote)}; run rows, predictions and the database mirrored in "
              f"{store.root}", flush=True)
    for step in plan.before_run:
        step(store)
    store.ingest()
    what = plan.summary or f"{len(plan.trials)} runs"
    print(f"transferlab: {job.kind} {cfg.name!r}: {what}, {len(plan.trials) - len(todo)} already stored, "
          f"{len(todo)} to run; results in {store.root}", flush=True)
    write_plan(store, cfg.name, job.kind, {t.run_key: t.kind for t in plan.trials})
    if todo:
        run_trials(cfg.name, todo, cfg.run, store, gate=plan.gate)
    for line in job.report(cfg, store):
        print(line)
    return finish(store, plan.trials, plan.view, plan.gate)


@contextlib.contextmanager
def created_only_if_planned(store: ResultStore) -> Iterator[None]:
    """A run whose config, tasks or models fail a check leaves no folder or database behind: what this
    invocation created for the results (folders, the DuckDB file) is removed again when planning fails."""
    root = store.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"results location {root} is a file, not a folder")
    first_new, p = None, root  # the topmost folder this run will create
    while not p.exists():
        first_new, p = p, p.parent
    db_new = not store.db_path.exists()
    try:
        yield
    except BaseException:
        if first_new is not None and first_new.exists():
            shutil.rmtree(first_new, ignore_errors=True)
        elif db_new and store.db_path.exists() and not any(store.runs_dir.glob("*.parquet")):
            store.db_path.unlink(missing_ok=True)
        raise


def check_models(trials: list) -> None:
    """Every model the remaining trials load must be loadable: a hub id that is neither local, cached nor
    reachable fails here (exit 2), once, instead of inside every trial after Ray started."""
    refs = {t.params.get("ref") or t.setup.model.path for t in trials} | {t.setup.model.tokenizer for t in trials}
    for ref in sorted(r for r in refs if r and not r.startswith(("run:", "http://", "https://", "sentence:builtin:"))):
        check_model_available(ref[len("sentence:"):] if ref.startswith("sentence:") else ref)


def add_job_arguments(ap: argparse.ArgumentParser, config_flag: bool = False) -> None:
    """The common flags of every job (one place for all kinds)."""
    if config_flag:
        ap.add_argument("--config", required=True, help="job config YAML (its `job:` field names the kind)")
    else:
        ap.add_argument("config", help="job config YAML (its `job:` field names the kind: "
                                       f"{', '.join(job_kinds())}; default pairwise)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="override config fields, e.g. seeds=[1,2] setups.0.train.epochs=1 (values are YAML)")
    ap.add_argument("--results", help="results folder, or a pyarrow.fs URI such as s3://bucket/prefix for a "
                                      "cluster without a shared filesystem (default: the config's results_dir)")
    ap.add_argument("--db", help="DuckDB file the results are ingested into (default: RESULTS/transferlab.duckdb)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also print when each trial starts and on which worker, and the workers' model-loading "
                         "output (default: one line per finished trial and per stage, plus errors)")
    ap.add_argument("--smoke", action="store_true",
                    help="shrink the config to run end to end on a laptop: tiny sizes and models, one seed, "
                         "a few steps (default: off)")


def run_from_args(args: argparse.Namespace, expect: str | None = None) -> int:
    job, cfg = load_job_config(args.config, args.overrides, default_kind=expect or "pairwise")
    if expect is not None and job.kind != expect:
        raise ConfigError(f"{args.config}: a `job: {job.kind}` config; run it with `transferlab run "
                          f"{args.config}` or `python -m {job_module(job.kind)} --config {args.config}`")
    if args.smoke:
        cfg = smoke_variant(cfg)
    if getattr(args, "verbose", False):
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"verbose": max(2, cfg.run.verbose)})})

    results = str(args.results or cfg.results_dir)
    return run_job(job, cfg, results if is_uri(results) else str(Path(results)), args.db)


def job_module(kind: str) -> str:
    return JOB_MODULES[kind]


def module_main(kind: str, argv: list[str] | None = None) -> int:
    """`python -m rayjobs.<kind> --config FILE ...`: the driver, checking the config is of that kind."""
    job = get_job(kind)
    ap = argparse.ArgumentParser(prog=f"python -m {job_module(kind)}",
                                 description=job.description or f"run a {kind} job config on Ray",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(ap, config_flag=True)
    return run_from_args(ap.parse_args(argv), expect=kind)


def module_entry(kind: str, module_name: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of a kind's module (`module_main` for that kind); called with the module's
    `__name__`, it also runs it (and exits) when the module runs as `python -m rayjobs.<kind>`."""

    def main(argv: list[str] | None = None) -> int:
        return module_main(kind, argv)

    if module_name == "__main__":
        sys.exit(guarded(main))
    return main
