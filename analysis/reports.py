"""Figures of the transfer analyses (PNG) and an HTML page that shows them with their numbers.

Figures: the transfer-matrix heatmap (paper Fig. 5-12), the TaskWeb graph (Fig. 3 left: positive
edges blue, negative red, width by |score|), the transitivity curve (Fig. 3 bottom-right / 14),
setup similarity (Fig. 3 top-right) and commutativity (Fig. 13). Everything is computed by
`analysis.analytics`; this module only draws.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from analysis import analytics as an  # noqa: E402
from analysis.ranking import TASKWEB_CATEGORIES, _registry_category  # noqa: E402

_CAT_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


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


def heatmap(matrix: pd.DataFrame, title: str, path: Path) -> Path:
    """Source x target heatmap, diverging at 0 (blue positive, red negative), values printed."""
    rows = _task_order(list(matrix.index))
    cols = _task_order(list(matrix.columns))
    m = matrix.loc[rows, cols]
    vals = m.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    fig, ax = plt.subplots(figsize=(0.55 * len(cols) + 3, 0.45 * len(rows) + 2))
    im = ax.imshow(vals, cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim or -1, lim or 1), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = vals[i, j]
            if np.isfinite(v):
                ax.text(j, i, "0" if abs(v) < 0.005 else f"{v:.2f}".replace("0.", ".", 1), ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.7, label="transfer score 0.5*PC + 0.5*(0.2*PM - 0.1)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def graph(matrix: pd.DataFrame, title: str, path: Path, min_abs: float = 0.0) -> Path:
    """Tasks on a circle grouped by category; an arrow s->t per transfer with |score| > min_abs."""
    tasks = _task_order(sorted(set(matrix.index) | set(matrix.columns)))
    angle = {t: 2 * math.pi * i / len(tasks) for i, t in enumerate(tasks)}
    pos = {t: (math.cos(a), math.sin(a)) for t, a in angle.items()}
    cats = list(dict.fromkeys(_category(t) for t in tasks))
    color = {c: _CAT_COLORS[i % len(_CAT_COLORS)] for i, c in enumerate(cats)}
    long = matrix.stack().dropna()
    long = long[long.abs() > min_abs]
    top = float(long.abs().max()) if len(long) else 1.0
    fig, ax = plt.subplots(figsize=(10, 10))
    for (s, t), v in sorted(long.items(), key=lambda kv: abs(kv[1])):
        w = abs(v) / top
        ax.add_patch(FancyArrowPatch(pos[s], pos[t], arrowstyle="-|>", mutation_scale=6 + 8 * w,
                                     connectionstyle="arc3,rad=0.12", lw=0.3 + 3.2 * w,
                                     color="#1f5fbf" if v > 0 else "#c0392b", alpha=0.15 + 0.75 * w,
                                     shrinkA=9, shrinkB=9))
    for t in tasks:
        x, y = pos[t]
        ax.scatter([x], [y], s=160, color=color[_category(t)], zorder=3, edgecolor="white")
        deg = math.degrees(angle[t])
        left = 90 < deg < 270
        ax.text(1.08 * x, 1.08 * y, t, ha="right" if left else "left", va="center", fontsize=9,
                rotation=deg - 180 if left else deg, rotation_mode="anchor")
    handles = [plt.Line2D([], [], color="#1f5fbf", lw=2, label="positive transfer"),
               plt.Line2D([], [], color="#c0392b", lw=2, label="negative transfer")]
    handles += [plt.Line2D([], [], marker="o", ls="", color=color[c], label=c) for c in cats]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    shown = f"|score| > {min_abs:g}" if min_abs > 0 else "all transfers"
    ax.set_title(f"{title}\n(arrows source -> target, width and opacity by |score|; {shown})")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def transitivity_plot(table: pd.DataFrame, path: Path) -> Path:
    """Fraction of positive A->C against the threshold on A->B and B->C, one line per setup."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for setup, grp in table.groupby("setup"):
        grp = grp.sort_values("threshold")
        is_mean = setup == an.MEAN
        ax.plot(grp["threshold"], grp["fraction"], marker="o", lw=3 if is_mean else 1.3,
                color="black" if is_mean else None, label="mean of setups" if is_mean else setup,
                zorder=3 if is_mean else 2)
    ax.set_xlabel("threshold on T(A->B) and T(B->C)")
    ax.set_ylabel("P(T(A->C) > 0)")
    ax.set_title("Transitivity of positive transfer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def similarity_plot(sim: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.0 * len(sim) + 2.5, 0.9 * len(sim) + 1.5))
    im = ax.imshow(sim.to_numpy(dtype=float), cmap="viridis", vmin=min(0.0, float(np.nanmin(sim.to_numpy()))), vmax=1)
    ax.set_xticks(range(len(sim.columns)), sim.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(sim.index)), sim.index, fontsize=8)
    for i in range(len(sim.index)):
        for j in range(len(sim.columns)):
            v = sim.iat[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="normalised dot product")
    ax.set_title("Similarity of setups' transfer matrices")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def commutativity_plot(comm: dict[str, Any], path: Path) -> Path:
    """Pairs whose two directions share a sign (white) or not (orange), as in Figure 13."""
    tasks = _task_order(sorted({p["task_a"] for p in comm["pairs"]} | {p["task_b"] for p in comm["pairs"]}))
    idx = {t: i for i, t in enumerate(tasks)}
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for p in comm["pairs"]:
        v = 0.0 if p["commutative"] else 1.0
        grid[idx[p["task_a"]], idx[p["task_b"]]] = grid[idx[p["task_b"]], idx[p["task_a"]]] = v
    fig, ax = plt.subplots(figsize=(0.4 * len(tasks) + 3, 0.4 * len(tasks) + 2))
    # grey: the diagonal (and pairs missing a direction)
    cmap = matplotlib.colors.ListedColormap(["#ffffff", "#f39c12"]).with_extremes(bad="#bbbbbb")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.grid(which="minor", color="#dddddd", lw=0.5)
    ax.set_title(f"Commutativity ({comm['setup']}): {comm['n_commutative']} of {comm['n_pairs']} pairs share a sign\n"
                 "white = same sign both ways, orange = opposite signs, grey = no pair")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_report(con: duckdb.DuckDBPyConnection, out_dir: str | Path, setups: list[str] | None = None,
                 thresholds: tuple[float, ...] = an.DEFAULT_THRESHOLDS, graph_min_abs: float = 0.02) -> dict[str, Any]:
    """All figures plus `index.html` in `out_dir`; returns the paths written."""
    all_setups = an.require_data(con)
    chosen = setups or [an.MEAN]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    sections: list[str] = []
    for s in chosen:
        m = an.transfer_matrix(con, s)
        label = "mean over setups" if s == an.MEAN else s
        files.append(heatmap(m, f"Transfer scores ({label})", out / f"transfer_matrix_{_slug(s)}.png"))
        files.append(graph(m, f"TaskWeb ({label})", out / f"taskweb_graph_{_slug(s)}.png", graph_min_abs))
        comm = an.commutativity(con, s)
        files.append(commutativity_plot(comm, out / f"commutativity_{_slug(s)}.png"))
        sections.append(f"<h2>{html.escape(label)}</h2><p>Commutativity: {comm['n_commutative']} of "
                        f"{comm['n_pairs']} unordered pairs share a sign.</p>"
                        + "".join(f'<img src="{p.name}" alt="{p.stem}">' for p in files[-3:]))
    trans = an.transitivity(con, thresholds)
    files.append(transitivity_plot(trans, out / "transitivity.png"))
    wide = trans.pivot(index="setup", columns="threshold", values="fraction")
    sections.append("<h2>Transitivity</h2>" + '<img src="transitivity.png" alt="transitivity">'
                    + wide.to_html(float_format=lambda v: f"{v:.3f}"))
    if len(all_setups) > 1:
        sim = an.setup_similarity(con)
        files.append(similarity_plot(sim, out / "setup_similarity.png"))
        sections.append('<h2>Setup similarity</h2><img src="setup_similarity.png" alt="setup similarity">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}img{max-width:100%;display:block;"
            "margin:1em 0}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"</head><body><h1>Transfer analysis</h1><p>Setups with data: {html.escape(', '.join(all_setups))}</p>"
            + "".join(sections) + "</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"index": str(index), "files": [str(p) for p in files]}
