"""`transferlab report`: readable figures and a page a researcher can cite from -- captions,
provenance, and a selection table that reproduces paper 000's Table 2 from the TaskWeb release."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import duckdb
import numpy as np
import pandas as pd
import pytest
from analysis_support import TASKWEB, copy_db, needs_taskweb, taskweb_db

from analysis import transfer as an
from analysis.reports.experiment import graph_edges, offdiag_range, write_report
from analysis.store.duck import read_store
from rayjobs.cli import main

# Paper 000, Table 2 (percent): per category NDCG and Regret@5, then the mean over the 20 targets.
CATS = ["nli", "paraphrase", "commonsense", "sentiment", "qa", "semantics"]
TABLE2_NDCG = {
    "llm": [54.75, 47.01, 63.14, 65.71, 41.96, 56.07, 56.69],
    "roe": [66.53, 49.19, 65.70, 78.21, 84.46, 54.33, 64.52],
    "taskshop-llm": [54.12, 52.90, 67.26, 71.38, 51.12, 56.48, 59.69],
    "taskshop-roe": [75.14, 49.29, 79.49, 80.53, 85.74, 54.22, 71.54],
}
TABLE2_REGRET = {
    "llm": [3.31, 1.84, 6.92, 0.56, 3.79, 0.78, 3.67],
    "roe": [4.79, 1.38, 6.83, 0.14, 4.26, 1.84, 4.11],
    "taskshop-llm": [3.31, 0.85, 4.37, 0.22, 3.79, 0.86, 2.73],
    "taskshop-roe": [3.51, 1.35, 3.76, 0.04, 2.22, 1.67, 2.66],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    store = copy_db(taskweb_db(), tmp_path_factory.mktemp("store"))
    out = tmp_path_factory.mktemp("report")
    with read_store(store) as con:
        res = write_report(con, out, ["mean", "finetune:t5l"], store_path=store)
    return store, out, res, (out / "index.html").read_text()


@needs_taskweb
def test_selection_table_reproduces_table2(report):
    _, _, res, page = report
    tab = res["selection"]
    assert tab["setup"] == "finetune:t5l" and tab["categories"] == CATS
    rows = {r["selector"]: r for r in tab["rows"]}
    for name in TABLE2_NDCG:
        got_ndcg = [100 * rows[name]["by_category"][c][0] for c in CATS] + [100 * rows[name]["ndcg"]]
        got_regret = [100 * rows[name]["by_category"][c][1] for c in CATS] + [100 * rows[name]["regret"]]
        assert np.allclose(got_ndcg, TABLE2_NDCG[name], atol=0.006), name
        assert np.allclose(got_regret, TABLE2_REGRET[name], atol=0.006), name
        assert rows[name]["n_targets"] == 20
    assert "error" in rows["size"] and "no task sizes known" in rows["size"]["error"]  # TaskWeb ships none
    table = page[page.index("<h2>Source selection</h2>"):page.index("</table>", page.index("<h2>Source selection"))]
    assert "<b>71.54</b>" in table and "<b>2.66</b>" in table and "NDCG" in table and "R@5" in table


@needs_taskweb
def test_every_figure_has_a_caption_and_the_page_has_provenance(report):
    store, out, res, page = report
    figures = re.findall(r"<figure><img src=\"([^\"]+)\"[^>]*><figcaption>(.*?)</figcaption></figure>", page)
    assert sorted(f for f, _ in figures) == sorted(p.name for p in out.glob("*.png"))
    assert len(figures) == len(res["files"]) == 8 and all(len(c) > 120 for _, c in figures)
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert str(store.resolve()) in page
    assert dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d") in page
    assert "Runs: 31936 (31928 ok)" in page  # runs.csv rows; 8 with a NaN metric are stored as failed
    for name in ("runs.csv", "transfer_scores.csv", "roe_scores_minilm_dot32.csv"):
        assert hashlib.sha256((TASKWEB / name).read_bytes()).hexdigest()[:12] in page
    assert "mean over 7 setups" in page and "mean over setups" not in page


@needs_taskweb
def test_transitivity_table_gives_fraction_and_triples(report):
    """Counts checked against a direct loop over the averaged matrix (setup 'mean')."""
    store, _, _, page = report
    with read_store(store) as con:
        m = an.transfer_matrix(con, an.MEAN)
    tasks = sorted(set(m.index) | set(m.columns))
    t = m.reindex(index=tasks, columns=tasks).to_numpy(dtype=float)
    for h in (0.0, 0.05):
        n = pos = 0
        for a in range(len(tasks)):
            for b in range(len(tasks)):
                for c in range(len(tasks)):
                    if a != c and t[a, b] > h and t[b, c] > h and np.isfinite(t[a, c]):
                        n += 1
                        pos += t[a, c] > 0
        assert f"{pos / n:.3f} ({n})" in page
    assert "is not the mean of the coloured curves" in page


def test_graph_edges_keep_each_targets_strongest_sources():
    m = pd.DataFrame({"t1": [0.30, -0.50, 0.10, np.nan], "t2": [0.05, 0.04, np.nan, -0.01]},
                     index=["a", "b", "c", "t1"])
    edges = graph_edges(m, top_k=2)
    got = {(r.source, r.target, r.score) for r in edges.itertuples()}
    assert got == {("b", "t1", -0.50), ("a", "t1", 0.30), ("a", "t2", 0.05), ("b", "t2", 0.04)}
    assert set(graph_edges(m, top_k=2, min_abs=0.045)[["source", "target"]].itertuples(index=False, name=None)) == \
        {("b", "t1"), ("a", "t1"), ("a", "t2")}
    assert len(graph_edges(m, top_k=0)) == 6  # every known pair


def test_similarity_scale_leaves_out_the_diagonal():
    sim = pd.DataFrame([[1.0, 0.2, -0.1], [0.2, 1.0, 0.4], [-0.1, 0.4, 1.0]], index=list("xyz"), columns=list("xyz"))
    assert offdiag_range(sim) == (-0.1, 0.4)


@needs_taskweb
def test_one_setup_is_not_called_a_mean(tmp_path, capsys):
    db = copy_db(taskweb_db(), tmp_path)
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM published_transfer_scores WHERE NOT (model = 't5l' AND adaptation = 'finetune')")
        con.execute("DELETE FROM runs WHERE setup <> 'finetune:t5l'")
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--db", str(db)]) == 0
    capsys.readouterr()
    page = (out / "index.html").read_text()
    assert "finetune:t5l, the only setup" in page
    assert not re.search(r"mean over (\d+ )?setups", page) and "averaged matrix" not in page
    assert "<th>mean</th>" not in page.split("<h2>Transitivity</h2>")[1]  # no 'mean' row in the table
    assert not (out / "setup_similarity.png").exists()


def test_a_store_with_one_transfer_still_reports(tmp_path, capsys):
    """One measured pair: heatmap and graph, and a sentence (not an empty figure) for the rest."""
    from analysis.store.results import ResultStore

    db = tmp_path / "tl.duckdb"
    store = ResultStore(tmp_path, db_path=db)
    with store.connect() as con:
        store.insert_rows([
            {"run_key": "b1", "kind": "target", "setup": "full:tiny", "model": "tiny", "adaptation": "full",
             "target": "rte", "seed": 0, "score": 0.5, "metric": "accuracy"},
            {"run_key": "x1", "kind": "transfer", "setup": "full:tiny", "model": "tiny", "adaptation": "full",
             "source": "cb", "target": "rte", "seed": 0, "score": 0.6, "metric": "accuracy", "baseline_run_key": "b1"},
        ], con)
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--db", str(db)]) == 0
    assert "wrote 2 figures" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "no pair has both directions" in page and "No triple" in page
    assert "Regret@1" in page  # k shrinks to the one candidate source of rte
    assert sorted(p.name for p in out.glob("*.png")) == ["taskweb_graph_mean.png", "transfer_matrix_mean.png"]
