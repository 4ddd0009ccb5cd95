"""Search spaces (issue 18 point 5): spaces in a setup's `train` / `source_train` expand into one source /
baseline run per configuration with the values in the run key; the best configuration per (setup, task,
seed) is chosen on validation (`tuned_runs`), and transfers start from it with the target's best
hyperparameters. Plan expansion and the searcher's rule without a cluster; one tiny grid on real Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from rayjobs.config import ConfigError, PairwiseConfig, load_config, load_typed
from rayjobs.plan import expand_pairwise
from rayjobs.search_space import NoValidationScore, best_of
from rayjobs.tasks.registry import TaskRegistry
from tests.analysis.store.test_remote_results import s3  # noqa: F401 - the local S3 server fixture
from tests.conftest import DATA, REPO, cli, needs_data, tiny_grid

pytestmark = needs_data

VALIDATED = {"epochs": 1, "batch_size": 8, "eval_every": 1, "validation": {"n": 4}}


def grid_data(train: dict[str, Any], run: dict[str, Any] | None = None, **setup: Any) -> dict[str, Any]:
    d = yaml.safe_load(tiny_grid("space"))
    d["setups"][0]["train"] = train
    d["setups"][0].update(setup)
    d["run"].update(run or {})
    return d


def plan(d: dict[str, Any], tmp: Path | str = "/tmp/unused") -> list[Any]:
    return expand_pairwise(PairwiseConfig.model_validate(d), TaskRegistry.load(data_root=DATA), str(tmp))


def test_a_config_without_spaces_keeps_the_run_keys_it_had_before_search_spaces() -> None:
    # computed with the code of commit 98e3242, before search spaces existed: stored results keep their keys
    before = {("source", "snli", None): "2644b74da09144516eae", ("source", "mrpc", None): "2403ac52d7a1fecbef49",
              ("target", None, "snli"): "48ea876aa17d35d65044", ("target", None, "mrpc"): "cb3bf1f531591d386c85",
              ("transfer", "snli", "mrpc"): "2d3fceb93c0b02c8dc56",
              ("transfer", "mrpc", "snli"): "5b4560071e9414e3ec85"}
    trials = plan(yaml.safe_load(tiny_grid("s")))
    assert {(t.kind, t.source, t.target): t.run_key for t in trials} == before
    with_validation = {("source", "snli", None): "da44e4a51f33b944f93f", ("target", None, "mrpc"): "4cb21f755adfc1c3097e",
                       ("transfer", "snli", "mrpc"): "73bf9fefca8320eabbab"}
    d = grid_data({**VALIDATED, "learning_rate": 1e-3}, source_train={"epochs": 2, "batch_size": 8,
                                                                       "learning_rate": 3e-4})
    keys = {(t.kind, t.source, t.target): t.run_key for t in plan(d)}
    assert {k: keys[k] for k in with_validation} == with_validation


def test_a_grid_is_one_run_per_value_whose_key_is_that_of_the_plain_value() -> None:
    trials = plan(grid_data({**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-5]}}))
    kinds = [t.kind for t in trials]
    assert (kinds.count("source"), kinds.count("target"), kinds.count("transfer")) == (4, 4, 2)
    assert len({t.run_key for t in trials}) == 10
    # each configuration's run is exactly the run of the same setup written with that value
    for lr in (1e-2, 1e-5):
        plain = {(t.kind, t.source, t.target): t.run_key for t in plan(grid_data({**VALIDATED, "learning_rate": lr}))}
        searched = {(t.kind, t.source, t.target): t.run_key for t in trials
                    if t.kind != "transfer" and t.hparams.learning_rate == lr}
        assert searched == {k: v for k, v in plain.items() if k[0] != "transfer"}
    for x in (t for t in trials if t.kind == "transfer"):
        srcs = [t.run_key for t in trials if t.kind == "source" and t.source == x.source]
        bases = [t.run_key for t in trials if t.kind == "target" and t.target == x.target]
        assert x.source_candidates == srcs and list(x.baseline_candidates) == bases
        assert sorted(x.depends_on) == sorted(srcs + bases) and x.source_run_key is None
    labels = [t.label for t in trials if t.kind == "source" and t.source == "snli"]
    assert labels == ["source full:tiny snli seed=7 learning_rate=0.01",
                      "source full:tiny snli seed=7 learning_rate=1e-05"]


def test_sampled_spaces_are_reproducible_within_bounds_and_in_the_run_key() -> None:
    train = {**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-3]}, "weight_decay": {"loguniform": [1e-4, 1e-1]},
             "warmup_ratio": {"uniform": [0.0, 0.5]}, "batch_size": {"uniform": [2, 5]},
             "epochs": {"choice": [1, 2]}}
    d = grid_data(train, run={"num_samples": 3})
    a, b = plan(d), plan(d)
    assert [t.run_key for t in a] == [t.run_key for t in b]  # the same config, the same runs
    src = [t for t in a if t.kind == "source" and t.source == "snli"]
    assert len(src) == 6  # 2 grid points x 3 samples
    for t in src:
        hp = t.hparams
        assert 1e-4 <= hp.weight_decay <= 1e-1 and 0 <= hp.warmup_ratio <= 0.5 and hp.epochs in (1, 2)
        assert isinstance(hp.batch_size, int) and 2 <= hp.batch_size <= 5
        assert t.search.values == {"batch_size": hp.batch_size, "epochs": hp.epochs, "learning_rate": hp.learning_rate,
                                   "warmup_ratio": hp.warmup_ratio, "weight_decay": hp.weight_decay}
    assert [t.hparams.learning_rate for t in src] == [1e-2, 1e-3] * 3  # Tune's order: the grid, per sample
    assert len({t.run_key for t in src}) == 6 and len({t.search.group for t in src}) == 1
    other = plan(grid_data(train, run={"num_samples": 3, "search": {"seed": 1}}))
    assert not {t.run_key for t in other if t.kind == "source"} & {t.run_key for t in a if t.kind == "source"}
    # a grid alone with num_samples > 1 repeats the same configurations: each is one run
    assert len(plan(grid_data({**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-3]}}, run={"num_samples": 3}))) == 10


def test_source_train_spaces_search_the_source_stage_only() -> None:
    d = grid_data({**VALIDATED, "learning_rate": 1e-3},
                  source_train={**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-3, 1e-4]}})
    trials = plan(d)
    kinds = [t.kind for t in trials]
    assert (kinds.count("source"), kinds.count("target"), kinds.count("transfer")) == (6, 2, 2)
    x = next(t for t in trials if t.kind == "transfer")
    assert len(x.source_candidates) == 3 and not x.baseline_candidates and x.baseline_run_key
    assert x.hparams.learning_rate == 1e-3


@pytest.mark.parametrize(("value", "message"), [
    ({"gird": [1, 2]}, "train.learning_rate: unknown search space kind 'gird'"),
    ({"uniform": [1e-3, 1e-4]}, "train.learning_rate: `uniform` needs lo < hi"),
    ({"loguniform": [0, 1e-3]}, "train.learning_rate: `loguniform` needs 0 < lo"),
    ({"grid": ["fast", "slow"]}, "train.learning_rate: `grid` values must be numbers"),
    ({"grid": [1e-3, -1]}, "train.learning_rate: value -1.0 of the `grid` space is invalid: Input should be greater than 0"),
    ({"uniform": [1e-3]}, "train.learning_rate: `uniform` takes [lo, hi]"),
])
def test_bad_spaces_are_errors_naming_the_field(tmp_path: Path, value: Any, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(grid_data({**VALIDATED, "learning_rate": value})))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "field `setups.0`" in str(e.value) and message in str(e.value), str(e.value)


def test_spaces_on_fields_that_are_not_searchable_and_without_validation_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    cases = [({**VALIDATED, "optimizer": {"choice": ["adamw", "adafactor"]}}, "not on `optimizer`"),
             ({**VALIDATED, "eval_batch_size": {"grid": [8, 16]}}, "not on `eval_batch_size`"),
             ({**VALIDATED, "batch_size": {"grid": [8, 2.5]}}, "`batch_size` is an integer field"),
             ({"epochs": 1, "learning_rate": {"grid": [1e-2, 1e-3]}},
              "train has search spaces (learning_rate) but no validation: the best configuration is chosen on "
              "validation data only (never the eval split)")]
    for train, message in cases:
        f.write_text(yaml.safe_dump(grid_data(train)))
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert message in str(e.value), str(e.value)
    f.write_text(yaml.safe_dump(grid_data(VALIDATED, run={"search": {"algorithm": "optuna"}})))
    with pytest.raises(ConfigError, match="field `run.search.algorithm`.*unknown search algorithm 'optuna'"):
        load_config(f)
    budgeted = {**grid_data({**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-3]}}), "budget": {"runs": 0.5}}
    f.write_text(yaml.safe_dump(budgeted))
    with pytest.raises(ConfigError, match="`budget` and search spaces do not combine"):
        load_config(f)
    from rayjobs.multitask_config import MultitaskConfig

    space = ["setups.0.train.eval_every=1", "setups.0.train.validation={n: 4}",
             "setups.0.train.learning_rate={grid: [1.0e-3, 1.0e-4]}"]
    with pytest.raises(ConfigError, match="only `job: pairwise` expands"):
        load_typed(REPO / "configs" / "multitask_quickstart.yaml", MultitaskConfig, space)


def _row(key: str, status: str, score: float | None) -> dict[str, Any]:
    metrics = {} if score is None else {"best_validation_score": score}
    return {"run_key": key, "status": status, "metrics": json.dumps(metrics)}


def test_the_best_configuration_is_the_highest_validation_score_first_of_equals() -> None:
    assert best_of([_row("a", "ok", 0.5), _row("b", "ok", 0.75), _row("c", "ok", 0.75)], "x") == 1
    assert best_of([_row("a", "stopped", None), _row("b", "ok", 0.25)], "x") == 1  # stopped: a decided loser
    with pytest.raises(NoValidationScore, match="run b has no validation score.*never the eval split"):
        best_of([_row("a", "ok", 0.5), _row("b", "ok", None)], "x")
    with pytest.raises(ValueError, match="every candidate configuration was stopped early"):
        best_of([_row("a", "stopped", None)], "x")
    with pytest.raises(ValueError, match="candidate 1 is not stored as a decided run \\(failed\\)"):
        best_of([_row("a", "ok", 0.5), _row("b", "failed", None)], "x")


def test_searcher_releases_a_transfer_once_every_candidate_is_decided(tmp_path: Path) -> None:
    from ray.tune.search import Searcher

    from rayjobs.engine.tuning import make_searcher

    trials = plan(grid_data({**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-5]}}), tmp_path)
    singles = [t for t in trials if t.kind != "transfer"]
    x = next(t for t in trials if t.kind == "transfer" and t.source == "snli")  # snli -> mrpc
    s = make_searcher(trials, set(), "b", own_pool=False)
    ids = {}
    for i in range(8):
        ids[s.suggest(f"t{i}")["run_key"]] = f"t{i}"
    assert set(ids) == {t.run_key for t in singles} and s.suggest("t8") is None
    src_a, src_b = x.source_candidates
    base_a, base_b = x.baseline_candidates
    s.on_trial_complete(ids[src_a], {"final": True, "status": "ok"})
    s.on_trial_complete(ids[base_a], {"final": True, "status": "ok"})
    s.on_trial_complete(ids[base_b], {"final": True, "status": "ok"})
    assert s.suggest("t9") is None  # one source configuration is still running
    s.on_trial_complete(ids[src_b], {"final": True, "status": "stopped"})  # stopped early: decided
    assert s.suggest("t10")["run_key"] == x.run_key
    y = next(t for t in trials if t.kind == "transfer" and t.source == "mrpc")
    for k in y.source_candidates:  # every source configuration stopped: nothing to start from
        s.on_trial_complete(ids[k], {"final": True, "status": "stopped"})
    assert y.run_key in s.blocked
    for k in y.baseline_candidates:
        s.on_trial_complete(ids[k], {"final": True, "status": "ok"})
    s.on_trial_complete("t10", {"final": True, "status": "ok"})
    assert s.suggest("t11") is Searcher.FINISHED
    # a candidate stopped in an earlier run counts as decided for a resumed run
    r = make_searcher([x], {src_a, base_a, base_b}, "b", own_pool=False, stopped={src_b})
    assert r.suggest("u0")["run_key"] == x.run_key
    assert x.stopped_out({src_a, src_b}) and not x.stopped_out({src_b})


GRID = """
name: space
data_root: {data}
tasks: {{sources: [snli, mrpc]}}
seeds: [7]
sizes: {{source_train: 24, target_train: 24, eval: 16}}
setups:
  - model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 2, batch_size: 4, learning_rate: {{grid: [1.0e-7, 3.0e-3]}}, eval_every: 2,
             validation: {{n: 8}}}}
"""


@pytest.mark.integration
def test_grid_runs_every_configuration_and_transfers_start_from_the_best_on_validation(tmp_path: Path) -> None:
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(GRID.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "10 runs, 0 already stored, 10 to run" in r.stdout
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT run_key, kind, source, target, status, hparams, metrics, source_run_key, "
                       "baseline_run_key FROM runs").fetchall()
    assert len(rows) == 10 and len({x[0] for x in rows}) == 10 and all(x[4] == "ok" for x in rows)
    # the reference: from each stored validation curve, its best score; per (stage, task) the configuration
    # with the highest, the first in grid order of equal ones
    grid = [1e-7, 3e-3]
    expected: dict[tuple[str, str], tuple[str, float]] = {}
    for key, kind, src, tgt, _, hp, metrics, *_ in rows:
        if kind == "transfer":
            continue
        m, lr = json.loads(metrics), json.loads(hp)["learning_rate"]
        curve = [score for _, score in m["validation_curve"]]
        assert curve and m["n_validation"] == 8
        val = max(curve)
        cur = expected.get((kind, src or tgt))
        cur_lr = None if cur is None else next(json.loads(x[5])["learning_rate"] for x in rows if x[0] == cur[0])
        if cur is None or val > cur[1] or (val == cur[1] and grid.index(lr) < grid.index(cur_lr)):
            expected[(kind, src or tgt)] = (key, val)
    tuned = con.execute("SELECT stage, task, run_key, validation_score, config, n_decided, n_planned, complete "
                        "FROM tuned_runs").fetchall()
    assert {(s, t): (k, v) for s, t, k, v, *_ in tuned} == expected
    assert all(n == p == 2 and c for *_, n, p, c in tuned)
    assert all(json.loads(c)["learning_rate"] in grid for *_, c, _, _, _ in tuned)
    hps = {x[0]: json.loads(x[5]) for x in rows}
    for _key, kind, src, tgt, _, hp, _, source_key, base_key in rows:
        if kind != "transfer":
            continue
        assert source_key == expected[("source", src)][0]  # started from the best source's checkpoint
        assert (results / "checkpoints" / source_key).is_dir()
        assert base_key == expected[("target", tgt)][0]  # paired with, and trained like, the best baseline
        assert json.loads(hp)["learning_rate"] == hps[base_key]["learning_rate"]
    assert con.execute("SELECT count(*) FROM transfer_scores WHERE provenance = 'local'").fetchone()[0] == 2
    con.close()
    again = cli("run", str(cfg), "--results", str(results))
    assert again.returncode == 0 and "10 already stored, 0 to run" in again.stdout, again.stdout[-2000:]


def test_smoke_keeps_the_spaces_except_on_the_fields_it_fixes() -> None:
    from rayjobs.pairwise import smoke as smoke_pairwise

    cfg = PairwiseConfig.model_validate(grid_data({**VALIDATED, "learning_rate": {"grid": [1e-2, 1e-3]},
                                                     "epochs": {"choice": [5, 10]}}))
    small = smoke_pairwise(cfg)
    assert list(small.setups[0].train_space) == ["learning_rate"] and small.setups[0].train.epochs == 1


ASHA_GRID = """
name: space-asha
data_root: {data}
tasks: {{sources: [snli, mrpc], targets: [snli], exclude_self: false}}
seeds: [7]
sizes: {{source_train: 48, target_train: 48, eval: 16}}
setups:
  - model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 2, batch_size: 4, learning_rate: {{grid: [30.0, 1.0e-3]}}, eval_every: 1,
             validation: {{n: 16}}}}
run: {{max_concurrent_trials: 1, scheduler: {{asha: {{grace_period: 2, reduction_factor: 2, max_t: 100}}}}}}
"""


@pytest.mark.integration
def test_configurations_stopped_early_lose_and_transfers_need_one_left_on_each_side(tmp_path: Path) -> None:
    cfg = tmp_path / "asha.yaml"
    cfg.write_text(ASHA_GRID.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # stopped configurations are no failures
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    rows = con.execute("SELECT run_key, kind, source, target, status, metrics, source_run_key, baseline_run_key "
                       "FROM runs").fetchall()
    assert not [x for x in rows if x[4] == "failed"]
    assert [x for x in rows if x[4] == "stopped"], [(x[1], x[4]) for x in rows]
    # the reference: among each stage's ok configurations, the highest best validation score (first of equals)
    best: dict[tuple[str, str], str] = {}
    for kind, task in {(x[1], x[2] or x[3]) for x in rows if x[1] != "transfer"}:
        group = sorted((json.loads(x[5])["search"]["index"], x) for x in rows if x[1] == kind and (x[2] or x[3]) == task)
        ok = [(-json.loads(x[5])["best_validation_score"], i, x[0]) for i, x in group if x[4] == "ok"]
        if ok:
            best[kind, task] = min(ok)[2]
    tuned = dict(((s, t), k) for s, t, k in con.execute("SELECT stage, task, run_key FROM tuned_runs").fetchall())
    assert tuned == best
    transfers = [x for x in rows if x[1] == "transfer"]
    # a transfer runs where its source and its target each have a configuration left; none is missing
    # where every configuration of one of them was stopped (ASHA compares the trials of all tasks)
    runnable = {s for k, s in best if k == "source"} if ("target", "snli") in best else set()
    assert {x[2] for x in transfers} == runnable
    for x in transfers:
        assert x[6] == best["source", x[2]] and x[7] == best["target", "snli"]
    con.close()
    again = cli("run", str(cfg), "--results", str(results), timeout=600)  # decided: nothing is retried
    assert again.returncode == 0 and " 0 to run" in again.stdout, again.stdout[-2000:]


@pytest.mark.integration
def test_with_results_in_s3_a_transfer_pulls_only_its_chosen_source_checkpoint(s3: Any, tmp_path: Path) -> None:  # noqa: F811
    import os
    import shutil

    query, _ = s3
    uri = f"s3://tl-results/space?{query}"
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(GRID.format(data=DATA))
    first, mirror = tmp_path / "first", tmp_path / "node-mirror"
    first.mkdir()
    env = {**os.environ, "TRANSFERLAB_MIRROR": str(mirror)}
    r = cli("run", str(cfg), "--results", uri, cwd=first, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    con = duckdb.connect(str(first / "results" / "space" / "transferlab.duckdb"), read_only=True)
    chosen = {t: k for t, k in con.execute("SELECT task, run_key FROM tuned_runs WHERE stage = 'source'").fetchall()}
    con.close()
    # a fresh node mirror and a new target: its transfers read every candidate's row from the bucket but
    # download only the checkpoints of the sources they start from
    shutil.rmtree(mirror)
    second = tmp_path / "second"
    second.mkdir()
    r = cli("run", str(cfg), "tasks={sources: [snli, mrpc], targets: [snli, mrpc, cb]}", "--results", uri,
            cwd=second, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "10 already stored, 4 to run" in r.stdout  # cb's two baseline configurations, two transfers
    node = next(mirror.iterdir())
    assert {p.name for p in (node / "checkpoints").iterdir()} == set(chosen.values())
    con = duckdb.connect(str(second / "results" / "space" / "transferlab.duckdb"), read_only=True)
    got = con.execute("SELECT source, source_run_key FROM runs WHERE kind = 'transfer' AND target = 'cb'").fetchall()
    con.close()
    assert dict(got) == chosen
