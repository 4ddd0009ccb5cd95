"""The FUTE report (paper 004): markdown with every number of the CPU experiment, and its PNG figures.

Sections: (a) a source model's MTE retrieves its own training task's DTE, vs chance; (b) embeddings by task
category, a 2-D projection; (c) source / model selection against the measured and the published transfers,
next to TaskShop, RoE and random; FUTE inside TaskShop on TaskWeb's Table 2 setups; (d) prompt selection
next to the unlabelled baselines, where the bad prompts and the duplicates land; (e) cost. Every number is
computed by `analysis.selection.fute`, `analysis.selection.fute_eval` and `analysis.selection.fute_cost`; this module only
writes them down and draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.errors import AnalysisError  # noqa: E402
from analysis.reports.experiment import _CAT_COLORS, _category  # noqa: E402
from analysis.reports.textout import pct as _pct
from analysis.selection import fute as te  # noqa: E402
from analysis.selection import fute_eval as fe  # noqa: E402

#: TaskWeb's Table 2 (paper 000), finetune:t5l, overall NDCG / Regret@5 in percent
PUBLISHED_T5L = {"TaskShop-RoE": (71.54, 2.66), "TaskShop-LLM": (59.69, 2.73), "RoE": (64.52, 4.11),
                 "LLM-similarity": (56.69, 3.67)}




def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _md_table(cols: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _label(r: dict[str, Any]) -> str:
    if r["kind"] == "DTE":
        return r["task"]
    if r["prompt"] is None:
        return f"{r['model'].split('/')[-1] if r['model'] else '?'}*"
    return f"{r['task']}:{r['prompt']}"


# -- figures ------------------------------------------------------------------------------------------------------
def projection_figure(con: duckdb.DuckDBPyConnection, space: str, path: Path) -> dict[str, Any]:
    """PCA of the space's normalised embeddings; colour = task category, marker = DTE / source-model MTE /
    prompt MTE."""
    rows, xy, ratio = te.projection_2d(con, space)
    cats = sorted({_category(r["task"]) for r in rows})
    color = {c: _CAT_COLORS[i % len(_CAT_COLORS)] for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(9, 7))
    for r, (x, y) in zip(rows, xy, strict=True):
        kind = "DTE" if r["kind"] == "DTE" else ("source model" if r["prompt"] is None else "model + prompt")
        marker = {"DTE": "o", "source model": "^", "model + prompt": "s"}[kind]
        bad = bool(r["prompt"] and r["prompt"].startswith("bad"))
        ax.scatter(x, y, c=color[_category(r["task"])], marker=marker, s=90 if kind == "DTE" else 60,
                   edgecolors="black" if bad else "none", linewidths=1.5)
        ax.annotate(_label(r), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for c in cats:
        ax.scatter([], [], c=color[c], marker="o", label=c)
    for name, m in (("DTE", "o"), ("MTE of a source model (*)", "^"), ("MTE of MiniLM + prompt", "s")):
        ax.scatter([], [], c="grey", marker=m, label=name)
    ax.scatter([], [], facecolors="white", edgecolors="black", marker="s", label="bad prompt")
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
    ax.set_title("FUTE task embeddings (TaskEmb, MiniLM surrogate): 2-D PCA of the normalised vectors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"file": path.name, "variance": ratio, "n": len(rows)}


def retrieval_figure(con: duckdb.DuckDBPyConnection, space: str, path: Path) -> None:
    """Cosine of each MTE (rows: source models, then model + prompt) with each DTE (columns)."""
    dtes = te.dte_rows(con, space)
    tasks = sorted(dtes, key=lambda t: (_category(t), t))
    mtes = [r for r in te.embedding_rows(con, space=space, kind="MTE")]
    mtes.sort(key=lambda r: (r["prompt"] is not None, r["task"], r["prompt"] or r["model"]))
    cos = te.cosine_matrix(con, [dtes[t] for t in tasks] + mtes)[len(tasks):, :len(tasks)]
    fig, ax = plt.subplots(figsize=(0.7 * len(tasks) + 4, 0.38 * len(mtes) + 2))
    im = ax.imshow(cos, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), [f"{t}\n({_category(t)})" for t in tasks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(mtes)), [_label(r) for r in mtes], fontsize=7)
    for i, r in enumerate(mtes):
        j = tasks.index(r["task"]) if r["task"] in tasks else None
        best = int(np.argmax(cos[i]))
        ax.text(best, i, "max", ha="center", va="center", fontsize=6, color="white")
        if j is not None:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.colorbar(im, ax=ax, label="cos(MTE, DTE)")
    ax.set_title("cos(MTE, DTE): red box = the black box's own task, 'max' = the row's nearest DTE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prompt_figure(results: list[dict[str, Any]], path: Path) -> None:
    """Per task (columns) and FUTE space (rows): each prompt's FUTE cosine against its measured accuracy (bad
    prompts in red)."""
    variants = [m for m in results[0]["methods"] if m.startswith("fute [")] or ["fute"]
    fig, axes = plt.subplots(len(variants), len(results), figsize=(5.5 * len(results), 4.2 * len(variants)),
                             squeeze=False)
    for row, method in enumerate(variants):
        for ax, res in zip(axes[row], results, strict=True):
            fute = res["methods"][method]["scores"]
            for p in res["prompts"]:
                ax.scatter(fute[p], res["true_scores"][p], c="#c44e52" if p.startswith("bad") else "#4c72b0", s=50)
                ax.annotate(p, (fute[p], res["true_scores"][p]), fontsize=7, xytext=(4, 3), textcoords="offset points")
            ax.set_xlabel(f"{method}: cos(MTE(model + prompt), DTE(task))", fontsize=8)
            ax.set_ylabel("measured accuracy of the prompt")
            ax.set_title(f"{res['task']}: {res['n_prompts']} prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def taskshop_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """FUTE's NDCG (family `vu`) of each method on each published setup."""
    ok = [r for r in rows if "error" not in r]
    setups = list(dict.fromkeys(r["setup"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    fig, ax = plt.subplots(figsize=(1.6 * len(setups) + 4, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((100 * r["ndcg"] for r in ok if r["method"] == m and r["setup"] == s), np.nan) for s in setups]
        ax.bar(np.arange(len(setups)) + i * width, vals, width, label=m, color=_CAT_COLORS[i % len(_CAT_COLORS)])
    ax.set_xticks(np.arange(len(setups)) + 0.4 - width / 2, setups, rotation=20, fontsize=8)
    ax.set_ylabel("NDCG (%), FUTE's metric (vu)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Source selection on the published TaskWeb transfers (leave-one-out, 20 targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------------------------------
def _dte_separation(con: duckdb.DuckDBPyConnection, space: str, category_of: dict[str, str]) -> dict[str, Any]:
    rows = te.embedding_rows(con, space=space, kind="DTE")
    cos = te.cosine_matrix(con, rows)
    within, across = [], []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            same = category_of.get(rows[i]["task"]) == category_of.get(rows[j]["task"])
            (within if same else across).append(cos[i, j])
    return {"within": float(np.mean(within)) if within else None, "across": float(np.mean(across)) if across else None,
            "n_within": len(within), "n_across": len(across)}


def space_summary(con: duckdb.DuckDBPyConnection, space: str, model: str, prompt_tasks: list[str]) -> dict[str, Any]:
    """Retrieval, DTE category separation and FUTE's prompt ranking of one space, for a side-by-side table."""
    sid = te.resolve_space(con, space)
    info = next(s for s in te.spaces(con) if s["space"] == sid)
    spec = con.execute("SELECT spec::VARCHAR FROM embedding_spaces WHERE space = ?", [sid]).fetchone()[0]
    head = (json.loads(spec).get("surrogate") or {}).get("head", "?")
    ret = te.own_task_retrieval(con, sid)
    sep = _dte_separation(con, sid, {r["task"]: _category(r["task"]) for r in te.embedding_rows(con, space=sid, kind="DTE")})
    ndcgs, bad = [], {}
    for task in prompt_tasks:
        try:
            res = fe.prompt_selection(con, sid, model, task)
        except AnalysisError:
            continue
        ndcgs.append(res["methods"]["fute"]["ndcg"])
        bad[task] = f"{', '.join(map(str, res['bad_positions']['fute']))} of {res['n_prompts']}"
    return {"space": sid, "name": info["name"], "head": f"{head} / {info['variant']}", "mean_rank": ret.get("mean_rank"),
            "chance_mean_rank": ret.get("chance_mean_rank"), "top1": f"{ret.get('top1', 0)}/{ret['n_models']}",
            "within": sep["within"], "across": sep["across"],
            "prompt_ndcg": float(np.mean(ndcgs)) if ndcgs else None, "bad_positions": bad}
#: the columns of a selection table: FUTE's metrics (family `vu`, Sec. 4.1.1), TaskWeb's beside them for TaskShop
_VU_COLS = ["NDCG (vu)", "rho (vu)"]
_TASKWEB_COLS = ["NDCG (taskweb)", "Regret@5 (taskweb)", "rho (taskweb)"]


def _selection_rows(rows: list[dict[str, Any]], taskweb: bool = False) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): method, setup, vu NDCG % and rho [, taskweb NDCG %, Regret@5 % and rho], size, reads."""
    cols = ["method", "setup", *_VU_COLS, *(_TASKWEB_COLS if taskweb else []), "targets x candidates",
            "reads of the target"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["method"], r["setup"], *["-"] * (len(cols) - 3), f"n/a: {r['error'][:90]}"])
            continue
        tw = r.get("taskweb", {})
        out.append([r["method"], r["setup"], _pct(r["ndcg"]), _num(r["rho"]),
                    *([_pct(tw.get("ndcg")), _pct(tw.get("regret")), _num(tw.get("rho"))] if taskweb else []),
                    f"{r['n_targets']} x {r['n_candidates']:.1f}", r.get("reads_of_target", "")])
    return cols, out


def _retrieval_section(con: duckdb.DuckDBPyConnection, space: str, info: dict[str, Any], out: Path,
                       numbers: dict[str, Any]) -> list[str]:
    """(a) how well each source model's MTE retrieves its own training task's DTE, and the figure."""
    ret = te.own_task_retrieval(con, space)
    numbers["retrieval"] = ret
    retrieval_figure(con, space, out / "retrieval.png")
    md = ["## (a) A model's MTE retrieves its own training task's DTE", ""]
    if ret["n_models"]:
        md += [f"Each source model labels the {info['name']} probe pool; its MTE is compared with the DTE of each of "
               f"{ret['n_candidates']} tasks. Mean rank of its own task: **{ret['mean_rank']:.2f}** (chance "
               f"{ret['chance_mean_rank']:.2f}); top-1 {ret['top1']}/{ret['n_models']} (chance "
               f"{100 * ret['chance_top1']:.0f}%); MRR {ret['mrr']:.2f} (chance {ret['chance_mrr']:.2f}).", ""]
        md += _md_table(["model", "trained on", "rank of own DTE", "cos(own)", "nearest DTEs"],
                        [[m["model"], m["source_task"], m["rank"], _num(m["cosine_own"], 4), ", ".join(m["top"])]
                         for m in ret["models"]])
    return md + ["![cos(MTE, DTE)](retrieval.png)", ""]


def _category_section(con: duckdb.DuckDBPyConnection, space: str, out: Path, numbers: dict[str, Any]) -> list[str]:
    """(b) cosine within vs across task categories (all embeddings, DTEs alone) and the 2-D projection."""
    proj = projection_figure(con, space, out / "projection.png")
    cats = {r["task"]: _category(r["task"]) for r in te.embedding_rows(con, space=space)}
    sep = te.category_separation(con, space, cats)
    dte_cats = {r["task"]: _category(r["task"]) for r in te.embedding_rows(con, space=space, kind="DTE")}
    sep_dte = _dte_separation(con, space, dte_cats)
    numbers["categories"] = {"all": sep, "dte": sep_dte}
    return ["## (b) Embeddings by task category", "",
            f"Mean cosine of two embeddings whose tasks share a category: **{_num(sep['within'], 4)}** "
            f"({sep['n_within']} pairs); across categories: **{_num(sep['across'], 4)}** ({sep['n_across']} pairs). "
            f"DTEs alone: {_num(sep_dte['within'], 4)} within ({sep_dte['n_within']} pairs), "
            f"{_num(sep_dte['across'], 4)} across ({sep_dte['n_across']}). "
            f"Categories: {', '.join(f'{t} {c}' for t, c in sorted(dte_cats.items()))}.", "",
            f"![projection](projection.png) (PCA, {100 * sum(proj['variance']):.0f}% of the variance in 2-D)", ""]


def _local_selection_md(con: duckdb.DuckDBPyConnection, space: str, local_setup: str,
                        numbers: dict[str, Any]) -> list[str]:
    """(c) FUTE, RoE, TaskShop-RoE and random against the transfer matrix the pairwise job measured."""
    local_rows = fe.source_selection_table(con, [
        ("FUTE: cos(MTE of the source model, DTE)", f"fute-mte@{space}", fe.TARGET_DATA["fute"]),
        ("FUTE: cos(DTE, DTE)", f"fute-dte@{space}", fe.TARGET_DATA["fute"]),
        ("RoE (released scores)", "roe", fe.TARGET_DATA["roe"]),
        ("TaskShop-RoE on the local matrix", "taskshop-roe", fe.TARGET_DATA["roe"]),
        ("random", "random", fe.TARGET_DATA["random"])], [local_setup])
    numbers["local_selection"] = local_rows
    md = [f"Against the transfer matrix measured by the pairwise job (setup `{local_setup}`), with FUTE's "
          "metrics (Sec. 4.1.1, after Vu et al. 2020; family `vu`): NDCG in percent (relevance = the "
          "seed-averaged target score in percent, gain 2^rel - 1, over the whole ranking) and rho = mean rank "
          "of the source with the highest transfer gain (lower is better); 'targets x candidates' says how "
          "small this test is.", ""]
    return md + _md_table(*_selection_rows(local_rows))


def _published_dte_selection_md(con: duckdb.DuckDBPyConnection, space: str, setup: str,
                                numbers: dict[str, Any]) -> list[str]:
    """(c) this space's DTEs ranking each other as sources on the published TaskWeb transfers of `setup`."""
    dtes = sorted(te.dte_rows(con, space))
    pool = fe.ensure_pool(con, "fute-local-dtes", dtes)
    dte_rows_ = fe.source_selection_table(con, [
        ("FUTE: cos(DTE, DTE)", f"fute-dte@{space}", fe.TARGET_DATA["fute"]),
        ("RoE", "roe", fe.TARGET_DATA["roe"]), ("TaskShop-RoE", "taskshop-roe", fe.TARGET_DATA["roe"]),
        ("random", "random", fe.TARGET_DATA["random"])], [setup], targets=dtes, pool=pool)
    numbers["published_dte_selection"] = dte_rows_
    md = [f"This space's {len(dtes)} DTEs ranking each other as sources on the published TaskWeb transfers "
          f"({setup}; candidates: the other {len(dtes) - 1} tasks):", ""]
    return md + _md_table(*_selection_rows(dte_rows_))


def _published_model_selection_md(con: duckdb.DuckDBPyConnection, space: str, setup: str,
                                  numbers: dict[str, Any]) -> list[str]:
    """(c) the space's source models ranked for the published transfers of `setup` (none: no lines)."""
    models = sorted({r["source_task"] for r in te.embedding_rows(con, space=space, kind="MTE") if r["source_task"]})
    if not models:
        return []
    pool = fe.ensure_pool(con, "fute-local-models", models)
    targets = sorted(te.dte_rows(con, space))
    pub_rows = fe.source_selection_table(con, [
        ("FUTE: cos(MTE of the source model, DTE)", f"fute-mte@{space}", fe.TARGET_DATA["fute"]),
        ("FUTE: cos(DTE, DTE)", f"fute-dte@{space}", fe.TARGET_DATA["fute"]),
        ("RoE", "roe", fe.TARGET_DATA["roe"]), ("TaskShop-RoE", "taskshop-roe", fe.TARGET_DATA["roe"]),
        ("random", "random", fe.TARGET_DATA["random"])], [setup], targets=targets, pool=pool)
    numbers["published_model_selection"] = pub_rows
    md = [f"The same source models ranked for the published TaskWeb transfers ({setup}) into the "
          f"{len(targets)} tasks with a DTE here, candidates restricted to the models' tasks "
          f"({', '.join(models)}):", ""]
    return md + _md_table(*_selection_rows(pub_rows))


def _taskshop_section(con: duckdb.DuckDBPyConnection, taskweb_space: str, taskweb_setups: list[str], out: Path,
                      numbers: dict[str, Any]) -> list[str]:
    """(c) FUTE as TaskShop's F on TaskWeb's Table 2 setups, both metric families, and the figure."""
    ts = fe.taskshop_with_fute(con, taskweb_space, taskweb_setups)
    numbers["taskshop"] = ts
    taskshop_figure(ts["rows"], out / "taskshop.png")
    tinfo = next(s for s in te.spaces(con) if s["space"] == ts["space"])
    md = ["### FUTE inside TaskShop on the published TaskWeb transfers", "",
          f"F = cos(DTE(s), DTE(t)) in space `{tinfo['name']}` (id `{ts['space']}`: {tinfo['variant']}, "
          f"{tinfo['dims']} dims, one DTE per task from its 32 prompted examples). TaskWeb's Table 2 protocol: "
          "leave-one-out, 20 targets; FUTE's metrics (`vu`: NDCG on the seed-averaged target scores, rho = "
          "mean rank of the source with the highest transfer gain) next to TaskWeb's (`taskweb`: NDCG over "
          "the gold ranks of T(s -> t), Regret@5, rho of the source with the highest T), in percent. "
          f"TaskShop-FUTE with TaskWeb's lambda 0.7 and with lambda tuned on piqa for FUTE ({ts['tuned_lambda']:g}). "
          "Published finetune:t5l (Table 2): "
          + "; ".join(f"{m} {a:.2f} / {b:.2f}" for m, (a, b) in PUBLISHED_T5L.items()) + ".", ""]
    md += _md_table(*_selection_rows(ts["rows"], taskweb=True))
    t5l = {r["method"]: r for r in ts["rows"] if r.get("setup") == taskweb_setups[0] and "error" not in r}
    for fam, ndcg in (("vu", lambda r: r["ndcg"]), ("taskweb", lambda r: r["taskweb"]["ndcg"])):
        best = max(t5l.values(), key=ndcg) if t5l else None
        if best is None:
            continue
        fute_rows = [r for m, r in t5l.items() if "FUTE" in m]
        top = max(fute_rows, key=ndcg) if fute_rows else None
        md += [f"On {taskweb_setups[0]} the best {fam} NDCG is {best['method']} ({_pct(ndcg(best))}); FUTE's best "
               f"variant reaches {_pct(ndcg(top)) if top else '-'} ({top['method'] if top else '-'}).", ""]
    return md + ["![TaskShop](taskshop.png)", ""]


def _prompt_results(con: duckdb.DuckDBPyConnection, space: str, model: str, prompt_tasks: list[str],
                    compare_spaces: list[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """(d) per task the prompt-selection result with FUTE of every space next to the same baselines, and
    a line per task that could not be evaluated."""
    presults, failed = [], []
    for task in prompt_tasks:
        try:
            res = fe.prompt_selection(con, space, model, task)
        except AnalysisError as e:
            failed.append(f"- {task}: not evaluated: {e}")
            continue
        for other in [space, *(compare_spaces or [])]:  # FUTE of every space next to the same baselines
            o = res if other == space else fe.prompt_selection(con, other, model, task)
            name = f"fute [{next(x['name'] for x in te.spaces(con) if x['space'] == o['space'])}]"
            res["methods"][name] = o["methods"]["fute"]
            res["bad_positions"][name] = o["bad_positions"]["fute"]
        del res["bad_positions"]["fute"]
        presults.append(res)
    return presults, failed


def _prompt_task_md(res: dict[str, Any], primary: str, space_name: str) -> list[str]:
    """(d) one task: measured accuracies, FUTE's ranking, where each method puts the bad prompts, duplicates."""
    n = res["n_prompts"]
    md = [f"**{res['task']}** ({n} prompts, {res['n_examples']} eval examples). Measured accuracy: "
          + ", ".join(f"{p} {100 * a:.1f}" for p, a in sorted(res["true_scores"].items(), key=lambda x: -x[1]))
          + ".", ""]
    md += [f"FUTE's ranking in {space_name}: {', '.join(res['methods'][primary]['ranking'])}.", ""]
    md += _md_table(["method", f"positions of the bad prompts (of {n})", "selected", "NDCG"],
                    [[m, ", ".join(map(str, pos)), res["methods"][m]["selected"], _pct(res["methods"][m]["ndcg"])]
                     for m, pos in res["bad_positions"].items()])
    for d in res["duplicates"]:
        md += [f"Duplicate `{d['copy']}` of `{d['prompt']}`: cos(MTE, MTE) = {d['mte_cosine']:.6f}, FUTE "
               f"positions {d['positions'][0]} and {d['positions'][1]}.", ""]
    return md


def _prompt_section(con: duckdb.DuckDBPyConnection, space: str, info: dict[str, Any], model: str,
                    prompt_tasks: list[str], compare_spaces: list[str] | None, out: Path,
                    numbers: dict[str, Any]) -> list[str]:
    """(d) prompt selection: FUTE next to the unlabelled baselines, the means over tasks and each task."""
    md = ["## (d) Prompt selection", ""]
    presults, failed = _prompt_results(con, space, model, prompt_tasks, compare_spaces)
    md += failed
    numbers["prompts"] = presults
    if not presults:
        return md
    prompt_figure(presults, out / "prompts.png")
    summary = {m: v for m, v in fe.prompt_selection_summary(presults).items() if m != "fute"}
    numbers["prompt_summary"] = summary
    na = presults[0].get("not_applicable", {})
    md += [f"{model} with every prompt of {', '.join(prompt_tasks)} (plus bad and duplicated ones). Means over "
           "the tasks: Performance = accuracy of the selected prompt, Rate = selected / best prompt, NDCG "
           "(relevance = accuracy in percent, gain 2^rel - 1), rho = mean rank of the best prompt. "
           "'uses labels': FUTE's DTE is trained on labelled target data; every baseline reads only the "
           "unlabelled choice distributions."
           + (f" Not applicable: {'; '.join(f'{k}: {v}' for k, v in na.items())}." if na else ""), ""]
    md += _md_table(["method", "Performance", "Rate", "NDCG", "rho", "uses labels"],
                    [[m, _pct(v["performance"]), _pct(v["rate"]), _pct(v["ndcg"]), _num(v["rho"]),
                      "yes (DTE)" if v["uses_labels"] else "no"] for m, v in summary.items()])
    for res in presults:
        md += _prompt_task_md(res, f"fute [{info['name']}]", info["name"])
    return md + ["![prompts](prompts.png)", ""]


def _spaces_section(con: duckdb.DuckDBPyConnection, space: str, compare_spaces: list[str], model: str,
                    prompt_tasks: list[str], numbers: dict[str, Any]) -> list[str]:
    """The same measures in each space of the experiment, one row per space."""
    rows = [space_summary(con, other, model, prompt_tasks) for other in [space, *compare_spaces]]
    numbers["spaces"] = rows
    md = ["## The same measures in each space of the experiment", "",
          "One probe pool, the same black boxes, data, seed and hyperparameters; only the surrogate differs.", ""]
    return md + _md_table(["space", "head / variant", "own-task rank of a source model's MTE (chance)", "top-1",
                           "cos within / across categories (DTEs)", "FUTE prompt NDCG", "bad prompts' positions"],
                          [[r["name"], r["head"], f"{_num(r['mean_rank'])} ({_num(r['chance_mean_rank'])})",
                            r["top1"], f"{_num(r['within'], 3)} / {_num(r['across'], 3)}", _pct(r["prompt_ndcg"]),
                            "; ".join(f"{t}: {p}" for t, p in r["bad_positions"].items())] for r in rows])


def write_fute_report(con: duckdb.DuckDBPyConnection, out: str | Path, space: str, model: str,
                      prompt_tasks: list[str], local_setup: str | None, taskweb_space: str | None = None,
                      taskweb_setups: list[str] | None = None, cost: dict[str, Any] | None = None,
                      notes: list[str] | None = None, compare_spaces: list[str] | None = None) -> dict[str, Any]:
    """Write report.md and the figures into `out`; returns the numbers it wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = te.resolve_space(con, space)
    info = next(s for s in te.spaces(con) if s["space"] == space)
    md = ["# FUTE on a CPU: unified task embeddings (paper 004)", ""]
    md += [f"Space `{info['name']}` (id `{space}`, seed {info['seed']}): {info['variant']}, {info['dims']} dims, "
           f"{info['n_dte']} DTEs and {info['n_mte']} MTEs. Every number below is of this space unless it says "
           "otherwise.", ""]
    md += [f"- {n}" for n in notes or []] + ([""] if notes else [])
    numbers: dict[str, Any] = {"space": space}
    md += _retrieval_section(con, space, info, out, numbers)
    md += _category_section(con, space, out, numbers)
    md += ["## (c) Source and model selection", ""]
    if local_setup:
        md += _local_selection_md(con, space, local_setup, numbers)
        if taskweb_setups:
            md += _published_dte_selection_md(con, space, taskweb_setups[0], numbers)
            md += _published_model_selection_md(con, space, taskweb_setups[0], numbers)
    if taskweb_space and taskweb_setups:
        md += _taskshop_section(con, taskweb_space, taskweb_setups, out, numbers)
    md += _prompt_section(con, space, info, model, prompt_tasks, compare_spaces, out, numbers)
    if compare_spaces:
        md += _spaces_section(con, space, compare_spaces, model, prompt_tasks, numbers)
    if cost:
        md += ["## (e) Cost: FUTE's O((k_p + k_D) c) against the baselines' O(k_p k_D c)", ""] + cost["lines"] + [""]
        numbers["cost"] = cost
    (out / "report.md").write_text("\n".join(md))
    return numbers
