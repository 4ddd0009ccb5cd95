"""`transferlab budget-eval` and `predict-transfers` end to end: the --json record, the figure,
the completed grid as TaskShop's T, and exit status 2 on bad requests."""

from __future__ import annotations

import json

import duckdb
from analysis_support import copy_db, needs_taskweb, pristine_taskweb_db

from rayjobs.cli import main

pytestmark = needs_taskweb


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_budget_eval_json_and_figure(tmp_path, capsys):
    fig = tmp_path / "budget.png"
    code, out, err = run(capsys, "budget-eval", "--setup", "finetune:t5l", "--policy", "racing", "--fraction", "0.2",
                         "--splits", "3", "--json", "--figure", str(fig))
    assert code == 0, err
    res = json.loads(out)
    assert res["setup"] == "finetune:t5l" and res["policy"] == "racing" and len(res["splits"]) == 3
    for sp in res["splits"]:
        assert len(sp["seeds_seen"]) == 4
        seeds = {r["seed"] for r in sp["runs"]}
        assert seeds <= set(sp["seeds_seen"])
        assert len(sp["runs"]) == sp["spent"]["transfers"]
        total = sp["spent"]["transfers"] + sp["spent"]["baselines"] + sp["spent"]["sources"]
        assert total <= int(0.2 * res["full_grid_runs"])
        assert len(sp["ranking"]) == 21 and all(len(v) == 21 for v in sp["ranking"].values())
        assert set(sp["ranking"]["copa"]) == {r for r in sp["ranking"]["rte"] + ["rte"]} - {"copa"}
    methods = {t["method"] for t in res["table"]}
    assert {"racing", "random", "prior-topk", "full grid on A (4 seeds)"} <= methods
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_eval_bad_requests_exit_2(capsys):
    for argv, msg in ((["--setup", "finetune:t5l", "--policy", "greedy"], "unknown budget policy"),
                      (["--setup", "finetune:t9"], "no per-seed transfer runs for setup"),
                      (["--setup", "finetune:t5l", "--fraction", "-1"], "must be positive"),
                      (["--setup", "finetune:t5l", "--seen", "8"], "seeds seen must be between")):
        try:
            code, _, err = run(capsys, "budget-eval", *argv, "--splits", "1")
        except SystemExit as e:  # argparse refuses a bad value itself
            code, err = e.code, capsys.readouterr().err
        assert code == 2 and msg in err, (argv, err)


def test_predicted_grid_is_a_setup_for_selectors(tmp_path, capsys):
    db = str(copy_db(pristine_taskweb_db(), tmp_path))
    mean_sql = "SELECT sum(score), count(*) FROM analysis_transfers WHERE setup = 'mean'"
    with duckdb.connect(db, read_only=True) as con:
        mean_before = con.execute(mean_sql).fetchone()
    code, out, err = run(capsys, "predict-transfers", "--setup", "finetune:t5l", "--seeds", "10", "--db", db)
    assert code == 0, err
    assert "(441 observed, 0 predicted)" in out
    con = duckdb.connect(db, read_only=True)
    n, obs, bad_sd = con.execute("SELECT count(*), count(*) FILTER (WHERE observed), count(*) FILTER (WHERE sd <= 0) "
                                 "FROM predicted_transfer_scores WHERE setup = 'finetune:t5l'").fetchone()
    assert (n, obs, bad_sd) == (441, 441, 0)
    assert con.execute("SELECT max(seeds_run) FROM predicted_transfer_scores").fetchone()[0] == 1
    # the 'mean' pseudo-setup stays the mean of the real setups
    total, count = con.execute(mean_sql).fetchone()
    assert count == mean_before[1] and abs(total - mean_before[0]) < 1e-9  # (summation order aside)
    assert con.execute("SELECT count(DISTINCT setup) FROM setup_transfers WHERE setup LIKE '%@predicted'").fetchone()[0] == 1
    con.close()
    code, out, err = run(capsys, "evaluate-selection", "--selector", "taskshop-roe", "--setup",
                         "finetune:t5l@predicted", "--json", "--db", db)
    assert code == 0, err
    res = json.loads(out)
    assert res["setup"] == "finetune:t5l@predicted" and 0.5 < res["ndcg"] < 1
    code, _, err = run(capsys, "predict-transfers", "--setup", "finetune:t5l", "--seeds", "99", "--db", db)
    assert code == 2 and "none of seeds [99]" in err


def test_help_states_every_default():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2]))  # tests/: test_cli_help.py
    from tests.test_cli_help import test_every_argument_has_help_with_its_default as check

    for name in ("budget-eval", "predict-transfers"):
        check(name)
