"""MTL with hard parameter sharing (paper 003): one-task batches drawn by proportional / temperature sampling,
task heads that only learn from their own task's batches, and the `mtl` job end to end on a real local Ray."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import duckdb
import pytest
import torch

from analysis.store.results import ResultStore
from rayjobs.config import AdaptationSpec, ConfigError, ModelSpec, TrainSpec
from rayjobs.job import load_job_config
from rayjobs.models.adaptation import apply_adaptation
from rayjobs.models.loading import ModelError
from rayjobs.models.multihead import MultiHeadModel, TaskExample, tag
from rayjobs.mtl import TaskBatcher
from rayjobs.tasks.registry import TaskRegistry
from rayjobs.train.backend import TorchBackend
from tests.conftest import DATA, TINY_BERT, cli, needs_data

pytestmark = needs_data


def examples(task: str, n: int) -> list[TaskExample]:
    return [TaskExample(f"{task} {i}", ("a", "b"), i % 2, uid=f"{task}{i}", task=task) for i in range(n)]


# -- sampling ----------------------------------------------------------------------------------------------
def test_temperature_weights_are_n_to_the_one_over_t() -> None:
    assert TaskBatcher("temperature=2").weights([100, 400]) == pytest.approx([10 / 30, 20 / 30])
    assert TaskBatcher("temperature=1").weights([100, 400]) == pytest.approx([0.2, 0.8])
    for bad in ("temperature", "uniform", "proportional=2"):
        with pytest.raises(ValueError, match="sampling"):
            TaskBatcher(bad)


def test_proportional_epoch_sees_every_example_once_in_one_task_batches() -> None:
    exs = examples("a", 30) + examples("b", 90)
    batches = TaskBatcher("proportional")(exs, 8, random.Random(0))
    assert all(len({e.task for e in b}) == 1 for b in batches)
    assert len(batches) == math.ceil(30 / 8) + math.ceil(90 / 8)
    assert sorted(e.uid for b in batches for e in b) == sorted(e.uid for e in exs)
    firsts = [b[0].task for b in batches[:8]]
    assert "a" in firsts and "b" in firsts  # tasks interleave, not one block after the other


@pytest.mark.parametrize("sampling,share_a", [("temperature=1", 0.25), ("temperature=1000000", 0.5),
                                              ("temperature=2", 1 / (1 + math.sqrt(3)))])
def test_temperature_sampling_draws_tasks_with_the_expected_frequencies(sampling: str, share_a: float) -> None:
    exs = examples("a", 30) + examples("b", 90)
    batcher, rng = TaskBatcher(sampling), random.Random(1)
    counts: Counter[str] = Counter()
    for _ in range(300):
        batches = batcher(exs, 8, rng)
        assert len(batches) == 16 and all(len({e.task for e in b}) == 1 for b in batches)
        counts.update(b[0].task for b in batches)
    # 4800 draws: the standard deviation of the share is at most 0.0073
    assert counts["a"] / sum(counts.values()) == pytest.approx(share_a, abs=0.03)


# -- the multi-head model ----------------------------------------------------------------------------------
def model(registry: TaskRegistry, method: str = "full") -> MultiHeadModel:
    torch.manual_seed(0)
    tm = MultiHeadModel(ModelSpec(name="tiny", config=TINY_BERT, max_length=48),
                        {t: registry.get(t) for t in ("cb", "scitail")})
    return apply_adaptation(tm, AdaptationSpec(method=method), "encoder")


def snapshot(tm: MultiHeadModel, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tm.module.named_parameters() if n.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_head_trains_only_on_its_own_tasks_batches(registry: TaskRegistry) -> None:
    tm = model(registry)
    cb = tm.collate(tag(registry.load_data("cb", 8, 1, seed=0).train, "cb"))
    sci = tm.collate(tag(registry.load_data("scitail", 8, 1, seed=0).train, "scitail"))
    tm.module.train()
    tm.loss(cb).backward()
    grads = {n: p.grad for n, p in tm.module.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("heads.scitail."))
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("heads.cb."))
    assert grads["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0
    tm.module.zero_grad(set_to_none=True)

    # steps of the loop's optimiser (AdamW with weight decay): after scitail's head has Adam state, a cb step
    # must still leave it exactly as it was, and the other way round
    backend = TorchBackend(tm, TrainSpec(learning_rate=1e-2, weight_decay=0.1), total_steps=10)
    for batch, own, other in ((cb, "heads.cb.", "heads.scitail."), (sci, "heads.scitail.", "heads.cb."),
                              (cb, "heads.cb.", "heads.scitail.")):
        before_own, before_other, before_enc = snapshot(tm, own), snapshot(tm, other), snapshot(tm, "encoder.")
        backend.backward(tm.loss(batch))
        backend.step()
        assert same(snapshot(tm, other), before_other)
        assert not same(snapshot(tm, own), before_own)
        assert not same(snapshot(tm, "encoder."), before_enc)


def test_scores_come_from_the_batches_task_head(registry: TaskRegistry) -> None:
    tm = model(registry)
    tm.module.eval()
    exs = tag(registry.load_data("scitail", 4, 1, seed=0).train, "scitail")
    recs = tm.member("scitail").score(tm.collate(exs))
    enc = tm.tokenizer([e.text for e in exs], padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        hidden = tm.module.encoder(**enc).last_hidden_state[:, 0]
        want = torch.softmax(tm.module.heads["scitail"](hidden).double(), -1)
    for rec, w in zip(recs, want, strict=True):
        assert rec["choices"] == ["entails", "neutral"] and rec["probs"] == pytest.approx(w.tolist(), abs=1e-6)
    assert tm.member("cb").task.name == "cb" and tm.task.name == "cb"
    with pytest.raises(ModelError, match="one task's examples"):
        tm.collate([*exs[:1], *tag(registry.load_data("cb", 1, 1, seed=0).train, "cb")])
    with pytest.raises(ModelError, match="no head for task 'qqp'"):
        tm.member("qqp")


def test_lora_and_bitfit_train_the_heads(registry: TaskRegistry) -> None:
    for method in ("lora", "bitfit"):
        tm = model(registry, method)
        trainable = {n for n, p in tm.module.named_parameters() if p.requires_grad}
        heads = {n for n, _ in tm.module.named_parameters() if tm.is_head(n)}
        assert heads and heads <= trainable, method
        assert len(trainable) < len(list(tm.module.parameters())), method


def test_member_ids_are_qualified_only_where_two_members_share_one() -> None:
    from rayjobs.mtl import _unique_ids

    local = [{"task": "cb", "example_id": "task1388-a", "template": "input"},
             {"task": "scitail", "example_id": "task1554-b", "template": "input"}]
    assert _unique_ids(local) == local
    hf = [{"task": "rte", "example_id": "validation:0", "template": "input"},
          {"task": "boolq", "example_id": "validation:0", "template": "input"},
          {"task": "boolq", "example_id": "validation:1", "template": "input"}]
    assert [r["example_id"] for r in _unique_ids(hf)] == ["rte/validation:0", "boolq/validation:0",
                                                          "boolq/validation:1"]


# -- the job -----------------------------------------------------------------------------------------------
MTL_CFG = """
job: mtl
name: mtl-e2e
data_root: {data}
groups:
  pvi: [[scitail, cb]]
  dissimilar: [[cb, scitail]]
  single: [[cb], [scitail]]
sampling: temperature
temperature: 2
seeds: [4]
sizes: {{train: 16, eval: 12}}
setups:
  - name: tiny
    model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 2, batch_size: 4}}
"""


@pytest.mark.integration
def test_mtl_job_on_ray_stores_runs_member_predictions_and_groups(tmp_path: Path, registry: TaskRegistry) -> None:
    cfg = tmp_path / "mtl.yaml"
    cfg.write_text(MTL_CFG.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "4 (grouping, group, setup, seed) cells -> 3 distinct runs, 0 already stored, 3 to run" in r.stdout
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    runs = {tuple(s): (k, kind, seed, setup, exp, score, json.loads(m), json.loads(h)) for k, kind, s, seed, setup, exp,
            score, m, h in con.execute("SELECT run_key, kind, sources, seed, setup, experiment, score, metrics, "
                                       "hparams FROM runs WHERE status = 'ok'").fetchall()}
    assert sorted(runs) == [("cb",), ("cb", "scitail"), ("scitail",)]
    assert {v[1:5] for v in runs.values()} == {("mtl", 4, "tiny", "mtl-e2e")}
    pair = runs[("cb", "scitail")]
    assert pair[7]["sampling"] == "temperature=2" and pair[7]["n_train_per_task"] == {"cb": 16, "scitail": 16}
    # 2 epochs of ceil(16/4) + ceil(16/4) one-task batches
    assert pair[7]["steps"] == 16

    eval_ids = {}
    for members, (key, *_rest) in runs.items():
        rows = con.execute("SELECT task, split, example_id, len(probs), correct FROM predictions WHERE key = ?",
                           [key]).fetchall()
        assert {t for t, *_ in rows} == set(members) and {s for _, s, *_ in rows} == {"eval"}
        for task in members:
            mine = [x for x in rows if x[0] == task]
            assert {n for *_, n, _ in mine} == {len(registry.get(task).choices)}
            eval_ids[(members, task)] = {x[2] for x in mine}
            data = registry.load_data(task, 16, 12, seed=4)
            assert eval_ids[(members, task)] == {e.uid for e in data.eval}
            assert not eval_ids[(members, task)] & {e.uid for e in data.train}
        # the member score of an accuracy task is the share of its correct rows; the run's score their mean
        if "scitail" in members:
            acc = sum(c for t, *_, c in rows if t == "scitail") / 12
            assert _rest[5]["member_scores"]["scitail"] == pytest.approx(acc)
            view = con.execute("SELECT accuracy, n_eval FROM mtl_member_scores WHERE run_key = ? AND task = 'scitail'",
                               [key]).fetchall()  # analysis/store/views.py reads the rows this job writes
            assert view == [(pytest.approx(acc), 12)]
        assert _rest[4] == pytest.approx(sum(_rest[5]["member_scores"].values()) / len(members))

    groups = con.execute("SELECT experiment, grouping, group_id, members, run_key, seed FROM mtl_groups "
                         "ORDER BY grouping, group_id").fetchall()
    assert [g[:4] + (g[5],) for g in groups] == [
        ("mtl-e2e", "dissimilar", "cb+scitail", ["cb", "scitail"], 4),
        ("mtl-e2e", "pvi", "cb+scitail", ["cb", "scitail"], 4),
        ("mtl-e2e", "single", "cb", ["cb"], 4), ("mtl-e2e", "single", "scitail", ["scitail"], 4)]
    assert [g[4] for g in groups] == [pair[0], pair[0], runs[("cb",)][0], runs[("scitail",)][0]]
    con.close()

    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0 and "3 already stored, 0 to run" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM mtl_groups").fetchone()[0] == 4
    con.close()


def test_sampling_enters_the_key_of_groups_only(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(MTL_CFG.format(data=DATA))
    keys = {}
    for sampling in ("temperature", "proportional"):
        job, c = load_job_config(str(cfg), [f"sampling={sampling}"])
        store = ResultStore(tmp_path / sampling)
        store.ensure_writable()
        keys[sampling] = {tuple(t.sources): t.run_key for t in job.plan(c, store).trials}
    assert keys["temperature"][("cb",)] == keys["proportional"][("cb",)]
    assert keys["temperature"][("cb", "scitail")] != keys["proportional"][("cb", "scitail")]


@pytest.mark.parametrize("edit,message", [
    ({"setups.0.model.family": "causal"}, "setups.0.model.family.*needs an encoder"),
    ({"setups.0.adaptation.method": "prompt_tuning"}, "setups.0.adaptation.method"),
    ({"groups.pvi": [["cb", "squad_v2"]]}, "squad_v2.*no fixed label set"),
    ({"groups.pvi": [["cb", "cb"]]}, "names a task twice"),
    ({"groups.pvi": [[]]}, "is empty"),
    ({"groups.nearest": [["cb"]]}, "groups.nearest"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_configs_fail_before_training_naming_the_field(tmp_path: Path, edit: dict, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(MTL_CFG.format(data=DATA))
    overrides = [f"{k}={json.dumps(v)}" for k, v in edit.items()]
    with pytest.raises(ConfigError, match=message):
        job, c = load_job_config(str(cfg), overrides)
        store = ResultStore(tmp_path / "r")
        store.ensure_writable()
        job.plan(c, store)
