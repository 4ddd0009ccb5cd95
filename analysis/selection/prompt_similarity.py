"""Task similarity from trained soft prompts and from sentence embeddings: the embedding-based
selectors of Lin et al. (2024, paper 001, sections 4 and 6).

A soft prompt is a matrix [e_1, ..., e_N] of N prompt tokens with d features (shape [N, d]). For a
source prompt S and a target prompt T, sim(source -> target) is:
  feature      FEATURE, Eq. 3: cos(mean_i S_i, mean_j T_j) (after Vu et al.'s SPoT)
  feature-l2   FEATURE with every token scaled to unit L2 norm before the mean (a named variant:
               long tokens do not dominate the task embedding)
  unigram      UNIGRAM: h = (1/d) [sum_d e_1, ..., sum_d e_N] in R^N, sim = cos(h_S, h_T) (needs
               equal N)
  max          MAX, Eq. 4 (source t1, target t2): (1/N_T) sum_j max_i cos(S_i, T_j), every target
               token looks up its most similar source token
  max-reverse  MAX the other way: (1/N_S) sum_i max_j cos(S_i, T_j)
  semb         SEMB (Poth et al., as Lin et al.): cos of the dataset means of the sentence
               embeddings of the two tasks' inputs. Default (`protocol='fewshot'`): the 32 prompted
               examples per task with MiniLM (`builtin:minilm`), offline and fast. `protocol='lin'`:
               Lin et al.'s definition, every input of each task's dataset (`dataset_texts`, one JSONL
               per task) through Sentence-BERT (`SEMB_LIN_MODEL`, SEMB-B; Sentence-RoBERTa,
               `SEMB_R_MODEL`, for SEMB-R).

Which prompts: a source's prompt is the checkpoint of its `runs` row of kind 'source' in the setup
(adaptation prompt_tuning), a target's the checkpoint of its target-only baseline (kind 'target');
of several seeds the best-scoring run's (Lin et al.: "we select the best-performing checkpoint for
prompt transfer"), or the run of a given seed. A checkpoint is `runs.checkpoint`, else
`<results>/checkpoints/<run_key>` next to the store; baselines are saved only when their trial sets
`save_checkpoint` (the pairwise planner saves sources only).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.selection.roe import embed
from analysis.selection.scores import store_scores
from analysis.store.duck import query_arrow

CKPT_WEIGHTS = "trained.safetensors"  # rayjobs.models.base.CKPT_WEIGHTS (no import: layering)
PROMPT_ADAPTATION = "prompt_tuning"


# -- similarities of two prompts -------------------------------------------------------------------------
def _matrix(prompt: Any, what: str) -> np.ndarray:
    m = np.asarray(prompt, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise AnalysisError(f"{what} must be a non-empty [n_tokens, dim] matrix, got shape {m.shape}")
    return m


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    """Rows of `v` scaled to unit L2 norm; a zero row has no direction, so no cosine."""
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise AnalysisError(f"{what} has a zero vector: its cosine similarity is undefined")
    return v / norms


def _cos(a: np.ndarray, b: np.ndarray, what: str) -> float:
    return float(_unit(a, what) @ _unit(b, what))


def feature_similarity(source: Any, target: Any, normalise_tokens: bool = False) -> float:
    """FEATURE (Eq. 3): cosine of the mean token vectors; `normalise_tokens` L2-normalises tokens first."""
    s, t = _matrix(source, "source prompt"), _matrix(target, "target prompt")
    if s.shape[1] != t.shape[1]:
        raise AnalysisError(f"prompts of different width: source dim {s.shape[1]}, target dim {t.shape[1]}")
    if normalise_tokens:
        s, t = _unit(s, "source prompt"), _unit(t, "target prompt")
    return _cos(s.mean(axis=0), t.mean(axis=0), "a mean prompt vector")


def unigram_similarity(source: Any, target: Any) -> float:
    """UNIGRAM: cosine of the per-token means over the feature dimension (vectors in R^N)."""
    s, t = _matrix(source, "source prompt"), _matrix(target, "target prompt")
    if s.shape[0] != t.shape[0]:
        raise AnalysisError(f"UNIGRAM compares token positions: source has {s.shape[0]} prompt tokens, "
                            f"target {t.shape[0]}")
    return _cos(s.mean(axis=1), t.mean(axis=1), "a per-token mean vector")


def max_similarity(source: Any, target: Any, reverse: bool = False) -> float:
    """MAX (Eq. 4): mean over target tokens of the best cosine with any source token (`reverse`:
    mean over source tokens of the best cosine with any target token)."""
    s, t = _matrix(source, "source prompt"), _matrix(target, "target prompt")
    if s.shape[1] != t.shape[1]:
        raise AnalysisError(f"prompts of different width: source dim {s.shape[1]}, target dim {t.shape[1]}")
    cos = _unit(s, "source prompt") @ _unit(t, "target prompt").T  # [N_S, N_T]
    return float(cos.max(axis=1).mean() if reverse else cos.max(axis=0).mean())


PROMPT_SIMILARITIES: dict[str, Callable[[Any, Any], float]] = {
    "feature": feature_similarity,
    "feature-l2": functools.partial(feature_similarity, normalise_tokens=True),
    "unigram": unigram_similarity,
    "max": max_similarity,
    "max-reverse": functools.partial(max_similarity, reverse=True),
}


# -- prompts from checkpoints ------------------------------------------------------------------------------
def load_soft_prompt(folder: str | Path) -> np.ndarray:
    """The soft prompt [n_tokens, dim] of a checkpoint folder: the one tensor of `trained.safetensors`
    whose name contains `prompt_encoder` and ends with `embedding.weight` (peft prompt tuning)."""
    path = Path(folder) / CKPT_WEIGHTS
    if not path.is_file():
        raise AnalysisError(f"checkpoint {path} does not exist")
    from safetensors import safe_open  # lazy: safetensors only when saving weights

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            hits = [n for n in names if "prompt_encoder" in n and n.endswith("embedding.weight")]
            if len(hits) != 1:
                why = "no" if not hits else f"{len(hits)} ({', '.join(hits)})"
                raise AnalysisError(f"checkpoint {path} has {why} soft-prompt tensor (a name with 'prompt_encoder' "
                                    f"ending in 'embedding.weight'); tensors: {', '.join(names[:8]) or 'none'}"
                                    " -- not a prompt-tuning checkpoint?")
            tensor = f.get_tensor(hits[0])
    except AnalysisError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise AnalysisError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    return _matrix(_encoder_prompt(tensor.float().numpy(), Path(folder)), f"soft prompt in {path}")


def _encoder_prompt(matrix: np.ndarray, folder: Path) -> np.ndarray:
    """The prompt the model reads. peft's prompt tuning of a seq2seq model defaults to two transformer
    submodules: a [2N, dim] table whose second half (the decoder's) is never used by prompt tuning and
    stays at its random initialisation. Keep the first N rows, N = num_virtual_tokens from the
    checkpoint's setup (rows beyond it would only add noise to FEATURE/UNIGRAM/MAX)."""
    meta_path = folder / "meta.json"
    try:
        setup = json.loads(meta_path.read_text()).get("setup_spec") or {}
    except (OSError, ValueError):
        return matrix
    params = (setup.get("adaptation") or {}).get("params") or {}
    n = params.get("num_virtual_tokens", 20)  # rayjobs' PROMPT_DEFAULTS
    if (setup.get("model") or {}).get("family") == "seq2seq" and matrix.shape[0] == 2 * n:
        return matrix[:n]
    return matrix


def _results_dir(con: duckdb.DuckDBPyConnection) -> Path | None:
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(row[0]).parent if row and row[0] else None


def prompt_checkpoints(con: duckdb.DuckDBPyConnection, setup: str, seed: int | None = None,
                       results_dir: str | Path | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """({source task: run}, {target task: run}) with run = {run_key, seed, score, folder}: per task the
    best-scoring prompt-tuning run of the setup (ties: lowest seed, then run key), or the run of `seed`."""
    adaptation = con.execute("SELECT any_value(adaptation) FROM runs WHERE setup = ?", [setup]).fetchone()[0]
    if adaptation is None:
        raise AnalysisError(f"no runs of setup '{setup}' in the store")
    if adaptation != PROMPT_ADAPTATION:
        raise AnalysisError(f"prompt similarity needs soft prompts: setup '{setup}' adapts with '{adaptation}', "
                            f"not {PROMPT_ADAPTATION}")
    root = Path(results_dir) if results_dir is not None else _results_dir(con)
    rows = query_arrow(con, """
        SELECT kind, coalesce(source, target) AS task, run_key, seed, score, checkpoint FROM (
            SELECT *, row_number() OVER (PARTITION BY kind, coalesce(source, target)
                                         ORDER BY score DESC NULLS LAST, seed, run_key) AS rn
            FROM runs
            WHERE setup = $setup AND adaptation = $adaptation AND status = 'ok'
              AND kind IN ('source', 'target') AND (CAST($seed AS INTEGER) IS NULL OR seed = $seed))
        WHERE rn = 1 ORDER BY kind, task""", {"setup": setup, "adaptation": PROMPT_ADAPTATION, "seed": seed})
    out: dict[str, dict[str, dict]] = {"source": {}, "target": {}}
    for r in rows.to_pylist():
        folder = r["checkpoint"] or (str(root / "checkpoints" / r["run_key"]) if root is not None else None)
        out[r["kind"]][r["task"]] = {"run_key": r["run_key"], "seed": r["seed"], "score": r["score"], "folder": folder}
    for kind, what in (("source", "source"), ("target", "target-only baseline")):
        if not out[kind]:
            raise AnalysisError(f"no {what} runs of setup '{setup}'{'' if seed is None else f' with seed {seed}'}")
    return out["source"], out["target"]


def prompt_similarity_scores(con: duckdb.DuckDBPyConnection, method: str, setup: str, seed: int | None = None,
                             results_dir: str | Path | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """`method` for every (source, target != source) of the setup: (table source/target/score, params)."""
    if method not in PROMPT_SIMILARITIES:
        raise AnalysisError(f"unknown prompt similarity '{method}' (choose from {', '.join(PROMPT_SIMILARITIES)})")
    sources, targets = prompt_checkpoints(con, setup, seed, results_dir)
    missing = [f"{kind} {task} ({run['run_key']})" for kind, runs in (("source", sources), ("target", targets))
               for task, run in runs.items() if run["folder"] is None]
    if missing:
        raise AnalysisError(f"no checkpoint recorded for {', '.join(missing)}")
    prompts = {(kind, task): load_soft_prompt(run["folder"])
               for kind, runs in (("source", sources), ("target", targets)) for task, run in runs.items()}
    sim = PROMPT_SIMILARITIES[method]
    pairs = [(s, t) for t in targets for s in sources if s != t]
    table = pa.table({"source": [s for s, _ in pairs], "target": [t for _, t in pairs],
                      "score": [sim(prompts[("source", s)], prompts[("target", t)]) for s, t in pairs]})
    params = {"setup": setup, "similarity": method, "seed": seed, "choice": "best score" if seed is None else "seed",
              "source_runs": {s: r["run_key"] for s, r in sources.items()},
              "target_runs": {t: r["run_key"] for t, r in targets.items()}}
    return table, params


def compute_prompt_similarity(con: duckdb.DuckDBPyConnection, method: str, setup: str, seed: int | None = None,
                              results_dir: str | Path | None = None, name: str | None = None) -> str:
    """Score and store `method` over the setup's prompts as `<method>[<setup>]`; returns the stored name."""
    table, params = prompt_similarity_scores(con, method, setup, seed, results_dir)
    if table.num_rows == 0:
        raise AnalysisError(f"setup '{setup}' has no (source, target) pair of distinct tasks with prompts")
    name = name or f"{method}[{setup}]" + ("" if seed is None else f"[seed={seed}]")
    store_scores(con, name, method, params, table)
    return name


# -- SEMB -----------------------------------------------------------------------------------------------------
# Lin et al. Sec. 5: "we adopt Sentence-BERT and Sentence-RoBERTa (Reimers and Gurevych, 2019) as encoders for
# SEMB-B and SEMB-R"; these are those encoders' sentence-transformers ids (a hub or a local copy is needed)
SEMB_LIN_MODEL = "sentence-transformers/bert-base-nli-mean-tokens"
SEMB_R_MODEL = "sentence-transformers/roberta-base-nli-mean-tokens"
SEMB_PROTOCOLS = ("fewshot", "lin")


def dataset_texts(folder: str | Path, tasks: list[str] | None = None, max_per_task: int | None = None,
                  field: str = "input") -> dict[str, list[str]]:
    """Every input text of each task's dataset: `<folder>/<task>.jsonl`, one record per line with an
    `input` (or `text`) field (the layout of ../shared/data/tasks/natinstruct and .../choices). Lin et al.
    average over the whole dataset; `max_per_task` keeps the first N lines (a named cut, not theirs)."""
    root = Path(folder)
    if not root.is_dir():
        raise AnalysisError(f"SEMB dataset folder {root} does not exist")
    files = {f.stem: f for f in sorted(root.glob("*.jsonl"))}
    missing = sorted(set(tasks or []) - set(files))
    if missing:
        raise AnalysisError(f"no dataset file for task(s) {', '.join(missing)} in {root} "
                            f"(have: {', '.join(files) or 'none'})")
    out: dict[str, list[str]] = {}
    for task in tasks or list(files):
        texts = []
        with files[task].open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    texts.append(str(rec[field] if field in rec else rec["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise AnalysisError(f"{files[task]}:{i}: no '{field}' or 'text' field ({e})") from None
                if max_per_task is not None and len(texts) >= max_per_task:
                    break
        out[task] = texts
    return out


def semb_from_embeddings(source_emb: Any, target_emb: Any) -> float:
    """SEMB from per-example embeddings [n_examples, dim] of each task: cosine of their means."""
    s, t = _matrix(source_emb, "source embeddings"), _matrix(target_emb, "target embeddings")
    return _cos(s.mean(axis=0), t.mean(axis=0), "a mean sentence embedding")


def semb_similarity(source_texts: list[str], target_texts: list[str], model: str | None = None,
                    batch_size: int = 64, device: str | None = None) -> float:
    """SEMB of two tasks from their input texts (MiniLM from `builtin:minilm` unless `model`)."""
    for what, texts in (("source", source_texts), ("target", target_texts)):
        if not texts:
            raise AnalysisError(f"SEMB needs input texts: the {what} task has none")
    emb = embed(list(source_texts) + list(target_texts), model, batch_size=batch_size, device=device)
    return semb_from_embeddings(emb[:len(source_texts)], emb[len(source_texts):])


def semb_scores(texts: dict[str, list[str]], sources: list[str] | None = None, targets: list[str] | None = None,
                model: str | None = None, batch_size: int = 64,
                device: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """SEMB for every (source, target != source) of the tasks in `texts` ({task: input texts}); every
    distinct text is embedded once. Returns (table source/target/score, params to store)."""
    sources, targets = sources or sorted(texts), targets or sorted(texts)
    lacking = sorted({t for t in [*sources, *targets] if not texts.get(t)})
    if lacking:
        raise AnalysisError(f"SEMB needs input texts of task(s) {', '.join(lacking)}")
    tasks = sorted(set(sources) | set(targets))
    uniq = sorted({x for t in tasks for x in texts[t]})
    emb = embed(uniq, model, batch_size=batch_size, device=device)
    row = {x: i for i, x in enumerate(uniq)}
    means = {t: emb[[row[x] for x in texts[t]]].mean(axis=0) for t in tasks}
    pairs = [(s, t) for t in targets for s in sources if s != t]
    table = pa.table({"source": [s for s, _ in pairs], "target": [t for _, t in pairs],
                      "score": [_cos(means[s], means[t], f"the mean embedding of {s} or {t}") for s, t in pairs]})
    params = {"model": model or "all-MiniLM-L6-v2 (builtin:minilm)", "pooling": "mean over the texts",
              "n_texts": {t: len(texts[t]) for t in tasks}}
    return table, params


def store_semb(con: duckdb.DuckDBPyConnection, table: pa.Table, params: dict[str, Any], name: str = "semb") -> str:
    """Store SEMB scores (from `semb_scores`) as selector `name` (default 'semb', the registered name)."""
    store_scores(con, name, "semb", params, table, provenance=f"computed:{params['model']}")
    return name


def select(con: duckdb.DuckDBPyConnection, req: Any) -> str:
    """The registry's entry for feature / feature-l2 / unigram / max / max-reverse (`analysis.selection.selectors`)."""
    return compute_prompt_similarity(con, req.name, req.setup or "")
