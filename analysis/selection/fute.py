"""FUTE's analysis half (paper 004): similarity and rankings over stored task embeddings.

The embed job (rayjobs/embed.py) writes one vector file per dataset task embedding (DTE) or model task
embedding (MTE) and a run row that the view `task_embeddings` indexes: space, kind, task, model, prompt,
dims, file. Everything here reads those rows and files; nothing recomputes an embedding.

Spaces: an embedding space is (surrogate, method, variant, hyperparameters, probe pool, seed); its id is a
hash of all of them. Similarity is the cosine of two vectors of ONE space; asking for the cosine of
embeddings of different spaces is an `AnalysisError`, never a number. A space is named by its id, a unique
prefix of it, or its unique display name.

Rankings (higher cosine first, ties by name; every result names its space):
  rank_models(space, target)         MTEs of every black box by cos(MTE, DTE(target))
  rank_prompts(space, task, model)   one model's prompts on a task by cos(MTE(model + prompt), DTE(task))
  rank_sources(space, target, via)   source tasks by cos(DTE(s), DTE(t)) (`dte`) or, for source models
                                     trained on s, by the mean over them of cos(MTE, DTE(t)) (`mte`)
Selectors (`analysis.selection.selectors`): `fute-dte@<space>` / `fute-mte@<space>` store F(s -> t) = those
cosines in `selector_scores`, so TaskShop can use them as its few-shot estimate F.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.selection.scores import store_scores
from analysis.store.duck import query_arrow

VIAS = ("dte", "mte")
CHUNK = 1 << 20  # vector entries read at a time when accumulating Gram matrices
_COLS = ["space", "space_name", "kind", "task", "data", "model", "prompt", "source_task", "dims", "file", "abs_file",
         "method", "variant", "loss", "seed", "run_key", "experiment"]


# -- rows and spaces -------------------------------------------------------------------------------------------
def embedding_rows(con: duckdb.DuckDBPyConnection, space: str | None = None, kind: str | None = None,
                   task: str | None = None, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of `task_embeddings` (ordered by kind, task, model, prompt, data), filtered."""
    where, params = ["TRUE"], {}
    for col, val in (("space", space), ("kind", kind), ("task", task)):
        if val is not None:
            where.append(f"{col} = ${col}")
            params[col] = val
    if keys is not None:
        where.append("list_contains($keys, run_key)")
        params["keys"] = list(keys)
    rows = con.execute(f"""SELECT {', '.join(_COLS)} FROM task_embeddings WHERE {' AND '.join(where)}
                           ORDER BY kind, task, model NULLS FIRST, prompt NULLS FIRST, data, run_key""",
                       params).fetchall()
    return [dict(zip(_COLS, r, strict=True)) for r in rows]


def spaces(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Every space with stored embeddings: id, name, seed, variant, dims, DTE and MTE counts."""
    cols = ["space", "name", "seed", "variant", "dims", "n_dte", "n_mte"]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM embedding_spaces ORDER BY name, seed, space").fetchall()
    return [dict(zip(cols, r, strict=True)) for r in rows]


def resolve_space(con: duckdb.DuckDBPyConnection, space: str) -> str:
    """The space id `space` names: an id, a unique id prefix, or a unique display name."""
    known = spaces(con)
    if not known:
        raise AnalysisError("no task embeddings stored (run an embed job: `transferlab embed CONFIG`)")
    hits = [s for s in known if s["space"] == space] or [s for s in known if s["space"].startswith(space)] \
        or [s for s in known if s["name"] == space]
    if len(hits) == 1:
        return str(hits[0]["space"])
    listing = ", ".join(f"{s['space']} ({s['name']}, seed {s['seed']})" for s in known)
    if not hits:
        raise AnalysisError(f"unknown embedding space '{space}' (spaces: {listing})")
    raise AnalysisError(f"embedding space '{space}' is ambiguous: {', '.join(s['space'] for s in hits)}; "
                        "give the id")


def check_one_space(rows: list[dict[str, Any]]) -> str:
    """The one space of `rows`; embeddings of different spaces are never compared."""
    found = sorted({r["space"] for r in rows})
    if len(found) != 1:
        names = {r["space"]: r["space_name"] for r in rows}
        raise AnalysisError("embeddings from different spaces cannot be compared: "
                            + ", ".join(f"{s} ({names[s]})" for s in found)
                            + " (a space is fixed by surrogate, method, probe pool, seed and hyperparameters)")
    dims = sorted({r["dims"] for r in rows})
    if len(dims) != 1:
        raise AnalysisError(f"space {found[0]} holds embeddings of different sizes {dims}: a corrupt store")
    return found[0]


# -- vectors ---------------------------------------------------------------------------------------------------
def _db_folder(con: duckdb.DuckDBPyConnection) -> Path | None:
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(row[0]).parent if row and row[0] else None


def vector_file(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> Path:
    """The vector file of a row: relative to the database's folder (results moved as a whole), else where the
    trial wrote it."""
    folder = _db_folder(con)
    candidates = ([folder / row["file"]] if folder is not None and row.get("file") else []) + \
        ([Path(row["abs_file"])] if row.get("abs_file") else [])
    for c in candidates:
        if c.is_file():
            return c
    raise AnalysisError(f"the vector file of embedding {row['run_key']} is missing (looked at "
                        f"{', '.join(map(str, candidates)) or 'no path'})")


def load_vector(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> np.ndarray:
    vec = np.load(vector_file(con, row), mmap_mode="r")
    if vec.ndim != 1 or vec.size != row["dims"]:
        raise AnalysisError(f"embedding {row['run_key']}: file holds {vec.shape}, the index says {row['dims']} dims")
    return vec


def gram(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> np.ndarray:
    """X X^T of the rows' vectors (float64), accumulated over chunks of the dimensions (vectors can have
    millions of entries; only a chunk of each is in memory at a time)."""
    check_one_space(rows)
    vecs = [load_vector(con, r) for r in rows]
    d = int(rows[0]["dims"])
    g = np.zeros((len(rows), len(rows)))
    for start in range(0, d, CHUNK):
        block = np.stack([np.asarray(v[start:start + CHUNK], dtype=np.float64) for v in vecs])
        g += block @ block.T
    return g


def cosine_from_gram(g: np.ndarray, rows: list[dict[str, Any]]) -> np.ndarray:
    norms = np.sqrt(np.diag(g))
    zero = [r["run_key"] for r, n in zip(rows, norms, strict=True) if not n > 0]
    if zero:
        raise AnalysisError(f"embedding(s) {', '.join(zero)} are all zeros: cosine undefined")
    return g / np.outer(norms, norms)


def cosine_matrix(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> np.ndarray:
    """Cosine of every pair of `rows` (one space)."""
    return cosine_from_gram(gram(con, rows), rows)


def cosine(con: duckdb.DuckDBPyConnection, key_a: str, key_b: str) -> float:
    """cos(e_a, e_b) of two stored embeddings (run keys); refused across spaces."""
    rows = embedding_rows(con, keys=[key_a, key_b])
    found = {r["run_key"] for r in rows}
    missing = [k for k in (key_a, key_b) if k not in found]
    if missing:
        raise AnalysisError(f"no stored task embedding with run key {', '.join(missing)}")
    by = {r["run_key"]: r for r in rows}
    pair = [by[key_a], by[key_b]]
    return float(cosine_matrix(con, pair)[0, 1])


# -- rankings ---------------------------------------------------------------------------------------------------
def dte_rows(con: duckdb.DuckDBPyConnection, space: str, data: str | None = None) -> dict[str, dict[str, Any]]:
    """The DTE of each task in a space; `data` (a prefix of the data column: 'registry', 'prompted') picks one
    where a task has several."""
    out: dict[str, dict[str, Any]] = {}
    for r in embedding_rows(con, space=space, kind="DTE"):
        if data is not None and not str(r["data"]).startswith(data):
            continue
        if r["task"] in out:
            raise AnalysisError(f"task '{r['task']}' has several DTEs in space {space} ({out[r['task']]['data']}, "
                                f"{r['data']}): choose one with data=")
        out[r["task"]] = r
    return out


def _target_dte(con: duckdb.DuckDBPyConnection, space: str, target: str, data: str | None) -> dict[str, Any]:
    dtes = dte_rows(con, space, data)
    if target not in dtes:
        raise AnalysisError(f"no DTE of task '{target}' in space {space} (DTEs: {', '.join(sorted(dtes)) or 'none'})")
    return dtes[target]


def _ranked(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    items.sort(key=lambda x: (-x["cosine"], str(x[name])))
    for i, x in enumerate(items, 1):
        x["rank"] = i
    return items


def rank_models(con: duckdb.DuckDBPyConnection, space: str, target: str, data: str | None = None,
                models: list[str] | None = None) -> dict[str, Any]:
    """Every black box (MTE) of the space ranked for `target` by cos(MTE, DTE(target))."""
    space = resolve_space(con, space)
    dte = _target_dte(con, space, target, data)
    mtes = [r for r in embedding_rows(con, space=space, kind="MTE") if models is None or r["model"] in models]
    if not mtes:
        raise AnalysisError(f"no model task embeddings in space {space}" + (f" for models {models}" if models else ""))
    cos = cosine_matrix(con, [dte, *mtes])[0, 1:]
    items = [{"model": r["model"], "prompt": r["prompt"], "task": r["task"], "source_task": r["source_task"],
              "cosine": float(c), "run_key": r["run_key"]} for r, c in zip(mtes, cos, strict=True)]
    for x in items:
        x["name"] = x["model"] if x["prompt"] is None else f"{x['model']} + {x['prompt']}"
    return {"space": space, "target": target, "dte": dte["run_key"], "ranking": _ranked(items, "name")}


def rank_prompts(con: duckdb.DuckDBPyConnection, space: str, task: str, model: str,
                 data: str | None = None) -> dict[str, Any]:
    """One model's prompts on `task` ranked by cos(MTE(model + prompt), DTE(task))."""
    space = resolve_space(con, space)
    dte = _target_dte(con, space, task, data)
    mtes = [r for r in embedding_rows(con, space=space, kind="MTE", task=task) if r["model"] == model and r["prompt"]]
    if not mtes:
        have = sorted({r["model"] for r in embedding_rows(con, space=space, kind="MTE", task=task)})
        raise AnalysisError(f"no prompt MTEs of model '{model}' on task '{task}' in space {space} "
                            f"(models with MTEs there: {', '.join(have) or 'none'})")
    cos = cosine_matrix(con, [dte, *mtes])[0, 1:]
    items = [{"prompt": r["prompt"], "cosine": float(c), "run_key": r["run_key"]} for r, c in zip(mtes, cos, strict=True)]
    return {"space": space, "task": task, "model": model, "dte": dte["run_key"], "ranking": _ranked(items, "prompt")}


def fute_scores(con: duckdb.DuckDBPyConnection, space: str, via: str = "dte", data: str | None = None) -> pa.Table:
    """F(source -> target) for every pair the space covers: cos(DTE(s), DTE(t)) (`dte`), or the mean over the
    source models trained on s of cos(MTE, DTE(t)) (`mte`); columns source, target, score."""
    if via not in VIAS:
        raise AnalysisError(f"via must be one of {', '.join(VIAS)}, got '{via}'")
    dtes = dte_rows(con, space, data)
    if not dtes:
        raise AnalysisError(f"no DTEs in space {space}: FUTE's source scores need target DTEs")
    targets = sorted(dtes)
    if via == "dte":
        left = [dtes[t] for t in targets]
        cos = cosine_matrix(con, left)
        src, tgt, val = [], [], []
        for i, s in enumerate(targets):
            for j, t in enumerate(targets):
                if s != t:
                    src.append(s)
                    tgt.append(t)
                    val.append(float(cos[i, j]))
        return pa.table({"source": src, "target": tgt, "score": val})
    mtes = [r for r in embedding_rows(con, space=space, kind="MTE") if r["source_task"]]
    if not mtes:
        raise AnalysisError(f"no MTEs of source models (with a training task) in space {space}")
    rows = [dtes[t] for t in targets] + mtes
    cos = cosine_matrix(con, rows)[len(targets):, :len(targets)]
    acc: dict[tuple[str, str], list[float]] = {}
    for r, line in zip(mtes, cos, strict=True):
        for j, t in enumerate(targets):
            if r["source_task"] != t:
                acc.setdefault((r["source_task"], t), []).append(float(line[j]))
    keys = sorted(acc)
    return pa.table({"source": [k[0] for k in keys], "target": [k[1] for k in keys],
                     "score": [float(np.mean(acc[k])) for k in keys]})


def rank_sources(con: duckdb.DuckDBPyConnection, space: str, target: str, via: str = "dte",
                 data: str | None = None) -> dict[str, Any]:
    """Source tasks for `target` by FUTE's F(s -> target) (see `fute_scores`)."""
    space = resolve_space(con, space)
    _target_dte(con, space, target, data)
    table = fute_scores(con, space, via, data).to_pylist()
    items = [{"source": r["source"], "cosine": r["score"]} for r in table if r["target"] == target]
    if not items:
        raise AnalysisError(f"no candidate sources for '{target}' in space {space} via {via}")
    return {"space": space, "target": target, "via": via, "ranking": _ranked(items, "source")}


def fute_selector_name(space: str, via: str) -> str:
    return f"fute-{via}@{space}"


def store_fute(con: duckdb.DuckDBPyConnection, space: str, via: str = "dte", data: str | None = None) -> str:
    """Store F(s -> t) of a space as selector `fute-<via>@<space id>`; returns the stored name."""
    space = resolve_space(con, space)
    table = fute_scores(con, space, via, data)
    info = next(s for s in spaces(con) if s["space"] == space)
    name = fute_selector_name(space, via)
    store_scores(con, name, "fute", {"space": space, "space_name": info["name"], "via": via, "data": data,
                                     "variant": info["variant"], "uses_target_labels": True}, table,
                 provenance=f"embeddings:{space}")
    return name


# -- what the paper shows ------------------------------------------------------------------------------------
def own_task_retrieval(con: duckdb.DuckDBPyConnection, space: str, data: str | None = None) -> dict[str, Any]:
    """For every MTE of a source model: the 1-based rank of its own training task's DTE among all DTEs of the
    space by cosine; with the chance level (a uniformly random ranking puts it at (n + 1) / 2 on average,
    first with probability 1 / n)."""
    space = resolve_space(con, space)
    dtes = dte_rows(con, space, data)
    tasks = sorted(dtes)
    mtes = [r for r in embedding_rows(con, space=space, kind="MTE") if r["source_task"] in dtes]
    if not mtes:
        return {"space": space, "n_models": 0, "n_candidates": len(tasks), "models": []}
    cos = cosine_matrix(con, [dtes[t] for t in tasks] + mtes)[len(tasks):, :len(tasks)]
    models = []
    for r, line in zip(mtes, cos, strict=True):
        order = sorted(range(len(tasks)), key=lambda j: (-line[j], tasks[j]))
        ranked = [tasks[j] for j in order]
        models.append({"model": r["model"], "source_task": r["source_task"], "rank": ranked.index(r["source_task"]) + 1,
                       "top": ranked[:3], "cosine_own": float(line[tasks.index(r["source_task"])])})
    n = len(tasks)
    ranks = [m["rank"] for m in models]
    return {"space": space, "n_models": len(models), "n_candidates": n, "mean_rank": float(np.mean(ranks)),
            "mrr": float(np.mean([1 / k for k in ranks])), "top1": sum(k == 1 for k in ranks),
            "chance_mean_rank": (n + 1) / 2, "chance_top1": 1 / n,
            "chance_mrr": float(np.mean([1 / k for k in range(1, n + 1)])), "models": models}


def projection_2d(con: duckdb.DuckDBPyConnection, space: str) -> tuple[list[dict[str, Any]], np.ndarray, list[float]]:
    """PCA of the space's L2-normalised embeddings to 2-D, from their Gram matrix (no vector held whole):
    (rows, [n, 2] coordinates, explained variance ratio of the two axes)."""
    space = resolve_space(con, space)
    rows = embedding_rows(con, space=space)
    if len(rows) < 3:
        raise AnalysisError(f"space {space} has {len(rows)} embeddings; a projection needs at least 3")
    k = cosine_matrix(con, rows)  # Gram matrix of the normalised vectors
    n = len(rows)
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    kc = h @ k @ h
    vals, vecs = np.linalg.eigh(kc)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0, None), vecs[:, order]
    coords = vecs[:, :2] * np.sqrt(vals[:2])
    total = float(vals.sum()) or 1.0
    return rows, coords, [float(v / total) for v in vals[:2]]


def category_separation(con: duckdb.DuckDBPyConnection, space: str, category_of: dict[str, str]) -> dict[str, Any]:
    """Mean cosine of embedding pairs whose tasks share a category vs pairs across categories."""
    space = resolve_space(con, space)
    rows = [r for r in embedding_rows(con, space=space) if r["task"] in category_of]
    if len(rows) < 2:
        raise AnalysisError("fewer than two embeddings with a known category")
    cos = cosine_matrix(con, rows)
    cats = [category_of[r["task"]] for r in rows]
    within, across = [], []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            (within if cats[i] == cats[j] else across).append(cos[i, j])
    return {"space": space, "within": float(np.mean(within)) if within else None,
            "across": float(np.mean(across)) if across else None, "n_within": len(within), "n_across": len(across)}


def embeddings_table(con: duckdb.DuckDBPyConnection, space: str | None = None) -> pa.Table:
    """The index rows as Arrow (for reports and the CLI)."""
    if space is None:
        return query_arrow(con, f"SELECT {', '.join(_COLS)} FROM task_embeddings ORDER BY space, kind, task")
    return query_arrow(con, f"SELECT {', '.join(_COLS)} FROM task_embeddings WHERE space = ? ORDER BY kind, task",
                       [resolve_space(con, space)])


def select_only_space(con: duckdb.DuckDBPyConnection, req: Any) -> str:
    """The registry's `fute`: FUTE over the only stored space with dataset task embeddings."""
    found = [s for s in spaces(con) if s["n_dte"] >= 2]
    if len(found) != 1:
        listing = ", ".join(f"fute-dte@{s['space']} ({s['name']})" for s in found) or "none stored"
        raise AnalysisError(f"selector 'fute' needs exactly one embedding space with DTEs; name one: {listing}")
    return store_fute(con, str(found[0]["space"]), "dte")


def select_space(con: duckdb.DuckDBPyConnection, req: Any) -> str:
    """The registry's `fute-dte@<space>` / `fute-mte@<space>`: FUTE's cosines in one embedding space."""
    via, _, space = req.name[len("fute-"):].partition("@")
    return store_fute(con, space, via)
