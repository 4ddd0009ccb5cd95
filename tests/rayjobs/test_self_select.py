"""Self-Select (FUTE Sec. 4.2.2): the meta-prompts built for the black box, their stored rows turned into one
score per prompt (a hand-computed case), and `transferlab select-prompts` comparing every method on a store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.prompts import selection as ps
from rayjobs.scoring.self_select import SELF_SELECT, meta_examples, self_select_rows
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate
from tests.analysis.prompts.test_prompt_selection import _prompts, _store

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [PromptTemplate(name="good", input="Is this review positive? {input}", answer_choices=["no", "yes"]),
              PromptTemplate(name="bad", input="{input} Not a review at all", answer_choices=["no", "yes"]),
              PromptTemplate(name="flat", input="{input} Sentiment ({options})?", answer_choices=["no", "yes"])]


def test_meta_prompts_list_every_instruction_in_a_rotating_order() -> None:
    exs = [Example(f"text {i}", ("n", "p"), 0, uid=f"ex{i}") for i in range(4)]
    metas = meta_examples(CANDIDATES, exs)
    assert [m.choices for m in metas] == [("good", "bad", "flat"), ("bad", "flat", "good"),
                                          ("flat", "good", "bad"), ("good", "bad", "flat")]
    assert [m.uid for m in metas] == ["ex0", "ex1", "ex2", "ex3"] and all(m.label == -1 for m in metas)
    first = metas[0].text
    assert "Instruction good: Is this review positive? [input]" in first
    assert "Instruction flat: [input] Sentiment ([options])?" in first and "Input: text 0" in first
    assert first.index("Instruction good") < first.index("Instruction bad") < first.index("Instruction flat")
    with pytest.raises(ValueError, match="distinctly named"):
        meta_examples(CANDIDATES[:1], exs)


def test_meta_prompt_rows_through_a_black_box() -> None:
    from rayjobs.scoring.blackbox import open_black_box

    box = open_black_box("builtin:minilm")
    exs = [Example("a fine, moving film", ("n", "p"), 1, uid="a"), Example("dull", ("n", "p"), 0, uid="b")]
    rows = self_select_rows(box, CANDIDATES, exs, "sst2", "eval")
    direct = box.score(PromptTemplate(name=SELF_SELECT, input="{input}"), meta_examples(CANDIDATES, exs))
    assert [r["template"] for r in rows] == [SELF_SELECT] * 2 and [r["example_id"] for r in rows] == ["a", "b"]
    assert [r["choices"] for r in rows] == [["good", "bad", "flat"], ["bad", "flat", "good"]]
    assert all(r["gold"] is None and r.get("correct") is None for r in rows)  # no labels: the model's own choice
    for r, d in zip(rows, direct, strict=True):
        assert r["probs"] == pytest.approx(d["probs"]) and sum(r["probs"]) == pytest.approx(1.0)


# meta rows of model llm-a on sst2: (example, choices as listed, probs)
META = [("ex0", ["good", "bad", "flat"], [0.6, 0.3, 0.1]),
        ("ex1", ["bad", "flat", "good"], [0.5, 0.1, 0.4]),
        ("ex2", ["flat", "good", "bad"], [0.2, 0.5, 0.3])]
# by hand, mean probability per prompt: good (0.6 + 0.4 + 0.5) / 3 = 0.5, bad (0.3 + 0.5 + 0.3) / 3 = 0.3667,
# flat (0.1 + 0.1 + 0.2) / 3 = 0.1333
BY_HAND = {"good": 0.5, "bad": 1.1 / 3, "flat": 0.4 / 3}


def _with_meta(tmp_path: Path, meta: list = META, key: str = "self-select-llm-a") -> tuple:
    prompts, _ = _prompts()
    store, keys = _store(tmp_path, prompts)
    store.write_predictions(key, [{"example_id": e, "template": SELF_SELECT, "task": "sst2", "split": "eval",
                                   "choices": c, "probs": p, "prediction": int(np.argmax(p))} for e, c, p in meta])
    store.write_result({"run_key": key, "experiment": "promptsel", "kind": "self_select", "model": "llm-a",
                        "target": "sst2", "status": "ok"})
    store.ingest()
    return store, keys


def test_self_select_scores_are_the_mean_probability_of_each_prompt(tmp_path: Path) -> None:
    store, keys = _with_meta(tmp_path)
    with store.connect() as con:
        meta = ps.self_select_probs(con, "sst2", ["bad", "flat", "good"], model="llm-a")
        np.testing.assert_allclose(meta, [[0.3, 0.1, 0.6], [0.5, 0.1, 0.4], [0.3, 0.2, 0.5]])
        res = ps.evaluate_prompt_selection(con, "sst2", list(keys.values()))  # by keys: the meta rows of their model
        by_model = ps.evaluate_prompt_selection(con, "sst2", model="llm-a", split="eval")
    m = res["methods"]["self_select"]
    assert m["scores"] == pytest.approx(BY_HAND)
    assert m["ranking"] == ["good", "bad", "flat"] and m["selected"] == "good"
    # accuracies: good 1.0, flat 0.5, bad 0.0 -> performance 1.0, rate 1.0, the best ranked first
    assert m["performance"] == 1.0 and m["rate"] == 1.0 and m["rank_of_best"] == 1
    # NDCG by hand: relevance 100 * acc, gain 2^rel - 1, ranking good, bad, flat vs ideal good, flat, bad
    g = {"good": 2.0 ** 100 - 1, "flat": 2.0 ** 50 - 1, "bad": 0.0}
    dcg = g["good"] + g["bad"] / np.log2(3) + g["flat"] / np.log2(4)
    assert m["ndcg"] == pytest.approx(dcg / (g["good"] + g["flat"] / np.log2(3) + g["bad"] / np.log2(4)))
    assert m["uses_labels"] is False and "self_select" not in res["not_applicable"]
    assert by_model["methods"]["self_select"]["scores"] == pytest.approx(BY_HAND)
    assert by_model["prompts"] == ["bad", "flat", "good"]  # the meta rows are not a prompt of their own


def test_self_select_rows_over_other_prompts_are_refused(tmp_path: Path) -> None:
    store, keys = _with_meta(tmp_path, [("ex0", ["good", "bad"], [0.6, 0.4])])
    with store.connect() as con:
        with pytest.raises(AnalysisError, match="Self-Select was asked about prompts"):
            ps.evaluate_prompt_selection(con, "sst2", list(keys.values()), methods=["self_select"])
        res = ps.evaluate_prompt_selection(con, "sst2", list(keys.values()))  # the others still run
    assert "self_select" not in res["methods"] and "asked about prompts" in res["not_applicable"]["self_select"]
    assert res["methods"]["mi"]["selected"] == "good"


def test_select_prompts_cli_compares_every_method(tmp_path: Path) -> None:
    store, _ = _with_meta(tmp_path)
    cmd = [sys.executable, "-m", "rayjobs.cli", "select-prompts", "--db", str(store.db_path), "--model", "llm-a"]
    res = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [t["task"] for t in out["tasks"]] == ["sst2"]
    s = out["summary"]
    assert set(s) == {"mi", "local_e", "global_e", "zps_log", "zps_prob", "zps_vote", "spell", "self_select", "random"}
    assert s["self_select"]["performance"] == 1.0 and s["spell"]["rho"] == 2.0 and s["mi"]["rho"] == 1.0
    assert "fute" in out["tasks"][0]["not_applicable"]  # no --space
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "self_select" in text.stdout and "mean over 1 task(s)" in text.stdout
    bad = subprocess.run(cmd[:-1] + ["nosuch"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no eval-split scoring runs of model 'nosuch'" in bad.stderr
