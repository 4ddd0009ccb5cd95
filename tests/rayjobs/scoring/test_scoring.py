"""The one scoring interface: black boxes of every kind return raw choice log-likelihoods, the stored
`predictions` rows of a training run are what its model predicts, and the bulk score job stores them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch

from analysis.store.results import ResultStore
from rayjobs.models.loading import ModelError
from rayjobs.scoring.blackbox import UnknownModelError, open_black_box
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate
from tests.conftest import DATA, cli, needs_data

pytestmark = needs_data


def test_predictions_rows_of_a_training_run_give_its_score(trained_source: dict[str, Any]) -> None:
    snli = trained_source["runs"]["snli"]
    preds = snli["predictions"].to_pylist()
    assert len(preds) == snli["row"]["n_eval"] == 40
    assert len({p["example_id"] for p in preds}) == 40 and all(p["template"] == "input" for p in preds)
    acc = sum(p["prediction"] == p["gold"] for p in preds) / len(preds)
    assert acc == pytest.approx(snli["row"]["score"])  # snli's metric is accuracy
    for p in preds:
        assert sum(p["probs"]) == pytest.approx(1.0)
        assert p["prediction"] == max(range(len(p["probs"])), key=p["probs"].__getitem__)
        assert p["probs"] == pytest.approx([math.exp(x) for x in p["logprobs"]])  # log-softmax of the head
        assert p["correct"] == (p["prediction"] == p["gold"])
    con = duckdb.connect(str(trained_source["results"] / "transferlab.duckdb"), read_only=True)
    n, score = con.execute("SELECT count(*), avg(correct::INT) FROM predictions WHERE key = ?",
                           [snli["key"]]).fetchone()
    assert n == 40 and score == pytest.approx(snli["row"]["score"])


def test_a_stored_run_as_a_black_box_reproduces_its_training_predictions(trained_source: dict[str, Any],
                                                                           registry: Any) -> None:
    snli = trained_source["runs"]["snli"]
    box = open_black_box(f"run:{snli['key']}", results=trained_source["results"])
    data = registry.load_data("snli", 0, 40, seed=3)
    rows = box.score(PromptTemplate(name="input", input="{input}"), list(data.eval))
    stored = snli["predictions"].to_pylist()
    assert [r["prediction"] for r in rows] == [p["prediction"] for p in stored]
    assert torch.allclose(torch.tensor([r["logprobs"] for r in rows]), torch.tensor([p["logprobs"] for p in stored]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="classifies into 2 labels"):  # snli: C/N
        box.score(PromptTemplate(name="x", input="{input}", answer_choices=["a", "b", "c"]),
                  [Example("t", ("x", "y", "z"), 0)])
    with pytest.raises(UnknownModelError, match="no stored checkpoint"):
        open_black_box("run:0000nosuchkey", results=trained_source["results"])


def test_lm_black_box_scores_raw_loglikelihoods_and_perplexity(tiny_lm_folder: Path) -> None:
    box = open_black_box(str(tiny_lm_folder))
    assert box.kind == "causal"
    tpl = PromptTemplate(name="s", input="Review: {input} Sentiment?", answer_choices=["negative", "positive"])
    examples = [Example("a fine film", ("neg", "pos"), 1), Example("bad", ("neg", "pos"), 0)]
    rows = box.score(tpl, examples, perplexity=True)
    tm = box.tm
    tok = tm.tokenizer
    for ex, row in zip(examples, rows, strict=True):
        prompt = tpl.input.format(input=ex.text, options="", options_list="")
        direct = []
        for c in ("negative", "positive"):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            cids = tok(" " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(tm.module(input_ids=torch.tensor([p + cids])).logits[0].float(), -1)
            direct.append(float(sum(logp[len(p) + i - 1, t] for i, t in enumerate(cids))))
        assert row["logprobs"] == pytest.approx(direct, abs=1e-4)
        assert row["choices"] == ["negative", "positive"]
        assert row["probs"] == pytest.approx(torch.softmax(torch.tensor(direct, dtype=torch.float64), -1).tolist())
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tm.module(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        nll = -sum(float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0) / (len(ids) - 1)
        assert row["prompt_ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # repetition penalty / sampling in a shipped generation config do not change the scores
    tm.module.generation_config.repetition_penalty = 5.0
    tm.module.generation_config.do_sample = True
    again = box.score(tpl, examples, generate=True)
    for a, b in zip(again, rows, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"])
    assert all(isinstance(r["pred_text"], str) for r in again)


def test_sentence_scorer_is_prompt_sensitive_and_bad_refs_are_clear(tmp_path: Path) -> None:
    box = open_black_box("builtin:minilm")
    good = PromptTemplate(name="g", input="Review: {input} The sentiment is", answer_choices=["negative", "positive"])
    flipped = PromptTemplate(name="f", input="Review: {input} The sentiment is", answer_choices=["positive", "negative"])
    ex = [Example("An absolutely wonderful, joyful film; I loved it.", ("n", "p"), 1)]
    a, b = box.score(good, ex)[0], box.score(flipped, ex)[0]
    assert a["prediction"] == 1 and b["prediction"] == 0  # the verbalisers decide the label order
    assert a["probs"] == pytest.approx(b["probs"][::-1])
    with pytest.raises(UnknownModelError, match="does not exist"):
        open_black_box(str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="unknown builtin"):
        open_black_box("builtin:nosuch")


@pytest.mark.integration
def test_score_job_on_ray_stores_one_row_per_example_and_template_and_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "score.yaml"
    cfg.write_text(f"""
job: score
name: sc
data_root: {DATA}
models: [{{name: zs, ref: "builtin:minilm"}}]
tasks: [cb]
templates: all
split: pool
n: 6
""")
    r = cli("run", str(cfg), "--results", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 runs, 0 already stored, 3 to run" in r.stdout  # cb has three templates
    con = duckdb.connect(str(tmp_path / "r" / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT template, count(*), count(gold), count(DISTINCT example_id), min(split), "
                       "bool_and(abs(list_sum(probs) - 1) < 1e-9) FROM predictions GROUP BY template "
                       "ORDER BY template").fetchall()
    assert [r[0] for r in rows] == ["gpt3-style", "must-be-true", "options"]
    assert all(r[1:] == (6, 0, 6, "pool", True) for r in rows)  # unlabelled pool: no gold stored
    assert con.execute("SELECT count(*) FROM runs WHERE kind = 'score' AND status = 'ok'").fetchone()[0] == 3
    con.close()
    again = cli("run", str(cfg), "--results", str(tmp_path / "r"))
    assert again.returncode == 0 and "3 already stored, 0 to run" in again.stdout
    assert len(ResultStore(tmp_path / "r").finished_keys()) == 3
