"""Requests the analyses cannot answer are refused up front, with a message that says why:
a k larger than the candidate count, and a known selector whose scores this store lacks."""

from __future__ import annotations

import duckdb
import pytest
from analysis_support import copy_db, needs_taskweb, taskweb_db

from rayjobs.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def taskweb(tmp_path_factory):
    return str(copy_db(taskweb_db(), tmp_path_factory.mktemp("tw")))


@pytest.fixture(scope="module")
def no_selectors(tmp_path_factory):
    """TaskWeb's transfers without its released selector scores (as a store of local runs would be)."""
    db = copy_db(taskweb_db(), tmp_path_factory.mktemp("bare"))
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM selector_scores")
    return str(db)


# TaskWeb: 22 tasks, squad_v2 only a source, so every target has 21 candidate sources.
@needs_taskweb
@pytest.mark.parametrize("argv", [
    ["evaluate-selection", "--selector", "roe", "--setup", "finetune:t5l", "--k", "22"],
    ["evaluate-selection", "--selector", "roe", "--setup", "finetune:t5l", "--targets", "copa", "--k", "22"],
    ["tune-lambda", "--selector", "taskshop-roe", "--setup", "finetune:t5l", "--k", "22"],
    ["select", "--target", "copa", "--selector", "roe", "--k", "22"],
])
def test_k_above_the_candidates_is_rejected_like_select(taskweb, capsys, argv):
    code, out, err = run(capsys, *argv, "--db", taskweb)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("transferlab: error: k=22 but target '") and "' has only 21 candidate sources" in err


@needs_taskweb
def test_k_equal_to_the_candidates_is_fine(taskweb, capsys):
    code, out, err = run(capsys, "evaluate-selection", "--selector", "roe", "--setup", "finetune:t5l",
                         "--targets", "copa", "--k", "21", "--json", "--db", taskweb)
    assert code == 0, err
    assert '"regret_at_21": 0.0' in out  # the top 21 of 21 are the gold top 21: no regret


@needs_taskweb
@pytest.mark.parametrize("argv, message", [
    (["evaluate-selection", "--selector", "roe", "--setup", "finetune:t5l"],
     "selector 'roe' has no scores in this store ("),
    (["evaluate-selection", "--selector", "llm", "--setup", "finetune:t5l"],
     "selector 'llm' has no scores in this store ("),
    (["evaluate-selection", "--selector", "taskshop-llm", "--setup", "finetune:t5l"],
     "selector 'taskshop-llm' needs the scores of 'llm' as F, and this store ("),
    (["select", "--target", "copa", "--selector", "roe"], "selector 'roe' has no scores in this store ("),
    (["compare-selectors", "roe-minilm", "roe"], "selector 'roe-minilm' has no scores in this store ("),
    (["tune-lambda", "--selector", "taskshop-roe", "--setup", "finetune:t5l"],
     "needs the scores of 'roe' as F"),
])
def test_known_selector_without_scores_says_so(no_selectors, capsys, argv, message):
    code, _, err = run(capsys, *argv, "--db", no_selectors)
    assert code == 2 and message in err and "unknown selector" not in err
    assert "transferlab import taskweb DIR" in err or "compute-selector roe" in err


@needs_taskweb
def test_unknown_selector_is_still_unknown(no_selectors, capsys):
    code, _, err = run(capsys, "evaluate-selection", "--selector", "bogus", "--setup", "finetune:t5l",
                       "--db", no_selectors)
    assert code == 2 and "unknown selector 'bogus'" in err
