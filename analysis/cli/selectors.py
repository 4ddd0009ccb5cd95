"""`transferlab selectors | compute-selector | compare-selectors | tune-lambda`: list the stored selectors,
compute and store one (roe, semb, taskshop, random, size), compare two, and tune TaskShop's lambda."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from analysis.cli.common import (
    DB_NOTE,
    add_command,
    check_k,
    data_root,
    dump,
    floats,
    json_flag,
    names,
    pct,
    require_scores,
    table,
)
from analysis.errors import AnalysisError


def _cmd_selectors(args: argparse.Namespace) -> int:
    from analysis.selection.selectors import (  # lazy: duckdb only when a store is opened
        registered_selectors,
        stored_selectors,
    )
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    if args.registered:
        reg = registered_selectors()
        if args.json:
            dump(reg)
        else:
            table(["name", "needs --setup", "scores stored first", "what"],
                  [(r["name"], r["needs_setup"], r["stored"], r["doc"]) for r in reg])
        return 0
    with read_store(args.db) as con:
        rows = stored_selectors(con)
    if args.json:
        dump(rows)
    else:
        table(["name", "method", "pairs", "targets", "sources", "provenance", "params"],
              [(r["name"], r["method"], r["n_pairs"], r["n_targets"], r["n_sources"], r["provenance"],
                json.dumps(r["params"], sort_keys=True)) for r in rows])
    return 0


def _default_examples() -> str:
    return str(data_root() / "taskweb" / "prompted_examples_32.jsonl")


def _compute_semb(args: argparse.Namespace) -> str:
    """SEMB: embed first (as roe), then store; returns the stored name."""
    from analysis.selection.prompt_similarity import (  # lazy: duckdb only when a store is opened
        semb_scores,
        store_semb,
    )
    from analysis.selection.roe import load_examples  # lazy: duckdb only when a store is opened
    from analysis.store.duck import open_store  # lazy: duckdb only when a store is opened

    if args.protocol == "lin":  # Lin et al.: every input of the dataset, Sentence-BERT
        from analysis.selection.prompt_similarity import (  # lazy: duckdb only when a store is opened
            SEMB_LIN_MODEL,
            dataset_texts,
        )

        examples = args.dataset_dir or str(data_root() / "tasks" / "natinstruct")
        texts = dataset_texts(examples, args.tasks, args.max_per_task)
        model = args.model or SEMB_LIN_MODEL
    else:
        examples = args.examples or _default_examples()
        texts = load_examples(examples, args.max_per_task, text=lambda r: str(r["input"]))
        if args.tasks:
            texts = {t: v for t, v in texts.items() if t in args.tasks}
        model = args.model
    scores, params = semb_scores(texts, targets=args.targets, model=model, batch_size=args.batch_size,
                                 device=args.device)
    params["protocol"] = args.protocol
    with open_store(args.db, create=True) as con:
        name = store_semb(con, scores, {**params, "examples": examples}, args.name or "semb")
    print(f"stored {scores.num_rows} scores as selector '{name}'")
    return name


def _compute_roe(args: argparse.Namespace) -> str:
    """RoE: embed first, a long run must not hold the store's lock; returns the stored name."""
    from analysis.selection.roe import roe_scores, store_roe  # lazy: duckdb only when a store is opened
    from analysis.store.duck import open_store  # lazy: duckdb only when a store is opened

    examples = args.examples or _default_examples()
    scores, params = roe_scores(examples, model=args.model, max_seq_length=args.max_seq_length,
                                max_per_task=args.max_per_task, tasks=args.tasks, targets=args.targets,
                                device=args.device, batch_size=args.batch_size)
    name = args.name or "roe-minilm"
    with open_store(args.db, create=True) as con:
        store_roe(con, name, scores, params)
    print(f"stored {scores.num_rows} scores as selector '{name}'")
    return name


def _compute_in_store(args: argparse.Namespace) -> str:
    """taskshop, random, size: computed from what the store holds; returns the stored name."""
    from analysis.selection import selectors as sel  # lazy: duckdb only when a store is opened
    from analysis.store.duck import open_store  # lazy: duckdb only when a store is opened

    with open_store(args.db) as con:
        if args.kind == "taskshop":
            norms = (args.f_pivot_norm, args.f_direct_norm) if args.f_pivot_norm or args.f_direct_norm else None
            if norms and None in norms:
                raise AnalysisError("give both --f-pivot-norm and --f-direct-norm, or neither")
            name = sel.compute_taskshop(con, args.setup, args.f, args.lam, norms, args.name)
        elif args.kind == "random":
            name = sel.compute_random(con, args.seed)
        else:
            name = sel.compute_size(con)
        n = con.execute("SELECT count(*) FROM selector_scores WHERE selector = ?", [name]).fetchone()[0]
    print(f"stored {n} scores as selector '{name}'")
    return name


def _cmd_compute(args: argparse.Namespace) -> int:
    compute = {"semb": _compute_semb, "roe": _compute_roe}.get(args.kind, _compute_in_store)
    compute(args)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from analysis.selection.selectors import compare_selectors  # lazy: duckdb only when a store is opened
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    with read_store(args.db) as con:
        for name in (args.a, args.b):
            require_scores(con, name, args.db)
        res = compare_selectors(con, args.a, args.b, args.k)
    if args.json:
        dump(res)
    else:
        table(["measure", "value"], [(k, v) for k, v in res.items()])
    return 0


def _taskshop_f(selector: str) -> str:
    if not selector.startswith("taskshop-"):
        raise AnalysisError(f"tune-lambda tunes TaskShop: pass --selector taskshop-<F>, got '{selector}'")
    return selector[len("taskshop-"):]


def _cmd_tune(args: argparse.Namespace) -> int:
    from analysis.ranking.evaluate import (  # lazy: duckdb only when a store is opened
        TASKWEB_HELDOUT,
        evaluation_plan,
        tune_lambda,
    )
    from analysis.store.duck import read_store  # lazy: duckdb only when a store is opened

    with read_store(args.db) as con:
        targets, _ = evaluation_plan(con, args.setup, args.heldout or list(TASKWEB_HELDOUT))
        check_k(con, args.setup, targets, args.k)
        require_scores(con, args.selector, args.db)
        res = tune_lambda(con, _taskshop_f(args.selector), args.setup, args.heldout, args.grid, args.metric, args.k)
    if args.json:
        dump(res)
    else:
        rk = f"regret_at_{args.k}"
        print(f"held out: {', '.join(res['heldout'])}; best lambda by {res['metric']}: {res['best_lambda']:g}")
        table(["lambda", "ndcg %", f"regret@{args.k} %"],
              [(f"{r['lambda']:g}", pct(r["ndcg"]), pct(r[rk])) for r in res["grid"]])
    return 0


# -- parsers ---------------------------------------------------------------------------------------------
def _add_selectors(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "selectors", "list the stored selectors", _cmd_selectors,
                    "Each with its method, parameters, provenance and how many pairs it scores. " + DB_NOTE)
    p.add_argument("--registered", action="store_true",
                   help="list the registered (computable) selector names instead (default: the stored ones)")
    json_flag(p)


def _add_embedding_options(p: argparse.ArgumentParser) -> None:
    """compute-selector's options of the embedding selectors (roe, semb)."""
    p.add_argument("--examples", help="roe, semb: few-shot JSONL {task,input,choices} (default: TaskWeb's prompted_examples_32)")
    p.add_argument("--model", help="roe, semb: sentence-transformers model path or id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-seq-length", type=int, default=512,
                   help="roe: token truncation (default: %(default)s, as TaskWeb)")
    p.add_argument("--max-per-task", type=int, help="roe, semb: use only the first N examples of each task (default: all)")
    p.add_argument("--tasks", type=names, help="roe, semb: only these tasks, comma-separated (default: all with examples)")
    p.add_argument("--targets", type=names, help="roe, semb: score only these targets (default: every task)")
    p.add_argument("--device", help="roe, semb: torch device (default: GPU if available, else CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="roe, semb: embedding batch size (default: %(default)s)")


def _add_taskshop_options(p: argparse.ArgumentParser) -> None:
    """compute-selector's options of taskshop (and random's seed)."""
    p.add_argument("--f", default="roe", help="taskshop: the stored selector used as F (default: %(default)s)")
    p.add_argument("--setup", help="taskshop: transfer setup ADAPTATION:MODEL or 'mean' (required for taskshop)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.7, help="taskshop: lambda in [0, 1] (default: %(default)s)")
    p.add_argument("--f-pivot-norm", choices=["none", "zscore", "minmax"],
                   help="taskshop: normalise F in the pivot term (default: TaskWeb's for F: zscore for llm, else none)")
    p.add_argument("--f-direct-norm", choices=["none", "zscore", "minmax"],
                   help="taskshop: normalise the direct F (default: TaskWeb's for F: minmax for llm, else none)")
    p.add_argument("--seed", type=int, default=0, help="random: seed (default: %(default)s)")


def _add_compute(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "compute-selector", "compute a selector's scores and store them", _cmd_compute,
                    "roe: RoE from few-shot example embeddings; semb: SEMB (Lin et al.), cosine of the tasks' mean "
                    "input embeddings from the same examples; taskshop: TaskShop (paper 000, Eq. 1) over a setup; "
                    "random: seeded uniform scores; size: the source's training-set size.")
    p.add_argument("kind", choices=["roe", "semb", "taskshop", "random", "size"], help="which selector to compute")
    p.add_argument("--name", help="stored name (default: roe-minilm for roe; taskshop-F[SETUP,lambda=L] for taskshop)")
    _add_embedding_options(p)
    _add_taskshop_options(p)
    p.add_argument("--protocol", choices=["fewshot", "lin"], default="fewshot",
                   help="semb: fewshot = the few-shot examples with MiniLM; lin = Lin et al.'s SEMB, the mean over "
                        "every input of each task's dataset with Sentence-BERT (default: %(default)s)")
    p.add_argument("--dataset-dir", help="semb --protocol lin: folder of <task>.jsonl datasets with an input field "
                                         "(default: ../shared/data/tasks/natinstruct)")


def _add_compare(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "compare-selectors", "how close selector A comes to selector B", _cmd_compare,
                    "Pearson and Spearman over the pairs both score, mean/max absolute difference, per-target rank "
                    "correlation and top-k overlap (e.g. a recomputed RoE against the released one). " + DB_NOTE)
    p.add_argument("a", help="stored selector name (see `transferlab selectors`)")
    p.add_argument("b", help="stored selector name to compare against")
    p.add_argument("--k", type=int, default=5, help="size of the per-target top-k overlap (default: %(default)s)")
    json_flag(p)


def _add_tune(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    p = add_command(sub, default_db, "tune-lambda", "tune TaskShop's lambda on held-out targets", _cmd_tune,
                    "Evaluates every lambda of the grid on the held-out targets in one query and picks the best. "
                    + DB_NOTE)
    p.add_argument("--selector", required=True, help="taskshop-<F>, e.g. taskshop-roe (required)")
    p.add_argument("--setup", required=True, help="ADAPTATION:MODEL, e.g. finetune:t5l (required)")
    p.add_argument("--heldout", type=names, default=None, help="held-out targets, comma-separated (default: piqa, as TaskWeb)")
    p.add_argument("--grid", type=floats, default=None, help="lambdas to try, comma-separated (default: 0,0.1,...,1)")
    p.add_argument("--metric", choices=["ndcg", "regret"], default="ndcg", help="what to optimise (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="k of Regret@k (default: %(default)s)")
    json_flag(p)


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add `selectors`, `compute-selector`, `compare-selectors`, `tune-lambda`, in that order."""
    for add in (_add_selectors, _add_compute, _add_compare, _add_tune):
        add(sub, default_db)


