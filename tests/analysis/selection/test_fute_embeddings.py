"""FUTE's analysis half (paper 004) over a hand-made store: cosines and rankings read from the stored
vectors, refused across spaces; FUTE's selectors; vector files found after the results folder moves."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.selection import fute as te
from analysis.selection import selectors as sel
from analysis.store.duck import open_store
from analysis.store.results import ResultStore


def put(store: ResultStore, key: str, space: str, kind: str, task: str, vec: list[float], *, model: str | None = None,
        prompt: str | None = None, source_task: str | None = None, data: str = "registry:8", seed: int = 0,
        name: str | None = None, experiment: str = "e", wall: float = 1.0) -> None:
    """One stored embedding as the embed job stores it: the vector file, then the run row."""
    path = store.root / "embeddings" / f"{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vec, dtype=np.float32))
    store.write_result({
        "run_key": key, "experiment": experiment, "kind": "embed", "setup": name or f"space-{space}", "model": model,
        "source": source_task, "target": task, "seed": seed, "wall_time_s": wall, "checkpoint": str(path),
        "hparams": {"space": {"name": name or f"space-{space}"}, "composition": {"digest": "p", "n": 3}},
        "metrics": {"space": space, "space_name": name or f"space-{space}", "embedding": kind, "data": data,
                    "prompt": prompt, "dims": len(vec), "file": f"embeddings/{key}.npy", "method": "taskemb",
                    "variant": "fisher_eq3", "loss": "soft_cross_entropy"}})


def cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


V = {"nli": [1.0, 0.0, 0.0], "para": [0.0, 1.0, 0.0], "sent": [1.0, 1.0, 1.0],
     "m_nli": [0.9, 0.1, 0.0], "m_para": [0.1, 1.0, 0.2], "m_para2": [0.0, 1.0, 0.6],
     "p_good": [1.0, 0.05, 0.0], "p_copy": [1.0, 0.05, 0.0], "p_bad": [0.0, 0.2, 1.0]}


@pytest.fixture()
def store(tmp_path: Path) -> ResultStore:
    st = ResultStore(tmp_path / "res")
    st.ensure_writable()
    for t, v in (("nli", "nli"), ("para", "para"), ("sent", "sent")):
        put(st, f"dte-{t}", "S1aaaa", "DTE", t, V[v])
    put(st, "mte-nli", "S1aaaa", "MTE", "nli", V["m_nli"], model="full/nli", source_task="nli")
    put(st, "mte-para", "S1aaaa", "MTE", "para", V["m_para"], model="full/para", source_task="para")
    put(st, "mte-para2", "S1aaaa", "MTE", "para", V["m_para2"], model="full/para-s2", source_task="para")
    for p, v in (("good", "p_good"), ("good-copy", "p_copy"), ("bad-x", "p_bad")):
        put(st, f"mte-{p}", "S1aaaa", "MTE", "nli", V[v], model="zs", prompt=p)
    put(st, "other-nli", "S2bbbb", "DTE", "nli", [0.0, 0.0, 1.0], name="space-S1aaaa")  # same name, other space
    st.ingest()
    return st


def test_cosines_and_rankings_are_read_from_the_stored_vectors(store: ResultStore) -> None:
    with open_store(store.db_path) as con:
        assert te.cosine(con, "dte-nli", "dte-sent") == pytest.approx(1 / math.sqrt(3))
        ranked = te.rank_prompts(con, "S1a", "nli", "zs")
        assert ranked["space"] == "S1aaaa" and ranked["dte"] == "dte-nli"
        assert [x["prompt"] for x in ranked["ranking"]] == ["good", "good-copy", "bad-x"]
        assert [x["cosine"] for x in ranked["ranking"]] == pytest.approx(
            [cos(V["nli"], V["p_good"])] * 2 + [cos(V["nli"], V["p_bad"])])
        models = te.rank_models(con, "S1aaaa", "para")["ranking"]
        assert models[0]["name"] == "full/para" and models[0]["cosine"] == pytest.approx(cos(V["para"], V["m_para"]))
        assert len(models) == 6 and [m["rank"] for m in models] == [1, 2, 3, 4, 5, 6]
        via_dte = te.rank_sources(con, "S1aaaa", "nli", "dte")["ranking"]
        assert [(x["source"], x["cosine"]) for x in via_dte] == [
            ("sent", pytest.approx(1 / math.sqrt(3))), ("para", pytest.approx(0.0, abs=1e-9))]
        via_mte = te.rank_sources(con, "S1aaaa", "nli", "mte")["ranking"]  # para: mean over its two models
        assert via_mte == [{"source": "para", "rank": 1, "cosine": pytest.approx(
            (cos(V["nli"], V["m_para"]) + cos(V["nli"], V["m_para2"])) / 2)}]
        ret = te.own_task_retrieval(con, "S1aaaa")
        assert [(m["model"], m["rank"]) for m in ret["models"]] == [("full/nli", 1), ("full/para", 1), ("full/para-s2", 1)]
        assert ret["chance_mean_rank"] == 2.0 and ret["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_embeddings_of_different_spaces_are_never_compared(store: ResultStore) -> None:
    with open_store(store.db_path) as con:
        with pytest.raises(AnalysisError, match="different spaces cannot be compared"):
            te.cosine(con, "dte-nli", "other-nli")
        rows = te.embedding_rows(con, task="nli", kind="DTE")
        with pytest.raises(AnalysisError, match="different spaces"):
            te.cosine_matrix(con, rows)
        with pytest.raises(AnalysisError, match="is ambiguous"):
            te.rank_prompts(con, "space-S1aaaa", "nli", "zs")  # one name, two spaces: give the id
        with pytest.raises(AnalysisError, match="unknown embedding space 'nope'"):
            te.rank_models(con, "nope", "nli")
        with pytest.raises(AnalysisError, match="no DTE of task 'para' in space S2bbbb"):
            te.rank_models(con, "S2b", "para")
        with pytest.raises(AnalysisError, match="no stored task embedding with run key x"):
            te.cosine(con, "dte-nli", "x")


def test_fute_selectors_store_the_cosines_for_any_selection_method(store: ResultStore) -> None:
    with open_store(store.db_path) as con:
        name = sel.resolve(con, "fute-dte@S1a")
        assert name == "fute-dte@S1aaaa"
        got = {(s, t): v for s, t, v in con.execute(
            "SELECT source, target, score FROM selector_scores WHERE selector = ?", [name]).fetchall()}
        assert got[("para", "sent")] == pytest.approx(1 / math.sqrt(3)) and len(got) == 6
        params = json.loads(con.execute("SELECT any_value(params)::VARCHAR FROM selector_scores WHERE selector = ?",
                                        [name]).fetchone()[0])
        assert params["space"] == "S1aaaa" and params["uses_target_labels"] is True
        mte = sel.resolve(con, "fute-mte@S1aaaa")
        assert con.execute("SELECT score FROM selector_scores WHERE selector = ? AND source = 'nli' AND target = 'para'",
                           [mte]).fetchone()[0] == pytest.approx(cos(V["para"], V["m_nli"]))
        assert sel.resolve(con, "fute") == "fute-dte@S1aaaa"  # the one space with DTEs to compare
    put(store, "other-para", "S2bbbb", "DTE", "para", [0.0, 1.0, 1.0])
    store.ingest()
    with open_store(store.db_path) as con:
        with pytest.raises(AnalysisError, match="needs exactly one embedding space with DTEs"):
            sel.resolve(con, "fute")
    assert sel.lookup("fute-dte@x") is not None and sel.lookup("taskshop-fute-dte@x").name == "taskshop-"


def test_vectors_are_found_after_the_results_folder_moves(store: ResultStore, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(str(store.root), moved)
    with open_store(moved / "transferlab.duckdb") as con:
        assert te.cosine(con, "dte-nli", "dte-para") == pytest.approx(0.0, abs=1e-9)
        (moved / "embeddings" / "dte-sent.npy").unlink()
        with pytest.raises(AnalysisError, match="vector file of embedding dte-sent is missing"):
            te.cosine(con, "dte-nli", "dte-sent")
