"""Figures of the transfer analyses (PNG) and an HTML page a researcher can cite from.

Figures: the transfer-matrix heatmap (paper 000, Fig. 5-12), the TaskWeb graph (Fig. 3 left; here
each target's k strongest sources, so the graph stays readable), commutativity (Fig. 13),
transitivity with its triple counts (Fig. 3 bottom-right / 14) and setup similarity (Fig. 3
top-right, diagonal left out of the colour scale). `index.html` gives each figure a caption, the
store's provenance (path, date, run counts, imported files) and a selection table in the style of
Table 2 (NDCG / Regret@k per selector). Numbers come from `analysis.transfer` and
`analysis.ranking.evaluate`; this module only draws and writes.

`write_report` evaluates selectors, which materialises derived scores (random, taskshop-*): pass a
connection from `analysis.store.duck.read_store`, so the store file is not touched.
"""

from __future__ import annotations

import datetime as dt
import html
import importlib.metadata
import math
from pathlib import Path
from typing import Any

import duckdb
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from analysis import transfer as an  # noqa: E402
from analysis.errors import AnalysisError  # noqa: E402
from analysis.ranking.evaluate import TASKWEB_CATEGORIES, _registry_category, evaluate_selection  # noqa: E402
from analysis.reports.textout import pct as _pct
from analysis.selection import selectors as sel  # noqa: E402
from analysis.store.status import mixed_stacks, stack_warning  # noqa: E402

_CAT_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
_POS, _NEG = "#1f5fbf", "#c0392b"
SCORE_FORMULA = "T = 0.5*PC + 0.5*(0.2*PM - 0.1)"
# selector methods computed from other selectors or baselines; the table evaluates them by their user-facing name
_DERIVED_METHODS = ("taskshop", "random", "oracle", "size")


def _slug(setup: str) -> str:
    return setup.replace(":", "_").replace("/", "_")


def _task_order(tasks: list[str]) -> list[str]:
    """Tasks grouped by category (Table 2's, then Table 1's for the rest), so related tasks sit together."""
    listed = [t for ts in TASKWEB_CATEGORIES.values() for t in ts]
    cats = list(TASKWEB_CATEGORIES)

    def key(t: str) -> tuple[int, int, str]:
        c = _category(t)
        return (cats.index(c) if c in cats else len(cats), listed.index(t) if t in listed else len(listed), t)
    return sorted(tasks, key=key)


def _category(task: str) -> str:
    return next((c for c, ts in TASKWEB_CATEGORIES.items() if task in ts), None) or _registry_category(task)


def setup_label(setup: str, all_setups: list[str]) -> str:
    """What a setup name means on a figure: 'mean' is an average only when there are several setups."""
    if setup != an.MEAN:
        return setup
    if len(all_setups) == 1:
        return f"{all_setups[0]}, the only setup"
    return f"mean over {len(all_setups)} setups"


# -- figures ----------------------------------------------------------------------------------------------
def heatmap(matrix: pd.DataFrame, title: str, path: Path) -> Path:
    """Source x target heatmap, diverging at 0 (blue positive, red negative), values printed."""
    rows = _task_order(list(matrix.index))
    cols = _task_order(list(matrix.columns))
    m = matrix.loc[rows, cols]
    vals = m.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(0.55 * len(cols) + 3, 7), max(0.45 * len(rows) + 2, 5)))
    im = ax.imshow(vals, cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim or -1, lim or 1), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = vals[i, j]
            if np.isfinite(v):
                ax.text(j, i, "0" if abs(v) < 0.005 else f"{v:.2f}".replace("0.", ".", 1), ha="center",
                        va="center", fontsize=6, color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.7, label=f"transfer score {SCORE_FORMULA}")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def graph_edges(matrix: pd.DataFrame, top_k: int = 3, min_abs: float = 0.0) -> pd.DataFrame:
    """Edges of the TaskWeb graph: per target, its `top_k` sources by |score| (ties by source name)
    among those with |score| > min_abs; columns source, target, score. top_k <= 0 keeps all."""
    long = matrix.rename_axis(index="source", columns="target").stack().dropna().rename("score").reset_index()
    long = long[(long["source"] != long["target"]) & (long["score"].abs() > min_abs)]
    long = long.assign(strength=long["score"].abs()).sort_values(["target", "strength", "source"],
                                                                 ascending=[True, False, True])
    if top_k > 0:
        long = long.groupby("target", sort=False).head(top_k)
    return long[["source", "target", "score"]].reset_index(drop=True)


def _circle_positions(tasks: list[str]) -> dict[str, float]:
    """Angle per task on a circle, category by category with a gap between categories."""
    slots: list[str | None] = []
    for t in tasks:
        if slots and slots[-1] is not None and _category(slots[-1]) != _category(t):
            slots.append(None)
        slots.append(t)
    if len({_category(t) for t in tasks}) > 1:
        slots.append(None)
    return {t: math.pi / 2 - 2 * math.pi * i / len(slots) for i, t in enumerate(slots) if t is not None}


def graph(matrix: pd.DataFrame, title: str, path: Path, top_k: int = 3, min_abs: float = 0.0) -> tuple[Path, int]:
    """Tasks on a circle grouped by category; per target an arrow from each of its `top_k` strongest
    sources (blue positive, red negative, width by |score|). Returns the path and the edge count."""
    tasks = _task_order(sorted(set(matrix.index) | set(matrix.columns)))
    angle = _circle_positions(tasks)
    pos = {t: (math.cos(a), math.sin(a)) for t, a in angle.items()}
    cats = list(dict.fromkeys(_category(t) for t in tasks))
    color = {c: _CAT_COLORS[i % len(_CAT_COLORS)] for i, c in enumerate(cats)}
    edges = graph_edges(matrix, top_k, min_abs)
    top = float(edges["score"].abs().max()) if len(edges) else 1.0
    fig, ax = plt.subplots(figsize=(10, 10))
    for s, t, v in sorted(edges.itertuples(index=False), key=lambda e: abs(e[2])):
        w = abs(v) / top
        ax.add_patch(FancyArrowPatch(pos[s], pos[t], arrowstyle="-|>", mutation_scale=9 + 9 * w,
                                     connectionstyle="arc3,rad=0.15", lw=0.8 + 3.2 * w,
                                     color=_POS if v > 0 else _NEG, alpha=0.45 + 0.5 * w, shrinkA=10, shrinkB=10))
    for t in tasks:
        x, y = pos[t]
        ax.scatter([x], [y], s=200, color=color[_category(t)], zorder=3, edgecolor="white")
        deg = math.degrees(angle[t]) % 360
        left = 90 < deg < 270
        ax.text(1.09 * x, 1.09 * y, t, ha="right" if left else "left", va="center", fontsize=10,
                rotation=deg - 180 if left else deg, rotation_mode="anchor")
    handles = [plt.Line2D([], [], color=_POS, lw=2.5, label="positive transfer"),
               plt.Line2D([], [], color=_NEG, lw=2.5, label="negative transfer")]
    handles += [plt.Line2D([], [], marker="o", ms=9, ls="", color=color[c], label=c) for c in cats]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=10, frameon=False)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    shown = f"each target's {top_k} strongest sources by |score|" if top_k > 0 else "all transfers"
    if min_abs > 0:
        shown += f" with |score| > {min_abs:g}"
    ax.set_title(f"{title}\narrows source -> target: {shown}; width by |score|")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path, len(edges)


def transitivity_plot(table: pd.DataFrame, path: Path, all_setups: list[str]) -> Path:
    """Top: P(T(A->C) > 0) against the threshold, one line per setup and one for the averaged matrix.
    Bottom: how many triples each point rests on (log scale)."""
    single = len(all_setups) == 1
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10")
    for i, (setup, grp) in enumerate(sorted(table.groupby("setup"), key=lambda kv: (kv[0] == an.MEAN, kv[0]))):
        if single and setup == an.MEAN:
            continue  # with one setup the averaged matrix is that setup's matrix
        grp = grp.sort_values("threshold")
        is_mean = setup == an.MEAN
        style = {"color": "black", "lw": 2.5, "ls": "--", "zorder": 3} if is_mean else \
            {"color": cmap(i % 10), "lw": 1.3, "zorder": 2}
        label = "averaged matrix ('mean')" if is_mean else setup
        ax.plot(grp["threshold"], grp["fraction"], marker="o", label=label, **style)
        axn.plot(grp["threshold"], grp["n_triples"].clip(lower=1), marker="o", **style)
    ax.set_ylabel("P(T(A->C) > 0)")
    ax.set_title("Transitivity of positive transfer: triples A->B->C with T(A->B), T(B->C) > threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axn.set_yscale("log")
    axn.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axn.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axn.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axn.set_ylabel("triples (log scale)")
    axn.set_xlabel("threshold on T(A->B) and T(B->C)")
    axn.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def offdiag_range(sim: pd.DataFrame) -> tuple[float, float]:
    """Colour limits of the similarity heatmap: min and max off the diagonal (widened when equal)."""
    vals = sim.to_numpy(dtype=float)
    off = vals[~np.eye(len(sim), dtype=bool) & np.isfinite(vals)]
    if not off.size:
        return 0.0, 1.0
    lo, hi = float(off.min()), float(off.max())
    return (lo - 0.05, hi + 0.05) if hi - lo < 1e-9 else (lo, hi)


def similarity_plot(sim: pd.DataFrame, path: Path) -> Path:
    """Cosine similarity of setups' matrices; the diagonal (1 by definition) is grey and outside the
    colour scale, so the scale spans the off-diagonal values."""
    vals = sim.to_numpy(dtype=float)
    masked = np.ma.masked_where(np.eye(len(sim), dtype=bool) | ~np.isfinite(vals), vals)
    lo, hi = offdiag_range(sim)
    fig, ax = plt.subplots(figsize=(1.0 * len(sim) + 3, 0.9 * len(sim) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(masked, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(len(sim.columns)), sim.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(sim.index)), sim.index, fontsize=8)
    for i in range(len(sim.index)):
        for j in range(len(sim.columns)):
            v = vals[i, j]
            if i == j or not np.isfinite(v):
                ax.text(j, i, "1" if i == j else "", ha="center", va="center", fontsize=8, color="#777777")
                continue
            dark = (v - lo) / (hi - lo) < 0.55
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity (off-diagonal range)")
    ax.set_title("Similarity of setups' transfer matrices")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def commutativity_plot(comm: dict[str, Any], path: Path, label: str | None = None) -> Path:
    """Pairs whose two directions share a sign (white) or not (orange), as in Figure 13."""
    tasks = _task_order(sorted({p["task_a"] for p in comm["pairs"]} | {p["task_b"] for p in comm["pairs"]}))
    idx = {t: i for i, t in enumerate(tasks)}
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for p in comm["pairs"]:
        v = 0.0 if p["commutative"] else 1.0
        grid[idx[p["task_a"]], idx[p["task_b"]]] = grid[idx[p["task_b"]], idx[p["task_a"]]] = v
    fig, ax = plt.subplots(figsize=(max(0.4 * len(tasks) + 3, 7), max(0.4 * len(tasks) + 2, 6)))
    # grey: the diagonal (and pairs missing a direction)
    cmap = matplotlib.colors.ListedColormap(["#ffffff", "#f39c12"]).with_extremes(bad="#bbbbbb")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.grid(which="minor", color="#dddddd", lw=0.5)
    ax.set_title(f"Commutativity ({label or comm['setup']}): {comm['n_commutative']} of {comm['n_pairs']} "
                 "pairs share a sign\nwhite = same sign both ways, orange = opposite signs, grey = no pair")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


# -- numbers for the page -----------------------------------------------------------------------------------
def provenance(con: duckdb.DuckDBPyConnection, store_path: str | Path | None) -> dict[str, Any]:
    """Where the numbers come from: store, generation time, runs by provenance/kind/status, imported files."""
    runs = con.execute("""SELECT provenance, kind, status, count(*) AS n, max(created_at) AS latest
                          FROM runs GROUP BY ALL ORDER BY provenance, kind, status""").fetchall()
    imports = con.execute("""SELECT provenance, path, sha256, n_rows, n_skipped, imported_at FROM imports
                             ORDER BY imported_at, provenance""").fetchall()
    try:
        version = importlib.metadata.version("transferlab")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"store": str(Path(store_path).resolve()) if store_path else "(in-memory connection)",
            "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "version": version, "n_runs": sum(r[3] for r in runs),
            "n_ok": sum(r[3] for r in runs if r[2] == "ok"),
            "runs": [dict(zip(["provenance", "kind", "status", "n", "latest"], r, strict=True)) for r in runs],
            "imports": [dict(zip(["provenance", "path", "sha256", "n_rows", "n_skipped", "imported_at"], r,
                                 strict=True)) for r in imports],
            "stacks": mixed_stacks(con)}


def default_selection_setup(con: duckdb.DuckDBPyConnection, drawn: list[str], all_setups: list[str]) -> str:
    """The first drawn real setup, else the setup with the most transfer runs (Regret@k needs them)."""
    real = [s for s in drawn if s != an.MEAN and s in all_setups]
    if real:
        return real[0]
    row = con.execute("""SELECT setup FROM transfer_runs WHERE list_contains(?, setup)
                         GROUP BY setup ORDER BY count(*) DESC, setup LIMIT 1""", [all_setups]).fetchone()
    return row[0] if row else all_setups[0]


def selector_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Selectors for the table: random, size, every stored base selector and TaskShop over each."""
    base = sel.base_selectors(con, _DERIVED_METHODS)
    return ["random", "size", *base, *[f"taskshop-{b}" for b in base]]


def selection_table(con: duckdb.DuckDBPyConnection, setup: str, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """NDCG and Regret@k per selector, per category and overall (paper 000 Table 2), leave-one-out.

    k shrinks to the fewest candidate sources of any target when that is smaller. A selector that cannot be evaluated here (no task sizes, a target it does not score) gets a
    row with its reason instead of numbers.
    """
    fewest = con.execute("""SELECT min(n) FROM (SELECT count(*) AS n FROM analysis_transfers
                            WHERE setup = ? AND source <> target GROUP BY target)""", [setup]).fetchone()[0]
    k = min(k, fewest or k)  # Regret@k needs k candidates per target (small local stores have fewer)
    rows: list[dict[str, Any]] = []
    categories: list[str] = []
    for name in selector_names(con):
        try:
            res = evaluate_selection(con, name, setup, k=k, seed=seed)
        except AnalysisError as e:
            rows.append({"selector": name, "error": str(e)})
            continue
        categories = categories or list(res["by_category"])
        rows.append({"selector": name, "stored_as": res["stored_as"], "ndcg": res["ndcg"],
                     "regret": res[f"regret_at_{k}"], "n_targets": len(res["by_target"]),
                     "by_category": {c: (v["ndcg"], v[f"regret_at_{k}"]) for c, v in res["by_category"].items()}})
    return {"setup": setup, "k": k, "categories": categories, "rows": rows}


# -- the page ---------------------------------------------------------------------------------------------


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _provenance_html(prov: dict[str, Any], all_setups: list[str]) -> str:
    runs = "".join(f"<tr><td>{html.escape(str(r['provenance']))}</td><td>{html.escape(str(r['kind']))}</td>"
                   f"<td>{html.escape(str(r['status']))}</td><td>{r['n']}</td><td>{html.escape(str(r['latest']))}</td></tr>"
                   for r in prov["runs"])
    imports = "".join(f"<tr><td>{html.escape(str(i['provenance']))}</td><td>{html.escape(str(i['path']))}</td>"
                      f"<td><code>{html.escape(str(i['sha256'])[:12])}</code></td><td>{i['n_rows']}</td>"
                      f"<td>{i['n_skipped']}</td><td>{html.escape(str(i['imported_at']))}</td></tr>"
                      for i in prov["imports"])
    out = (f"<h2>Provenance</h2><ul><li>Store: <code>{html.escape(prov['store'])}</code></li>"
           f"<li>Generated: {html.escape(prov['generated_at'])} by transferlab {html.escape(prov['version'])}</li>"
           f"<li>Runs: {prov['n_runs']} ({prov['n_ok']} ok)</li>"
           f"<li>Setups with transfer scores ({len(all_setups)}): {html.escape(', '.join(all_setups))}</li></ul>")
    warning = stack_warning(prov.get("stacks", []))
    if warning:
        out += f"<p><strong>{html.escape(warning)}</strong></p>"
    if runs:
        out += ("<table><caption>Runs by provenance, kind and status</caption><tr><th>provenance</th><th>kind</th>"
                f"<th>status</th><th>runs</th><th>latest</th></tr>{runs}</table>")
    if imports:
        out += ("<table><caption>Imported files</caption><tr><th>provenance</th><th>path</th><th>sha256</th>"
                f"<th>rows</th><th>skipped</th><th>imported</th></tr>{imports}</table>")
    return out


def _selection_html(tab: dict[str, Any]) -> str:
    k, cats = tab["k"], tab["categories"]
    head = ("<tr><th rowspan=2>selector</th>" + "".join(f"<th colspan=2>{html.escape(c)}</th>" for c in cats)
            + "<th colspan=2>mean</th></tr><tr>" + f"<th>NDCG</th><th>R@{k}</th>" * (len(cats) + 1) + "</tr>")
    body, notes = "", []
    for r in tab["rows"]:
        name = html.escape(r["selector"])
        if "error" in r:
            body += f"<tr><td>{name}</td>" + "<td>n/a</td>" * (2 * len(cats) + 2) + "</tr>"
            notes.append(f"<li>{name}: {html.escape(r['error'])}</li>")
            continue
        cells = "".join(f"<td>{_pct(n)}</td><td>{_pct(g)}</td>" for n, g in (r["by_category"].get(c, (None, None))
                                                                             for c in cats))
        body += f"<tr><td>{name}</td>{cells}<td><b>{_pct(r['ndcg'])}</b></td><td><b>{_pct(r['regret'])}</b></td></tr>"
    n_targets = next((r["n_targets"] for r in tab["rows"] if "n_targets" in r), 0)
    caption = (f"Source selection on {html.escape(tab['setup'])}: NDCG and Regret@{k} in percent (higher NDCG, "
               f"lower regret is better), leave-one-out over {n_targets} targets, category means and the mean "
               "over targets (paper 000, Table 2 protocol). TaskShop uses lambda 0.7; random uses seed 0.")
    out = f"<h2>Source selection</h2><table class=sel><caption>{caption}</caption>{head}{body}</table>"
    if notes:
        out += "<p>Not evaluated:</p><ul>" + "".join(notes) + "</ul>"
    return out


_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 1em}img{max-width:100%;display:block}"
          "figure{margin:1.5em 0}figcaption{color:#333;max-width:60em;margin-top:.4em}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
          "td:first-child{text-align:left}caption{caption-side:top;text-align:left;color:#333;padding:.3em 0}")


def _transitivity_html(trans: pd.DataFrame, out: Path, all_setups: list[str], files: list[Path]) -> str:
    """The transitivity figure, its caption and the table of fraction (triples) per setup and threshold."""
    p_trans = transitivity_plot(trans, out / "transitivity.png", all_setups)
    files.append(p_trans)
    cells = [f"{f:.3f} ({n})" if n else "- (0)" for f, n in zip(trans["fraction"], trans["n_triples"], strict=True)]
    wide = trans.assign(cell=cells).pivot(index="setup", columns="threshold", values="cell")
    mean_expl = ("" if len(all_setups) == 1 else
                 " The dashed black line is not the mean of the coloured curves: it is the transitivity of the "
                 "averaged matrix (setup 'mean'). Averaging cancels setup-specific noise, so fewer triples pass "
                 "a threshold and those that do agree more often; so it can lie above every setup's curve.")
    return ("<h2>Transitivity</h2>"
            + _figure(p_trans, "Top: among triples (A, B, C), A != C, with T(A->B) and T(B->C) above the threshold "
                               "and T(A->C) measured, the fraction with T(A->C) > 0. Bottom: the number of such "
                               f"triples (log scale); the table gives fraction (triples).{mean_expl}")
            + wide.to_html(escape=True))


def _setup_section(con: duckdb.DuckDBPyConnection, s: str, all_setups: list[str], out: Path, graph_top_k: int,
                   graph_min_abs: float, files: list[Path]) -> str:
    """One setup's heatmap, TaskWeb graph and commutativity plot (appended to `files`) with captions."""
    label = setup_label(s, all_setups)
    m = an.transfer_matrix(con, s)
    n_pairs = int(m.notna().to_numpy().sum())
    p_heat = heatmap(m, f"Transfer scores ({label})", out / f"transfer_matrix_{_slug(s)}.png")
    p_graph, n_edges = graph(m, f"TaskWeb ({label})", out / f"taskweb_graph_{_slug(s)}.png", graph_top_k,
                             graph_min_abs)
    comm = an.commutativity(con, s)
    files += [p_heat, p_graph]
    if comm["n_pairs"]:
        p_comm = commutativity_plot(comm, out / f"commutativity_{_slug(s)}.png", label)
        files.append(p_comm)
        comm_html = _figure(p_comm, f"Commutativity ({html.escape(label)}): {comm['n_commutative']} of "
                                    f"{comm['n_pairs']} unordered pairs share a sign (T(A->B) > 0 exactly when "
                                    "T(B->A) > 0), among the pairs with both directions measured; orange pairs "
                                    "transfer positively one way only.")
    else:
        comm_html = "<p>Commutativity: no pair has both directions (A->B and B->A) measured.</p>"
    mean_note = (" Each cell is the average of the setups' transfer scores." if s == an.MEAN and len(all_setups) > 1
                 else "")
    return (f"<h2>{html.escape(label)}</h2>"
            + _figure(p_heat, f"Transfer score {SCORE_FORMULA} of training on the source (row) before the target "
                              f"(column), {html.escape(label)}: PC is the mean relative change of the target metric "
                              f"against the target-only baseline, PM the fraction of seeds that improve. Blue helps, "
                              f"red hurts; tasks grouped by category; blank cells were not measured. {n_pairs} "
                              f"ordered pairs.{mean_note}")
            + _figure(p_graph, f"TaskWeb graph ({html.escape(label)}): for each target, the "
                               f"{graph_top_k if graph_top_k > 0 else 'all'} sources with the largest |T| "
                               f"({n_edges} arrows); blue positive, red negative, width by |T|. Tasks on the circle "
                               "are grouped and coloured by category.")
            + comm_html)


def _cross_setup_sections(con: duckdb.DuckDBPyConnection, thresholds: tuple[float, ...], all_setups: list[str],
                          out: Path, files: list[Path]) -> list[str]:
    """Transitivity over every setup and, with several setups, their similarity (figures appended to `files`)."""
    sections = []
    trans = an.transitivity(con, thresholds)
    if len(all_setups) == 1:
        trans = trans[trans["setup"] != an.MEAN]
    if not trans["n_triples"].any():
        sections.append("<h2>Transitivity</h2><p>No triple A->B->C with A->C measured and T(A->B), T(B->C) above "
                        "the lowest threshold.</p>")
    else:
        sections.append(_transitivity_html(trans, out, all_setups, files))
    if len(all_setups) > 1:
        sim = an.setup_similarity(con)
        p_sim = similarity_plot(sim, out / "setup_similarity.png")
        files.append(p_sim)
        sections.append("<h2>Setup similarity</h2>" + _figure(
            p_sim, "Cosine similarity sum(x*y) / sqrt(sum(x^2) sum(y^2)) of two setups' transfer scores over the "
                   "(source, target) pairs both measured. The diagonal (1 by definition) is left grey so the colour "
                   "scale spans the off-diagonal values."))
    return sections


def write_report(con: duckdb.DuckDBPyConnection, out_dir: str | Path, setups: list[str] | None = None,
                 thresholds: tuple[float, ...] = an.DEFAULT_THRESHOLDS, graph_top_k: int = 3,
                 graph_min_abs: float = 0.0, store_path: str | Path | None = None,
                 selection_setup: str | None = None, k: int = 5) -> dict[str, Any]:
    """All figures plus `index.html` in `out_dir`; returns the paths written and the selection table."""
    all_setups = an.require_data(con)
    chosen = setups or [an.MEAN]
    for s in chosen:
        an.require_setup(con, s, setups=all_setups)
    sel_setup = an.require_setup(con, selection_setup, allow_mean=False, setups=all_setups) if selection_setup \
        else default_selection_setup(con, chosen, all_setups)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    sections = [_setup_section(con, s, all_setups, out, graph_top_k, graph_min_abs, files) for s in chosen]
    sections += _cross_setup_sections(con, thresholds, all_setups, out, files)
    tab = selection_table(con, sel_setup, k)
    prov = provenance(con, store_path)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>"
            f"<style>{_STYLE}</style></head><body><h1>Transfer analysis</h1>"
            + _provenance_html(prov, all_setups) + _selection_html(tab) + "".join(sections) + "</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"index": str(index), "files": [str(p) for p in files], "selection": tab, "provenance": prov}
