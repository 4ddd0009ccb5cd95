"""The embed job end to end on a real local Ray cluster: black boxes label the probe pool into `predictions`
rows, DTEs and MTEs are trials with run keys whose vectors are files indexed by `task_embeddings`, a re-run
resumes; and its config errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.store.duck import open_store
from tests.conftest import DATA, TINY_BERT, cli, needs_data

pytestmark = needs_data

TPL = "{input}\nQuestion: Does the premise entail the hypothesis? Entailment, neutral, or contradiction?\nAnswer:"


def tiny_config(tmp_path: Path, **over: object) -> Path:
    cfg = {
        "job": "embed", "name": "fute-test", "data_root": str(DATA), "seeds": [0],
        "spaces": [{"name": "tiny", "surrogate": {"name": "tiny", "config": TINY_BERT, "family": "encoder",
                                                  "head": "classification", "max_length": 48},
                    "train": {"epochs": 1, "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3},
                    "fisher_examples": 4}],
        "pool": {"prompted_tasks": ["imdb", "rte"], "n_per_task": 4, "seed": 1},
        "dte": {"tasks": ["cb", "scitail"], "n": 8},
        "mte": {"models": [{"name": "minilm-zs", "ref": "builtin:minilm"}],
                "prompts": [{"task": "cb", "templates": "gpt3-style",
                             "extra": [{"name": "gpt3-style-copy", "input": TPL,
                                        "answer_choices": ["entailment", "neutral", "contradiction"]}]}],
                "score_eval": False},
        **over}
    path = tmp_path / "fute.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_embed_job_runs_on_ray_stores_vectors_and_resumes(tmp_path: Path) -> None:
    path, results = tiny_config(tmp_path), tmp_path / "results"
    r = cli("embed", str(path), "--results", str(results))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAILED" not in r.stdout and " 0 failed" in r.stdout, r.stdout[-3000:]
    assert "6 runs (4 embeddings in 1 space(s), 2 black boxes on a 8-input probe pool" in r.stdout
    with open_store(results / "transferlab.duckdb") as con:
        rows = con.execute("""SELECT kind, task, model, prompt, dims, file, loss, variant, space FROM task_embeddings
                              ORDER BY kind, task, prompt""").fetchall()
        assert [(k, t, m, p) for k, t, m, p, *_ in rows] == [
            ("DTE", "cb", None, None), ("DTE", "scitail", None, None),
            ("MTE", "cb", "minilm-zs", "gpt3-style"), ("MTE", "cb", "minilm-zs", "gpt3-style-copy")]
        assert {(loss, v) for *_, loss, v, _ in rows} == {("soft_cross_entropy", "fisher_eq3")}
        assert len({r[4] for r in rows}) == 1 and len({r[-1] for r in rows}) == 1  # one space, one size
        for *_, dims, file, _, _, _ in rows:
            vec = np.load(results / file)
            assert vec.shape == (dims,) and np.all(np.isfinite(vec)) and vec.any()
        # the black boxes' soft labels are predictions rows of the probe pool: no gold, canonical order
        probe = con.execute("""SELECT p.key, count(*), count(p.gold), min(len(p.probs)), any_value(p.choices)
                               FROM predictions p JOIN runs r ON r.run_key = p.key
                               WHERE r.kind = 'probe' GROUP BY p.key""").fetchall()
        assert len(probe) == 2 and all(n == 8 and g == 0 and c == 3 for _, n, g, c, _ in probe)
        assert probe[0][4] == ["entailment", "neutral", "contradiction"]
        comp = json.loads(con.execute("SELECT any_value(pool)::VARCHAR FROM embedding_spaces").fetchone()[0])
        assert comp["counts"] == {"prompted/imdb": 4, "prompted/rte": 4} and "cb" in comp["excluded_targets"]
        from analysis.selection.fute import rank_prompts

        ranked = rank_prompts(con, "tiny", "cb", "minilm-zs")["ranking"]
        # a duplicated prompt gives the same soft labels, the same surrogate run and the same embedding
        assert ranked[0]["cosine"] == pytest.approx(ranked[1]["cosine"], abs=1e-6)
    assert (results / "embeddings" / "pools" / f"{comp['digest']}.json").is_file()
    again = cli("embed", str(path), "--results", str(results))
    assert again.returncode == 0 and "6 already stored, 0 to run" in again.stdout


def test_embed_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tiny_config(tmp_path, pool={"prompted_tasks": ["cb"], "n_per_task": 4})
    r = cli("embed", str(bad), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "field `pool`" in r.stderr and "cb are evaluation targets" in r.stderr
    bad = tiny_config(tmp_path, dte={"tasks": ["squad_v2"]})
    r = cli("embed", str(bad), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "field `dte.tasks.0`" in r.stderr
    bad = tiny_config(tmp_path, pool={})
    r = cli("embed", str(bad), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "model task embeddings need a probe pool" in r.stderr
    r = cli("embed", str(Path(__file__).parents[2] / "configs" / "quickstart.yaml"), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "a `job: pairwise` config" in r.stderr
