"""Multi-task sweep job: source-set choices by hand, run keys, the mixture, SQL views, bad inputs, Ray end to end.

The selection store is a real DuckDB file with a small hand-made selector ('toy') and published
transfers for a setup 'ft:toy' (the oracle), so every expected set below is computed by hand.
The shipped T5-3B config is checked against the paper's Tables 6 and 7 on the released TaskWeb data.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
import yaml
from analysis_support import TASKWEB, needs_taskweb, taskweb_db

from analysis.selection.selectors import store_scores
from analysis.store.duck import open_store
from analysis.store.results import ResultStore
from rayjobs.cli import main as cli_main
from rayjobs.config import ConfigError
from rayjobs.engine.smoke import smoke_variant
from rayjobs.multitask import candidate_pool, choose_sets, plan
from rayjobs.multitask_config import load_multitask_config
from rayjobs.tasks.registry import TaskError, TaskRegistry
from rayjobs.tasks.templates import render_train, resolve
from rayjobs.train.mixture import load_mixture

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

POOL = ["anli_r3", "snli", "scitail", "mrpc", "socialiqa", "qqp"]
# toy selector F(source -> target); wic and cb are scored but are not in the pool
TOY = {"cb": {"anli_r3": .9, "snli": .8, "scitail": .7, "mrpc": .3, "socialiqa": .2, "qqp": .1, "wic": .95},
       "copa": {"socialiqa": .9, "anli_r3": .5, "snli": .4, "scitail": .3, "mrpc": .2, "qqp": .1, "cb": .6}}
# published PC per (source, target) with PM = 0.5, so the transfer score is 0.5 * PC
ORACLE_PC = {"cb": {"anli_r3": .5, "scitail": .4, "snli": .3, "mrpc": 0., "socialiqa": -.1, "qqp": -.2},
             "copa": {"snli": .5, "socialiqa": .4, "anli_r3": .1, "scitail": 0., "mrpc": -.1, "qqp": -.3}}
TINY = {"name": "tiny", "config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 32},
        "max_length": 48, "head": "multiple_choice"}


def selection_db(folder: Path) -> Path:
    db = folder / "selection.duckdb"
    with open_store(db, create=True) as con:
        rows = [(s, t, v) for t, d in TOY.items() for s, v in d.items()]
        store_scores(con, "toy", "test", {}, pa.table({"source": [r[0] for r in rows], "target": [r[1] for r in rows],
                                                       "score": [r[2] for r in rows]}))
        con.executemany("INSERT INTO published_transfer_scores VALUES ('toy', 'ft', ?, ?, ?, 0.5, 'test')",
                        [(s, t, pc) for t, d in ORACLE_PC.items() for s, pc in d.items()])
    return db


def write_cfg(folder: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "job": "multitask", "name": "mt", "data_root": str(DATA), "targets": ["cb", "copa"], "pool": POOL, "n_per_source": 8,
        "selection": {"store": str(folder / "selection.duckdb"), "selector": "toy", "setup": "ft:toy"},
        "choices": [{"kind": "top", "k": 1}], "seeds": [7], "sizes": {"eval": 16},
        "setups": [{"model": TINY, "train": {"epochs": 1, "batch_size": 8}}],
    }
    cfg.update(over)
    path = folder / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sets_of(path: Path) -> dict[tuple[str, str], list[str]]:
    cfg = load_multitask_config(path)
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    with open_store(cfg.selection.store) as con:
        return {(s.target, s.selection): list(s.sources) for s in choose_sets(cfg, registry, POOL, con)}


# -- expansion -------------------------------------------------------------------------------------------
def test_choices_give_the_hand_computed_sets(tmp_path: Path) -> None:
    selection_db(tmp_path)
    got = sets_of(write_cfg(tmp_path, choices=[
        {"kind": "top", "k": [1, 3, "all"]}, {"kind": "bottom", "k": 2}, {"kind": "top", "selector": "oracle", "k": 2},
        {"kind": "mix", "k": 2, "targets": ["cb"]}, {"kind": "all", "targets": ["copa"]},
        {"kind": "top", "selector": "oracle", "setup": "ft:toy", "k": 2, "targets": ["cb"]},
        {"kind": "most_similar"}], most_similar={"cb": "snli", "copa": "socialiqa"}))
    assert got[("cb", "top-1:toy")] == ["anli_r3"]  # wic scores higher but is not in the pool
    assert got[("cb", "top-3:toy")] == ["anli_r3", "snli", "scitail"]
    assert got[("cb", "top-all:toy")] == ["anli_r3", "snli", "scitail", "mrpc", "socialiqa", "qqp"]
    assert got[("cb", "bottom-2:toy")] == ["qqp", "socialiqa"]
    assert got[("copa", "top-3:toy")] == ["socialiqa", "anli_r3", "snli"]
    assert got[("copa", "bottom-2:toy")] == ["qqp", "mrpc"]
    assert got[("cb", "top-2:oracle")] == ["anli_r3", "scitail"]
    assert got[("copa", "top-2:oracle")] == ["snli", "socialiqa"]
    # a choice naming its own transfer setup is a row of its own (not merged with the default's)
    assert got[("cb", "top-2:oracle[ft:toy]")] == ["anli_r3", "scitail"]
    # mixes: top-2, then the 2nd best replaced by the worst, then both replaced (= bottom-2)
    assert [got[("cb", f"mix-{i}of2:toy")] for i in range(3)] == [["anli_r3", "snli"], ["anli_r3", "qqp"],
                                                                  ["qqp", "socialiqa"]]
    assert ("copa", "mix-0of2:toy") not in got  # restricted to cb
    assert got[("copa", "all")] == [t for t in POOL]  # copa is not in the pool: leave-one-out keeps all six
    assert got[("cb", "most-similar")] == ["snli"] and got[("copa", "most-similar")] == ["socialiqa"]


def test_random_sets_are_seeded_and_drawn_from_the_pool(tmp_path: Path) -> None:
    selection_db(tmp_path)
    a = sets_of(write_cfg(tmp_path, choices=[{"kind": "random", "k": 3, "seed": 5}]))
    b = sets_of(write_cfg(tmp_path, choices=[{"kind": "random", "k": 3, "seed": 5}]))
    c = sets_of(write_cfg(tmp_path, choices=[{"kind": "random", "k": 3, "seed": 6}]))
    assert a == b and a != c
    for (target, name), srcs in a.items():
        assert name == "random-3:toy:seed=5" and len(set(srcs)) == 3 and set(srcs) <= set(POOL) - {target}
    # toy and the oracle score the same pool tasks: the random baseline does not depend on their scores
    d = sets_of(write_cfg(tmp_path, choices=[{"kind": "random", "k": 3, "seed": 5, "selector": "oracle"}]))
    assert {t: srcs for (t, _), srcs in d.items()} == {t: srcs for (t, _), srcs in a.items()}


def test_identical_sets_share_one_run_key(tmp_path: Path) -> None:
    selection_db(tmp_path)
    cfg = load_multitask_config(write_cfg(tmp_path, choices=[
        {"kind": "top", "k": [1, 3]}, {"kind": "top", "selector": "oracle", "k": [1, 3]},
        {"kind": "mix", "k": 2}, {"kind": "top", "k": 2}, {"kind": "most_similar"}, {"kind": "top", "k": 3}],
        most_similar={"cb": "anli_r3", "copa": "socialiqa"}, seeds=[7, 8]))
    store, trials, rows = plan(cfg, str(tmp_path / "res"))
    keys = {(r["target"], r["selection"], r["seed"]): r["run_key"] for r in rows}
    assert len(keys) == len(rows) == 2 * 2 * 9  # targets x seeds x distinct choices (top-3 listed twice)
    # cb: toy and oracle agree on top-1, and on the top-3 *set* (order anli, snli, scitail vs anli, scitail, snli)
    assert keys[("cb", "top-1:toy", 7)] == keys[("cb", "top-1:oracle", 7)]
    assert keys[("cb", "top-3:toy", 7)] == keys[("cb", "top-3:oracle", 7)]
    assert keys[("copa", "top-1:toy", 7)] != keys[("copa", "top-1:oracle", 7)]  # socialiqa vs snli
    assert keys[("cb", "mix-0of2:toy", 7)] == keys[("cb", "top-2:toy", 7)]
    assert keys[("cb", "top-1:toy", 7)] != keys[("cb", "top-1:toy", 8)]  # seeds differ
    # most similar trains on n * most_similar_k examples of one task: not the top-1 run of that task
    assert keys[("cb", "most-similar", 7)] != keys[("cb", "top-1:toy", 7)]
    by_key = {t.run_key: t for t in trials}
    assert len(by_key) == len(trials) == len(set(keys.values()))
    ms = by_key[keys[("cb", "most-similar", 7)]]
    assert ms.sources == ["anli_r3"] and ms.n_train == 8 * 5 and ms.kind == "multitask"
    t = by_key[keys[("cb", "top-3:toy", 7)]]
    assert t.sources == ["anli_r3", "scitail", "snli"] and t.target == t.eval_task == "cb" and t.n_train == 8
    # a re-plan is deterministic
    _, again, _ = plan(cfg, str(tmp_path / "res"))
    assert [x.run_key for x in again] == [x.run_key for x in trials]


def test_eval_templates_reach_the_trial_and_the_key(tmp_path: Path) -> None:
    selection_db(tmp_path)
    _, plain, _ = plan(load_multitask_config(write_cfg(tmp_path)), str(tmp_path / "res"))
    _, templ, _ = plan(load_multitask_config(write_cfg(tmp_path, eval_templates=["Q: {input}\nA:"])),
                       str(tmp_path / "res"))
    assert {t.run_key for t in plain}.isdisjoint({t.run_key for t in templ})
    registry = TaskRegistry.load(templ[0].task_files, templ[0].data_root)
    cb = registry.get("cb")  # the registry's own prompts, then the config's
    assert [t.input for t in cb.prompts] == [t.input for t in TaskRegistry.load([], DATA).get("cb").prompts] + \
        ["Q: {input}\nA:"]


# -- the mixture ---------------------------------------------------------------------------------------------
def test_mixture_has_n_per_source_and_no_target() -> None:
    registry = TaskRegistry.load([], DATA)
    sources = ["snli", "mrpc", "scitail"]
    mix = load_mixture(registry, sources, "cb", 10, seed=3)
    alone = [registry.load_data(s, 10, 1, seed=3).train for s in sources]
    assert len(mix.train) == 30 and mix.eval == ()
    assert Counter(mix.train) == Counter(e for part in alone for e in part)  # exactly these 10 from each
    assert list(mix.train) != [e for part in alone for e in part]  # shuffled together
    target_texts = {e.text for e in registry.load_data("cb", None, None, seed=3).train}
    assert not target_texts & {e.text for e in mix.train}
    assert mix.spec.name == "cb" and all(f"{s}=local:" in mix.origin and "(n=10)" in mix.origin for s in sources)
    assert load_mixture(registry, sources, "cb", 10, seed=3).train == mix.train
    with pytest.raises(TaskError, match="contains its target 'cb'"):
        load_mixture(registry, ["snli", "cb"], "cb", 10, seed=3)


def test_mixture_renders_each_source_with_its_own_templates() -> None:
    """Sources are prompted before they are shuffled together: every example carries one of *its own*
    task's templates (snli's verbalised labels stay with snli examples, mrpc's with mrpc's)."""
    registry = TaskRegistry.load([], DATA)
    render = lambda spec, exs: render_train(exs, resolve(spec, "all", "seq2seq"), 3)  # noqa: E731
    mix = load_mixture(registry, ["snli", "mrpc"], "cb", 20, seed=3, render=render)
    raw = {s: registry.load_data(s, 20, 1, seed=3).train for s in ("snli", "mrpc")}
    for s, examples in raw.items():
        ours = [e for e in mix.train if any(r.text in e.text for r in examples)]
        assert len(ours) == 20
        allowed = {tuple(p.answer_choices) for p in registry.get(s).prompts}
        assert {e.choices for e in ours} == allowed  # both templates used, only this task's
        for e in ours:
            assert any(e.text == p.input.format(input=r.text, options=", ".join(p.answer_choices),
                                                options_list="".join(f"\n- {c}" for c in p.answer_choices))
                       for p in registry.get(s).prompts for r in examples)


# -- SQL views ------------------------------------------------------------------------------------------------
def test_views_against_a_hand_computed_example(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    # (target, selection, method, k, replaced, seed, score); mix-0 shares top-2's run
    cells = [("cb", "top-2:x", "top", 2, None, 1, .60), ("cb", "top-2:x", "top", 2, None, 2, .70),
             ("copa", "top-2:x", "top", 2, None, 1, .80), ("copa", "top-2:x", "top", 2, None, 2, .90),
             ("cb", "bottom-2:x", "bottom", 2, None, 1, .30), ("copa", "bottom-2:x", "bottom", 2, None, 1, .50),
             ("cb", "random-2:x:seed=0", "random", 2, None, 1, .40),
             ("cb", "mix-1of2:x", "mix", 2, 1, 1, .55), ("cb", "mix-2of2:x", "mix", 2, 2, 1, .30),
             ("cb", "all", "all", 5, None, 1, .50), ("copa", "all", "all", 6, None, 1, .70)]
    runs, sel = [], []
    for i, (t, name, method, k, rep, seed, score) in enumerate(cells):
        key = f"k{i}"
        runs.append({"run_key": key, "experiment": "e", "kind": "multitask", "setup": "s", "target": t,
                     "sources": ["a", "b"], "seed": seed, "score": score,
                     "metrics": {"prompt_scores": [score - .1, score + .1]}})
        sel.append((name, t, seed, method, k, rep, key))
    sel.append(("mix-0of2:x", "cb", 1, "mix", 2, 0, "k0"))
    runs.append({"run_key": "bad", "experiment": "e", "kind": "multitask", "setup": "s", "target": "cb",
                 "seed": 3, "score": .99, "status": "failed"})
    sel.append(("top-2:x", "cb", 3, "top", 2, None, "bad"))  # a failed run counts nowhere
    with store.connect() as con:
        store.insert_rows(runs, con)
        con.executemany("INSERT INTO multitask_selections VALUES ('e', 's', ?, ?, ?, ?, 'x', 'ft:t', ?, ?, "
                        "['a', 'b'], ?)", [(t, n, sd, m, k, r, key) for n, t, sd, m, k, r, key in sel])
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        assert q("SELECT prompt_scores FROM multitask_runs WHERE run_key = 'k0' AND method = 'top'") == [([.5, .7],)]
        scores = {(t, s): (round(v, 6), n) for t, s, v, n in q("SELECT target, selection, score, n_seeds FROM multitask_scores")}
        assert scores[("cb", "top-2:x")] == (.65, 2) and scores[("copa", "top-2:x")] == (.85, 2)
        table = {r[0]: r[1:] for r in q("SELECT selection, by_target, round(mean, 6), n_targets FROM multitask_table")}
        assert table["top-2:x"] == (pytest.approx({"cb": .65, "copa": .85}), .75, 2)
        assert table["bottom-2:x"] == (pytest.approx({"cb": .30, "copa": .50}), .40, 2)
        assert table["all"] == (pytest.approx({"cb": .50, "copa": .70}), .60, 2)  # one row although k is 5 and 6
        assert dict(q("SELECT selection, k FROM multitask_table")) == {
            "top-2:x": 2, "bottom-2:x": 2, "random-2:x:seed=0": 2, "mix-0of2:x": 2, "mix-1of2:x": 2,
            "mix-2of2:x": 2, "all": None}
        assert q("SELECT selection, round(mean, 6) FROM multitask_topk") == [("top-2:x", .75)]
        assert sorted(q("SELECT method, round(mean, 6) FROM multitask_bottom_random")) == [
            ("bottom", .40), ("random", .40), ("top", .75)]
        curve = q("SELECT replaced, round(score, 6), round(change, 6) FROM multitask_mix_curve ORDER BY replaced")
        assert curve == [(0, .60, 0.0), (1, .55, -.05), (2, .30, -.30)]


# -- bad inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, field, message", [
    ({"targets": ["cb", "nosuch"]}, "targets.1", "unknown task 'nosuch'"),
    ({"targets": ["cb", "ghost"]}, "targets.1", "data file"),
    ({"pool": ["snli", "nosuch"]}, "pool.1", "unknown task 'nosuch'"),
    ({"choices": [{"kind": "most_similar"}], "most_similar": {"cb": "nosuch"}}, "most_similar.cb", "unknown task"),
    ({"choices": [{"kind": "most_similar"}], "most_similar": {"cb": "snli"}}, "most_similar", "target 'copa'"),
    ({"choices": [{"kind": "most_similar"}], "most_similar": {"cb": "snli", "copa": "snli", "rte": "snli"}},
     "most_similar.rte", "not one of the sweep's targets"),
    ({"selection": {"selector": "toy", "store": "SEL", "lambda": 1.5}}, "selection.lambda", "less than or equal to 1"),
    ({"setups": [{"model": TINY, "prompts": {"eval": "nosuch"}}]}, "setups.0", "no prompt template 'nosuch'"),
    ({"selection": {"selector": "nope", "store": "SEL"}}, "selection.selector", "unknown selector 'nope'"),
    ({"choices": [{"kind": "top", "selector": "oracle"}], "selection": {"selector": "toy", "store": "SEL",
                                                                        "setup": "ft:nope"}},
     "selection.setup", "no transfer scores for setup 'ft:nope'"),
    ({"choices": [{"kind": "top", "k": 7}]}, "choices.0.k", "k=7 but target 'cb' has only 6 candidate sources"),
    ({"choices": [{"kind": "mix", "k": 4}]}, "choices.0.k", "2k=8"),
    ({"selection": {"store": "MISSING", "selector": "toy"}}, "selection.store", "transferlab import taskweb"),
    ({"setups": [{"model": {**TINY, "head": "auto"}}]}, "setups.0.model.head", "multiple_choice"),
    ({"choices": [{"kind": "mix", "k": [1, 2]}]}, "choices.0", "one integer k"),
    ({"choices": [{"kind": "all", "k": 3}]}, "choices.0", "takes no k"),
    ({"sizes": {"target_train": 10}}, "sizes", "use n_per_source"),
    ({"choice": []}, "choice", "unknown field"),
])
def test_bad_inputs_fail_before_training_naming_the_field(tmp_path: Path, over: dict, field: str,
                                                          message: str) -> None:
    selection_db(tmp_path)
    ghost = tmp_path / "ghost.yaml"
    ghost.write_text("tasks:\n  ghost:\n    choices: [a, b]\n    local: {format: natinstruct, path: nope.jsonl}\n")
    sel = over.get("selection")
    if sel is not None:
        sel["store"] = {"SEL": str(tmp_path / "selection.duckdb"), "MISSING": str(tmp_path / "none.duckdb")}[sel["store"]]
    path = write_cfg(tmp_path, task_files=[str(ghost)], **over)
    with pytest.raises(ConfigError) as err:
        plan(load_multitask_config(path), str(tmp_path / "res"))
    assert f"{path}: field `{field}" in str(err.value) and message in str(err.value)
    assert not list((tmp_path / "res" / "runs").glob("*"))


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    selection_db(tmp_path)
    path = write_cfg(tmp_path, choices=[{"kind": "top", "k": 9}])
    r = subprocess.run([sys.executable, "-m", "rayjobs.multitask", "--config", str(path), "--results",
                        str(tmp_path / "res")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "field `choices.0.k`: k=9 but target 'cb' has only 6" in r.stderr
    # `transferlab run` runs the same driver
    assert cli_main(["run", str(path), "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transferlab: error:" in err and "k=9 but target 'cb'" in err


# -- the paper's sets from the released TaskWeb data ---------------------------------------------------------
# Paper 000, Appendix Tables 6 (TaskShop with F = RoE) and 7 (TaskWeb scores of the target), top-5 in order.
TABLE6 = {"anli_r3": ["rte", "cb", "snli", "cosmosqa", "socialiqa"], "cb": ["anli_r3", "cosmosqa", "socialiqa", "wsc", "snli"],
          "copa": ["cosmosqa", "socialiqa", "winogrande", "hellaswag", "piqa"],
          "hellaswag": ["piqa", "cosmosqa", "socialiqa", "winogrande", "copa"],
          "rte": ["anli_r3", "qnli", "socialiqa", "mrpc", "squad_v2"], "wic": ["piqa", "mrpc", "anli_r3", "hellaswag", "socialiqa"],
          "winogrande": ["socialiqa", "cosmosqa", "piqa", "copa", "wsc"], "wsc": ["winogrande", "anli_r3", "socialiqa", "wic", "rte"]}
TABLE7 = {"anli_r3": ["cosmosqa", "boolq", "snli", "rotten_tomatoes", "rte"],
          "cb": ["anli_r3", "boolq", "snli", "rotten_tomatoes", "scitail"],
          "copa": ["cosmosqa", "winogrande", "scitail", "piqa", "socialiqa"],
          "hellaswag": ["cosmosqa", "socialiqa", "piqa", "rte", "rotten_tomatoes"],
          "rte": ["anli_r3", "cosmosqa", "winogrande", "squad_v2", "socialiqa"], "wic": ["qnli", "mrpc", "snli", "rte", "anli_r3"],
          "winogrande": ["squad_v2", "socialiqa", "cosmosqa", "anli_r3", "quartz"],
          "wsc": ["anli_r3", "qnli", "qqp", "socialiqa", "snli"]}


def t5l_scores() -> dict[str, dict[str, float]]:
    """TaskWeb's score 0.5*PC + 0.5*(0.2*PM - 0.1) of finetune:t5l, read straight from the released CSV."""
    out: dict[str, dict[str, float]] = {}
    with open(TASKWEB / "transfer_scores.csv") as f:
        for r in csv.DictReader(f):
            if (r["model"], r["adaptation"]) == ("t5l", "finetune") and r["source"] != r["target"]:
                out.setdefault(r["target"], {})[r["source"]] = .5 * float(r["pc"]) + .5 * (.2 * float(r["pm"]) - .1)
    return out


def t5_3b_config(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root
    raw = yaml.safe_load((REPO / "configs" / "multitask_t5_3b.yaml").read_text())
    return load_multitask_config(REPO / "configs" / "multitask_t5_3b.yaml",
                                 {"selection": {**raw["selection"], "store": str(taskweb_db())}})


@needs_taskweb
def test_t5_3b_config_chooses_the_papers_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = t5_3b_config(monkeypatch)
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    pool = candidate_pool(cfg, registry, "t5-3b")
    with open_store(cfg.selection.store) as con:
        got = {(s.target, s.selection): list(s.sources) for s in choose_sets(cfg, registry, pool, con)}
    gold = t5l_scores()
    for t in cfg.targets:
        assert got[(t, "top-5:taskshop-roe")] == TABLE6[t]
        assert got[(t, "top-5:oracle")] == TABLE7[t]
        assert sorted(got[(t, "all")]) == sorted(set(pool) - {t}) and len(got[(t, "all")]) == 21
        assert got[(t, "top-all:taskshop-roe")] != got[(t, "all")] and sorted(got[(t, "top-all:taskshop-roe")]) == \
            sorted(got[(t, "all")])  # the same set, in TaskShop's order
        # the ranking breaks ties by name (wsc has three sources tied at -0.0354); bottom-5 is its tail, reversed
        worst = sorted(gold[t], key=lambda s: (-gold[t][s], s))[::-1][:5]
        assert got[(t, "bottom-5:oracle")] == worst
        assert got[(t, "most-similar")] == [cfg.most_similar[t]]
        rnd = got[(t, "random-5:taskshop-roe:seed=0")]
        assert len(set(rnd)) == 5 and t not in rnd
    for t in ["anli_r3", "copa", "hellaswag", "rte"]:  # Figure 4: top-5 replaced one at a time by the bottom-5
        worst = sorted(gold[t], key=lambda s: (-gold[t][s], s))[::-1][:5]
        assert [got[(t, f"mix-{i}of5:oracle")] for i in range(6)] == [TABLE7[t][:5 - i] + worst[:i] for i in range(6)]
    assert ("cb", "mix-0of5:oracle") not in got


@needs_taskweb
def test_smoke_shrinks_the_t5_3b_sweep_to_local_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = smoke_variant(t5_3b_config(monkeypatch))
    registry = TaskRegistry.load(cfg.task_files, cfg.data_root)
    # a DeepSpeed setup: one target, the first choice of each kind, k = 1 (each run is a worker group)
    assert cfg.targets == ["anli_r3"] and cfg.seeds == [42] and cfg.setups[0].model.config is not None
    assert [c.kind for c in cfg.choices] == ["top", "all", "most_similar", "random", "bottom", "mix"]
    store, trials, rows = plan(cfg, str(tmp_path / "res"))
    assert {r["selection"] for r in rows} == {"top-1:roe", "all", "most-similar", "random-1:taskshop-roe:seed=0",
                                              "bottom-1:taskshop-roe", "mix-0of1:oracle", "mix-1of1:oracle"}
    assert all(registry.origin(s).startswith("local:") for t in trials for s in t.sources)
    by_sel = {r["selection"]: r["run_key"] for r in rows}
    assert len(trials) <= 7 and by_sel["mix-0of1:oracle"] != by_sel["mix-1of1:oracle"]


# -- end to end on Ray -------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sweep_on_ray_stores_sets_and_resumes(tmp_path: Path) -> None:
    selection_db(tmp_path)
    # cb: toy and the oracle both pick anli_r3 (one run for two choices); copa: the oracle's top-2
    path = write_cfg(tmp_path, choices=[{"kind": "top", "k": 1, "targets": ["cb"]},
                                        {"kind": "top", "selector": "oracle", "k": 1, "targets": ["cb"]},
                                        {"kind": "top", "selector": "oracle", "k": 2, "targets": ["copa"]}],
                     eval_templates=["Q: {input}\nA:"])
    results = tmp_path / "res"
    cmd = [sys.executable, "-m", "rayjobs.multitask", "--config", str(path), "--results", str(results)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 (choice, target, setup, seed) cells -> 2 distinct runs, 0 already stored, 2 to run" in r.stdout
    table = r.stdout[r.stdout.index("Zero-shot target scores"):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["top-1:oracle", "top-1:toy", "top-2:oracle"]
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    got = con.execute("SELECT target, list_sort(sources), n_train, metrics->'$.prompts', "
                      "json_array_length(metrics, '$.prompt_scores'), status FROM runs ORDER BY target").fetchall()
    assert [(t, s, n, yaml.safe_load(tm), nt, st) for t, s, n, tm, nt, st in got] == [
        ("cb", ["anli_r3"], 8, ["gpt3-style", "options", "must-be-true", "extra0"], 4, "ok"),
        ("copa", ["snli", "socialiqa"], 16, ["choose", "options", "extra0"], 3, "ok")]
    sel = con.execute("SELECT target, selection, sources, run_key FROM multitask_runs ORDER BY target, selection").fetchall()
    assert [x[:3] for x in sel] == [("cb", "top-1:oracle", ["anli_r3"]), ("cb", "top-1:toy", ["anli_r3"]),
                                    ("copa", "top-2:oracle", ["snli", "socialiqa"])]
    assert sel[0][3] == sel[1][3] != sel[2][3]
    for score, tmpl in con.execute("SELECT score, metrics->'$.prompt_scores' FROM runs").fetchall():
        assert score == pytest.approx(sum(yaml.safe_load(tmpl)) / len(yaml.safe_load(tmpl)))
    con.close()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 already stored, 0 to run" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")} == mtimes
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    con.close()
