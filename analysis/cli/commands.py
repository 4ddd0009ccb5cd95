"""`transferlab` subcommands of the analyses (registered by `rayjobs.cli`).

  import taskweb DIR | import its DIR | import sizes FILE   published data into the store
  analyze matrix|commutativity|transitivity|setup-similarity
  selectors                                    list stored selectors
  compute-selector roe|taskshop|random|size    compute and store a selector's scores
  compare-selectors A B                        closeness of two selectors (e.g. recomputed vs released RoE)
  tune-lambda --selector taskshop-F --setup S  TaskShop's lambda on held-out targets
  evaluate-selection --selector S --setup S    NDCG / Regret@k, leave-one-out (paper Table 2)
  select --target T --selector S --k 5         top / bottom / random k sources for multi-task training
  report                                       PNG figures + index.html

Every command takes `--db PATH` (default: the configured store); errors are `AnalysisError`s,
which the CLI prints as `transferlab: error: ...` with exit status 2. Only `import` and
`compute-selector` write; every other command runs on `analysis.store.duck.read_store`, an in-memory copy,
so the store file stays byte-identical even when a read materialises a derived selector.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import AnalysisError

if TYPE_CHECKING:
    import duckdb


def _data_root() -> Path:
    env = os.environ.get("TRANSFERLAB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _dump(obj: Any) -> None:
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    print(json.dumps(clean(obj), indent=2, default=str))


def _table(cols: list[str], rows: list[tuple]) -> None:
    from analysis.reports.textout import print_table

    print_table(cols, rows)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


# Selectors this system names whose scores only an import or `compute-selector` brings into a store.
_STORED_ONLY: dict[str, str] = {
    "roe": "`transferlab import taskweb DIR` stores TaskWeb's released RoE scores",
    "llm": "`transferlab import taskweb DIR` stores TaskWeb's released LLM-similarity scores",
    "roe-minilm": "`transferlab compute-selector roe` computes and stores it",
}


def _require_scores(con: duckdb.DuckDBPyConnection, name: str, db: str) -> None:
    """A known selector whose scores this store lacks is named as such, not as an unknown selector."""
    f = name[len("taskshop-"):] if name.startswith("taskshop-") else name
    if f not in _STORED_ONLY:
        return
    if con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [f]).fetchone()[0]:
        return
    if f == name:
        raise AnalysisError(f"selector '{name}' has no scores in this store ({db}): {_STORED_ONLY[f]}")
    raise AnalysisError(f"selector '{name}' needs the scores of '{f}' as F, and this store ({db}) has none: "
                        f"{_STORED_ONLY[f]}")


def _check_k(con: duckdb.DuckDBPyConnection, setup: str, targets: list[str], k: int) -> None:
    """Regret@k needs k candidates per target: rejected up front, as `select` rejects it."""
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")
    row = con.execute("""SELECT target, count(*) AS n FROM analysis_transfers
                         WHERE setup = ? AND source <> target AND list_contains(?, target)
                         GROUP BY target ORDER BY n, target LIMIT 1""", [setup, targets]).fetchone()
    if row and k > row[1]:
        raise AnalysisError(f"k={k} but target '{row[0]}' has only {row[1]} candidate sources")


# -- handlers -------------------------------------------------------------------------------------------
def _cmd_import(args: argparse.Namespace) -> int:
    from analysis.importers.its import import_its
    from analysis.importers.taskweb import import_task_sizes, import_taskweb
    from analysis.store.duck import open_store

    with open_store(args.db, create=True) as con:
        if args.what == "taskweb":
            report = import_taskweb(con, args.path, strict=args.strict)
        elif args.what == "its":
            report = import_its(con, args.path, strict=args.strict)
        else:
            report = import_task_sizes(con, args.path, strict=args.strict)
    if args.json:
        _dump(report.to_dict())
    else:
        for name, n in report.kept.items():
            print(f"imported {n} rows from {name}")
        for name in report.missing:
            print(f"not found: {name}")
        for note in report.notes:
            print(f"note: {note}")
    for bad in report.skipped:
        print(f"skipped malformed row: {bad}", file=sys.stderr)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from analysis import transfer as an
    from analysis.store.duck import read_store

    if args.setup is None:
        args.setup = "all" if args.what == "transitivity" else an.MEAN
    with read_store(args.db) as con:
        if args.what == "matrix":
            m = an.transfer_matrix(con, args.setup)
            if args.json:
                _dump({"setup": args.setup, "matrix": {s: {t: v for t, v in row.items() if not math.isnan(v)}
                                                       for s, row in m.iterrows()}})
            else:
                print(m.round(3).to_string(na_rep="-"))
        elif args.what == "commutativity":
            c = an.commutativity(con, args.setup)
            if args.json:
                _dump(c)
            else:
                print(f"setup {c['setup']}: {c['n_commutative']} of {c['n_pairs']} unordered pairs share a sign "
                      f"({c['n_non_commutative']} do not)")
                _table(["task_a", "task_b", "score_ab", "score_ba", "commutative"],
                       [tuple(p.values()) for p in c["pairs"]])
        elif args.what == "transitivity":
            setups = None if args.setup == "all" else [args.setup]
            df = an.transitivity(con, args.thresholds, setups)
            if args.json:
                _dump(df.to_dict(orient="records"))
            else:
                _table(list(df.columns), [tuple(r) for r in df.itertuples(index=False)])
        else:
            sim = an.setup_similarity(con)
            if args.json:
                _dump({a: row.to_dict() for a, row in sim.iterrows()})
            else:
                print(sim.round(3).to_string())
    return 0


def _cmd_selectors(args: argparse.Namespace) -> int:
    from analysis.selection.selectors import registered_selectors, stored_selectors
    from analysis.store.duck import read_store

    if args.registered:
        reg = registered_selectors()
        if args.json:
            _dump(reg)
        else:
            _table(["name", "needs --setup", "scores stored first", "what"],
                   [(r["name"], r["needs_setup"], r["stored"], r["doc"]) for r in reg])
        return 0
    with read_store(args.db) as con:
        rows = stored_selectors(con)
    if args.json:
        _dump(rows)
    else:
        _table(["name", "method", "pairs", "targets", "sources", "provenance", "params"],
               [(r["name"], r["method"], r["n_pairs"], r["n_targets"], r["n_sources"], r["provenance"],
                 json.dumps(r["params"], sort_keys=True)) for r in rows])
    return 0


def _cmd_compute(args: argparse.Namespace) -> int:
    from analysis.selection import selectors as sel
    from analysis.store.duck import open_store

    if args.kind == "semb":  # embed first, as roe
        from analysis.selection.prompt_similarity import semb_scores, store_semb
        from analysis.selection.roe import load_examples

        if args.protocol == "lin":  # Lin et al.: every input of the dataset, Sentence-BERT
            from analysis.selection.prompt_similarity import SEMB_LIN_MODEL, dataset_texts

            examples = args.dataset_dir or str(_data_root() / "tasks" / "natinstruct")
            texts = dataset_texts(examples, args.tasks, args.max_per_task)
            model = args.model or SEMB_LIN_MODEL
        else:
            examples = args.examples or str(_data_root() / "taskweb" / "prompted_examples_32.jsonl")
            texts = load_examples(examples, args.max_per_task, text=lambda r: str(r["input"]))
            if args.tasks:
                texts = {t: v for t, v in texts.items() if t in args.tasks}
            model = args.model
        table, params = semb_scores(texts, targets=args.targets, model=model, batch_size=args.batch_size,
                                    device=args.device)
        params["protocol"] = args.protocol
        with open_store(args.db, create=True) as con:
            name = store_semb(con, table, {**params, "examples": examples}, args.name or "semb")
        print(f"stored {table.num_rows} scores as selector '{name}'")
        return 0
    if args.kind == "roe":  # embed first: a long run must not hold the store's lock
        from analysis.selection.roe import roe_scores, store_roe

        examples = args.examples or str(_data_root() / "taskweb" / "prompted_examples_32.jsonl")
        table, params = roe_scores(examples, model=args.model, max_seq_length=args.max_seq_length,
                                   max_per_task=args.max_per_task, tasks=args.tasks, targets=args.targets,
                                   device=args.device, batch_size=args.batch_size)
        name = args.name or "roe-minilm"
        with open_store(args.db, create=True) as con:
            store_roe(con, name, table, params)
        print(f"stored {table.num_rows} scores as selector '{name}'")
        return 0
    with open_store(args.db) as con:
        if args.kind == "taskshop":
            norms = (args.f_pivot_norm, args.f_direct_norm) if args.f_pivot_norm or args.f_direct_norm else None
            if norms and None in norms:
                raise AnalysisError("give both --f-pivot-norm and --f-direct-norm, or neither")
            name = sel.compute_taskshop(con, args.setup, args.f, args.lam, norms, args.name)
            n = con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [name]).fetchone()[0]
        elif args.kind == "random":
            name = sel.compute_random(con, args.seed)
            n = con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [name]).fetchone()[0]
        else:
            name = sel.compute_size(con)
            n = con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [name]).fetchone()[0]
    print(f"stored {n} scores as selector '{name}'")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from analysis.selection.selectors import compare_selectors
    from analysis.store.duck import read_store

    with read_store(args.db) as con:
        for name in (args.a, args.b):
            _require_scores(con, name, args.db)
        res = compare_selectors(con, args.a, args.b, args.k)
    if args.json:
        _dump(res)
    else:
        _table(["measure", "value"], [(k, v) for k, v in res.items()])
    return 0


def _taskshop_f(selector: str) -> str:
    if not selector.startswith("taskshop-"):
        raise AnalysisError(f"tune-lambda tunes TaskShop: pass --selector taskshop-<F>, got '{selector}'")
    return selector[len("taskshop-"):]


def _cmd_tune(args: argparse.Namespace) -> int:
    from analysis.ranking.evaluate import TASKWEB_HELDOUT, evaluation_plan, tune_lambda
    from analysis.store.duck import read_store

    with read_store(args.db) as con:
        targets, _ = evaluation_plan(con, args.setup, args.heldout or list(TASKWEB_HELDOUT))
        _check_k(con, args.setup, targets, args.k)
        _require_scores(con, args.selector, args.db)
        res = tune_lambda(con, _taskshop_f(args.selector), args.setup, args.heldout, args.grid, args.metric, args.k)
    if args.json:
        _dump(res)
    else:
        rk = f"regret_at_{args.k}"
        print(f"held out: {', '.join(res['heldout'])}; best lambda by {res['metric']}: {res['best_lambda']:g}")
        _table(["lambda", "ndcg %", f"regret@{args.k} %"],
               [(f"{r['lambda']:g}", _pct(r["ndcg"]), _pct(r[rk])) for r in res["grid"]])
    return 0


def _families(text: str) -> list[str]:
    from analysis.ranking.families import FAMILIES, RENAMED

    names = _names(text)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        hint = "".join(f"; {n}: {RENAMED[n]}" for n in unknown if n in RENAMED)
        raise argparse.ArgumentTypeError(f"unknown metric family {', '.join(unknown) or repr(text)} "
                                         f"(choose from {', '.join(FAMILIES)}){hint}")
    return names


def _cmd_compare_all(args: argparse.Namespace) -> int:
    from analysis.ranking.comparison import compare_all, table_rows, winner_sentences
    from analysis.store.duck import read_store

    if args.targets or args.categories or args.lam is not None:
        raise AnalysisError("--selector all evaluates every target with each selector's defaults: "
                            "drop --targets / --categories / --lambda")
    with read_store(args.db) as con:
        res = compare_all(con, args.setup, args.metrics, args.k, args.seed, pool=args.pool)
    res["summary"] = winner_sentences(res)
    if args.json:
        _dump(res)
        return 0
    pool = f", pool {res['pool']}" if res["pool"] else ""
    ks = ", ".join(f"{f} k={k}" for f, k in res["k"].items())
    print(f"every selector on {res['setup']}{pool} ({ks}); metric families side by side, never mixed")
    cols, rows, reasons = table_rows(res)
    _table(cols, rows)
    for line in res["summary"]:
        print(line)
    for r in reasons:
        print(f"n/a {r}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from analysis.ranking.evaluate import evaluate_selection, evaluation_plan, load_categories
    from analysis.ranking.families import get_family
    from analysis.store.duck import read_store

    if args.selector == "all":
        return _cmd_compare_all(args)
    if len(args.metrics) != 1:
        raise AnalysisError("several metric families go with --selector all only; name one")
    args.metrics = args.metrics[0]
    if args.k is None:  # the family's paper's k (taskweb 5, lin 1)
        args.k = get_family(args.metrics).default_k
    cats = load_categories(args.categories) if args.categories else None
    with read_store(args.db) as con:
        targets, _ = evaluation_plan(con, args.setup, args.targets, cats)
        _check_k(con, args.setup, targets, args.k)
        _require_scores(con, args.selector, args.db)
        res = evaluate_selection(con, args.selector, args.setup, args.lam, args.k, args.targets, cats, args.seed,
                                 metrics=args.metrics, pool=args.pool)
    if args.json:
        _dump(res)
        return 0
    rk = f"regret_at_{args.k}"
    lam = f", lambda={res['lambda']:g}" if res["lambda"] is not None else ""
    pool = f", pool {res['pool']}" if res["pool"] else ""
    print(f"selector {res['selector']} (stored as {res['stored_as']}) on {res['setup']}{lam}{pool}, "
          f"{res['metric_family']} metrics")
    def rho(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"
    regret = get_family(args.metrics).regret  # vu defines none: no column of dashes

    def cells(v: dict) -> tuple:
        return (_pct(v["ndcg"]), *([_pct(v[rk])] if regret else []), rho(v["rho"]))
    rows = [(c, v["n_targets"], *cells(v)) for c, v in res["by_category"].items()]
    rows.append(("overall", len(res["by_target"]), *cells(res)))
    _table(["category", "targets", "NDCG %", *([f"Regret@{args.k} %"] if regret else []), "rho"], rows)
    for note in res["notes"]:
        print(f"note: {note}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from analysis.selection.source_sets import select_sources
    from analysis.store.duck import read_store

    with read_store(args.db) as con:
        _require_scores(con, args.selector, args.db)
        res = select_sources(con, args.target, args.selector, args.k, args.setup, args.lam, args.seed)
    if args.json:
        _dump(res)
    else:
        for part in ("top", "bottom", "random"):
            print(f"{part}-{args.k}: {', '.join(res[part])}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.reports.experiment import write_report
    from analysis.store.duck import read_store

    with read_store(args.db) as con:
        res = write_report(con, args.out, args.setup, tuple(args.thresholds), args.graph_top_k, args.graph_min_abs,
                           store_path=args.db, selection_setup=args.selection_setup)
    print(f"wrote {len(res['files'])} figures and {res['index']}")
    return 0


def _cmd_groups(args: argparse.Namespace) -> int:
    from analysis.pvi.grouping import plan_groups, pvi_figures, write_groups_config
    from analysis.store.duck import open_store

    if args.figures:
        try:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AnalysisError(f"--figures {args.figures}: cannot create the folder ({e.strerror})") from None

    with open_store(args.db) as con:
        plan = plan_groups(con, args.setup, args.threshold, args.rule, args.welch, args.seed, args.tasks, args.prefer)
        figures = pvi_figures(con, args.setup, args.figures, args.threshold, args.welch, args.seed) \
            if args.figures else []
    if args.write_config:
        write_groups_config(plan, args.write_config)
    if args.json:
        _dump(plan.to_dict())
        return 0
    print(f"setup {plan.setup}: {len(plan.tasks)} tasks, {len(plan.tests)} tests ({plan.variant} t-test for pairs, "
          f"one-way ANOVA for triples; similar when p > {plan.threshold:g}; seeds: {plan.seeds})")
    how = {"pvi": plan.rule, "dissimilar": "smallest p per task", "random": "same sizes as pvi, seed 0"}
    for name in ("pvi", "dissimilar", "random"):
        print(f"{name} groups ({how[name]}): " + ("; ".join(", ".join(g) for g in getattr(plan, name)) or "none"))
    _table(["tasks", "test", "n", "statistic", "p", "effect", "effect_size", "similar"],
           [(" | ".join(t.tasks), t.test, "/".join(map(str, t.n)), t.statistic, f"{t.p:.3g}", t.effect,
             t.effect_size, t.is_similar) for t in plan.tests])
    if args.write_config:
        print(f"wrote {args.write_config}")
    for f in figures:
        print(f"wrote {f}")
    return 0


# -- registration -----------------------------------------------------------------------------------------
_DB_NOTE = "Reads the store without changing it: the file stays byte-identical."


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add the analysis subcommands to the `transferlab` parser (each with a description and option help)."""
    from analysis.transfer import DEFAULT_THRESHOLDS

    thresholds = ",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS)

    def add(name: str, helptext: str, func: Callable[[argparse.Namespace], int],
            description: str = "") -> argparse.ArgumentParser:
        text = textwrap.fill(f"{helptext[0].upper()}{helptext[1:]}. {description}".strip(), 100)
        p = sub.add_parser(name, help=helptext, description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--db", default=default_db(), help="DuckDB results store (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print the result as JSON (default: a text table)")

    p = add("import", "import published results (TaskWeb release, Lin et al.'s ITS, task sizes) into the store",
            _cmd_import, "Creates the store if needed; a failed import leaves no new file behind. Re-importing a "
            "file replaces its rows (idempotent).")
    p.add_argument("what", choices=["taskweb", "its", "sizes"],
                   help="taskweb: a release folder; its: Lin et al.'s Table 7 folder; sizes: task,train_examples CSV")
    p.add_argument("path", help="the folder (e.g. ../shared/data/taskweb, ../shared/data/its) or the sizes CSV")
    p.add_argument("--strict", action="store_true", help="import nothing if any row is malformed (default: skip it)")
    json_flag(p)

    p = add("analyze", "transfer matrix, commutativity, transitivity, setup similarity", _cmd_analyze,
            "Transfer score T = 0.5*PC + 0.5*(0.2*PM - 0.1) per (source, target, setup). " + _DB_NOTE)
    p.add_argument("what", choices=["matrix", "commutativity", "transitivity", "setup-similarity"],
                   help="which analysis to print")
    p.add_argument("--setup", default=None,
                   help="ADAPTATION:MODEL or 'mean' (default: 'mean', the average over setups; "
                        "for transitivity 'all', every setup and the mean)")
    p.add_argument("--thresholds", type=_floats, default=list(DEFAULT_THRESHOLDS),
                   help=f"transitivity thresholds on T(A->B) and T(B->C), comma-separated (default: {thresholds})")
    json_flag(p)

    p = add("selectors", "list the stored selectors", _cmd_selectors,
            "Each with its method, parameters, provenance and how many pairs it scores. " + _DB_NOTE)
    p.add_argument("--registered", action="store_true",
                   help="list the registered (computable) selector names instead (default: the stored ones)")
    json_flag(p)

    p = add("compute-selector", "compute a selector's scores and store them", _cmd_compute,
            "roe: RoE from few-shot example embeddings; semb: SEMB (Lin et al.), cosine of the tasks' mean "
            "input embeddings from the same examples; taskshop: TaskShop (paper 000, Eq. 1) over a setup; "
            "random: seeded uniform scores; size: the source's training-set size.")
    p.add_argument("kind", choices=["roe", "semb", "taskshop", "random", "size"], help="which selector to compute")
    p.add_argument("--name", help="stored name (default: roe-minilm for roe; taskshop-F[SETUP,lambda=L] for taskshop)")
    p.add_argument("--examples", help="roe, semb: few-shot JSONL {task,input,choices} (default: TaskWeb's prompted_examples_32)")
    p.add_argument("--model", help="roe, semb: sentence-transformers model path or id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-seq-length", type=int, default=512,
                   help="roe: token truncation (default: %(default)s, as TaskWeb)")
    p.add_argument("--max-per-task", type=int, help="roe, semb: use only the first N examples of each task (default: all)")
    p.add_argument("--tasks", type=_names, help="roe, semb: only these tasks, comma-separated (default: all with examples)")
    p.add_argument("--targets", type=_names, help="roe, semb: score only these targets (default: every task)")
    p.add_argument("--device", help="roe, semb: torch device (default: GPU if available, else CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="roe, semb: embedding batch size (default: %(default)s)")
    p.add_argument("--f", default="roe", help="taskshop: the stored selector used as F (default: %(default)s)")
    p.add_argument("--setup", help="taskshop: transfer setup ADAPTATION:MODEL or 'mean' (required for taskshop)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.7, help="taskshop: lambda in [0, 1] (default: %(default)s)")
    p.add_argument("--f-pivot-norm", choices=["none", "zscore", "minmax"],
                   help="taskshop: normalise F in the pivot term (default: TaskWeb's for F: zscore for llm, else none)")
    p.add_argument("--f-direct-norm", choices=["none", "zscore", "minmax"],
                   help="taskshop: normalise the direct F (default: TaskWeb's for F: minmax for llm, else none)")
    p.add_argument("--seed", type=int, default=0, help="random: seed (default: %(default)s)")
    p.add_argument("--protocol", choices=["fewshot", "lin"], default="fewshot",
                   help="semb: fewshot = the few-shot examples with MiniLM; lin = Lin et al.'s SEMB, the mean over "
                        "every input of each task's dataset with Sentence-BERT (default: %(default)s)")
    p.add_argument("--dataset-dir", help="semb --protocol lin: folder of <task>.jsonl datasets with an input field "
                                         "(default: ../shared/data/tasks/natinstruct)")

    p = add("compare-selectors", "how close selector A comes to selector B", _cmd_compare,
            "Pearson and Spearman over the pairs both score, mean/max absolute difference, per-target rank "
            "correlation and top-k overlap (e.g. a recomputed RoE against the released one). " + _DB_NOTE)
    p.add_argument("a", help="stored selector name (see `transferlab selectors`)")
    p.add_argument("b", help="stored selector name to compare against")
    p.add_argument("--k", type=int, default=5, help="size of the per-target top-k overlap (default: %(default)s)")
    json_flag(p)

    p = add("tune-lambda", "tune TaskShop's lambda on held-out targets", _cmd_tune,
            "Evaluates every lambda of the grid on the held-out targets in one query and picks the best. " + _DB_NOTE)
    p.add_argument("--selector", required=True, help="taskshop-<F>, e.g. taskshop-roe (required)")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL, e.g. finetune:t5l (required)")
    p.add_argument("--heldout", type=_names, default=None, help="held-out targets, comma-separated (default: piqa, as TaskWeb)")
    p.add_argument("--grid", type=_floats, default=None, help="lambdas to try, comma-separated (default: 0,0.1,...,1)")
    p.add_argument("--metric", choices=["ndcg", "regret"], default="ndcg", help="what to optimise (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="k of Regret@k (default: %(default)s)")
    json_flag(p)

    p = add("evaluate-selection", "NDCG and Regret@k of a selector, leave-one-out over targets", _cmd_evaluate,
            "Paper 000 Table 2: per target, rank the candidate sources by the selector and compare with the "
            "ranking by transfer score; per category and overall means. " + _DB_NOTE)
    p.add_argument("--selector", required=True,
                   help="roe, llm, taskshop-roe, taskshop-llm, taskshop-<stored>, random, size, oracle, "
                        "or a stored name; 'all': every selector that applies, one table (required)")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL, e.g. finetune:t5l (required)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="TaskShop lambda (default: 0.7)")
    p.add_argument("--k", type=int, default=None,
                   help="k of Regret@k, at most the number of candidate sources (default: the metric family's "
                        "paper's: taskweb 5, lin and lin-per-seed 1)")
    p.add_argument("--targets", type=_names, default=None,
                   help="targets to evaluate, comma-separated (default: Table 2's 20 for TaskWeb data, else all)")
    p.add_argument("--categories", help="JSON/YAML category map {category: [tasks]} (default: Table 2's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selector (default: %(default)s)")
    p.add_argument("--metrics", type=_families, default=["taskweb"],
                   help="metric family: taskweb (Kim et al.), lin (Lin et al.: seed-averaged scores), lin-per-seed "
                        "(ranked per seed, then averaged), vu (rho and NDCG of Vu et al., as FUTE reports); with "
                        "--selector all, several, comma-separated, side by side (default: taskweb)")
    p.add_argument("--pool", help="rank only the sources of this pool (table source_pools, e.g. its-qa) "
                                  "(default: every candidate)")
    json_flag(p)

    p = add("select", "top-k, bottom-k and random-k sources for a target (multi-task sets)", _cmd_select,
            "Ties keep the alphabetical order of source names; the random set depends only on the candidates "
            "and the seed. " + _DB_NOTE)
    p.add_argument("--target", required=True, help="the target task (required)")
    p.add_argument("--selector", required=True, help="any selector name, or 'oracle' (the stored transfers) (required)")
    p.add_argument("--k", type=int, default=5, help="size of each set (default: %(default)s)")
    p.add_argument("--setup", help="transfer setup for taskshop-* and oracle (default: none; required for them)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="TaskShop lambda (default: 0.7)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random-k set (and the random selector) (default: %(default)s)")
    json_flag(p)

    p = add("report", "write the figures (heatmap, TaskWeb graph, transitivity, ...) and index.html", _cmd_report,
            "index.html shows every figure with a caption, the store's provenance (path, date, run counts) and "
            "a selection table (NDCG / Regret@5 per selector, paper Table 2 style). " + _DB_NOTE)
    p.add_argument("--out", default="reports", help="output folder (default: %(default)s)")
    p.add_argument("--setup", action="append",
                   help="setup(s) to draw, repeatable: ADAPTATION:MODEL or 'mean' (default: 'mean')")
    p.add_argument("--thresholds", type=_floats, default=list(DEFAULT_THRESHOLDS),
                   help=f"transitivity thresholds, comma-separated (default: {thresholds})")
    p.add_argument("--graph-top-k", type=int, default=3,
                   help="TaskWeb graph: draw each target's k strongest sources by |score| (default: %(default)s)")
    p.add_argument("--graph-min-abs", type=float, default=0.0,
                   help="TaskWeb graph: and only edges with |score| above this (default: %(default)s)")
    p.add_argument("--selection-setup",
                   help="setup of the selection table (default: the first drawn real setup, else the one with the "
                        "most transfer runs)")

    p = add("groups", "PVI task groups for multi-task learning (t-test / ANOVA within one setup)", _cmd_groups,
            "Compares per-instance PVI distributions of tasks within one setup, stores every test in pvi_tests "
            "and prints the groups. " + _DB_NOTE)
    p.add_argument("--setup", required=True, help="model family unit of the PVI runs, e.g. full:minilm (required)")
    p.add_argument("--threshold", type=float, default=0.01, help="similar when p > this (default: %(default)s)")
    p.add_argument("--rule", choices=["greedy", "cliques", "paper"], default="greedy",
                   help="greedy: disjoint groups; cliques: all maximal, overlapping; paper: Li et al.'s (triples by "
                        "ANOVA alone, per task its pair of larger |t|, overlapping) (default: %(default)s)")
    p.add_argument("--prefer", choices=["p", "size"], default="p",
                   help="greedy order: by p, or larger groups first (default: %(default)s)")
    p.add_argument("--welch", action="store_true", help="Welch's t-test for pairs (default: Student's)")
    p.add_argument("--seed", type=int, help="one seed's PVI pair (default: each instance's mean over seeds)")
    p.add_argument("--tasks", type=_names, help="only these tasks, comma-separated (default: every task)")
    p.add_argument("--write-config", help="write the YAML fragment `groups: {pvi, dissimilar, all, random, single}` here "
                                          "(default: print only)")
    p.add_argument("--figures", help="write the PVI distributions per task and the heatmap of pairwise p-values "
                                     "(PNG) into this folder (default: none)")
    json_flag(p)

    from analysis.cli.prompts import register as register_prompt_selection

    register_prompt_selection(add, json_flag, _names, _dump)

    from analysis.cli.budget import register as register_budget

    register_budget(sub, default_db)  # budget-eval, predict-transfers (analysis.budget)
