"""Paper 003's model-training half: the null template, the PVI job's run pairs (on a real local Ray), PVI
read from stored predictions against the formula, and the few-shot LLM baseline."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from analysis.store.results import ResultStore
from rayjobs.config import AdaptationSpec, ConfigError, ModelSpec
from rayjobs.fewshot import fewshot_template, pick_demos
from rayjobs.job import load_job_config
from rayjobs.models import build_task_model
from rayjobs.tasks.registry import Example, TaskError, TaskRegistry
from rayjobs.tasks.templates import IDENTITY, NullTemplate, PromptTemplate, identity, resolve
from rayjobs.train.loop import evaluate_template
from tests.conftest import DATA, TINY_BERT, cli, needs_data

pytestmark = needs_data

# PVI of every pair in a store, straight from the contract: a 'pvi_x' run names its 'pvi_null' run in
# baseline_run_key; both score the same example ids; probs are in the task's label order (1-based lists).
PVI_SQL = """
SELECT px.task, px.example_id, px.gold, -log2(pn.probs[px.gold + 1]) + log2(px.probs[px.gold + 1]) AS pvi
FROM runs x JOIN runs n ON n.run_key = x.baseline_run_key AND n.kind = 'pvi_null'
JOIN predictions px ON px.key = x.run_key
JOIN predictions pn ON pn.key = n.run_key AND pn.example_id = px.example_id AND pn.task = px.task
WHERE x.kind = 'pvi_x' ORDER BY px.task, px.example_id
"""


def tiny_encoder(task: str, registry: TaskRegistry, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    tm = build_task_model(ModelSpec(name="tiny", config=TINY_BERT, max_length=64), AdaptationSpec(),
                          registry.get(task))
    tm.module.eval()
    return tm


# -- the null template -------------------------------------------------------------------------------------
def test_null_template_drops_both_segments_of_a_pair_and_keeps_the_answers(registry: TaskRegistry) -> None:
    spec = registry.get("cb")
    a, b = registry.load_data("cb", 4, 1, seed=0).train[:2]
    assert "Premise:" in a.text and "Hypothesis:" in a.text and a.text != b.text
    (null,) = resolve(spec, "null", "encoder")
    assert isinstance(null, NullTemplate) and null.name == "null"
    ra, rb = null.render(a), null.render(b)
    assert ra.text == rb.text == ""
    assert ra.choices == a.choices == ("Entailment", "Neutral", "Contradiction")
    assert (ra.label, ra.uid) == (a.label, a.uid)
    # what the encoder sees: [CLS] [SEP], nothing of the premise or the hypothesis
    tm = tiny_encoder("cb", registry)
    tok = tm.tokenizer
    assert tm.collate([ra])["input_ids"].tolist() == [[tok.cls_token_id, tok.sep_token_id]]
    assert tm.collate([a])["input_ids"].shape[1] > 10
    # text-to-text: the verbalised answers of the template the x model trains with; a causal LM gets a cue
    (c,) = resolve(spec, "null", "causal")  # default = the task's first template, gpt3-style
    assert c.render(a).text == "Answer:" and c.render(a).choices == ("entailment", "neutral", "contradiction")
    (s,) = resolve(spec, "null:options", "seq2seq")
    assert s.render(a).text == "" and s.render(a).choices == ("Entailment", "Neutral", "Contradiction")
    assert identity([null]) != identity([IDENTITY])  # null and x runs have different run keys


def test_null_template_errors(registry: TaskRegistry) -> None:
    with pytest.raises(ValueError, match="literal text"):
        NullTemplate(input="{input}")
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplate(name="empty", input="")
    with pytest.raises(ValueError, match="different answer_choices"):
        resolve(registry.get("cb"), "null:all", "causal")
    with pytest.raises(ValueError, match="no prompt template 'nosuch'"):
        resolve(registry.get("cb"), "null:nosuch", "causal")


# -- PVI from stored predictions ---------------------------------------------------------------------------
def _store_pair(store: ResultStore, x_rows: list[dict], n_rows: list[dict], task: str) -> None:
    for key, kind, rows, base in (("kx", "pvi_x", x_rows, "kn"), ("kn", "pvi_null", n_rows, None)):
        store.write_predictions(key, rows)
        store.write_result({"run_key": key, "experiment": "t", "kind": kind, "setup": "s", "target": task, "seed": 1,
                            "baseline_run_key": base, "status": "ok"})
    store.ingest()


def test_pvi_from_stored_predictions_equals_the_formula(tmp_path: Path, registry: TaskRegistry) -> None:
    """Hand-checkable: heads that ignore the input, p_x = (1/4, 3/4) and p_null = (1/2, 1/2), give
    PVI = log2(3/2) for gold 1 and log2(1/2) = -1 for gold 0. Then two random tiny models: the stored
    rows give -log2 g[null](y) + log2 g'[x](y) of each model's own forward pass on that one example."""
    data = registry.load_data("scitail", 0, 8, seed=0)
    (null,) = resolve(data.spec, "null", "encoder")
    x_tm, n_tm = tiny_encoder("scitail", registry, 1), tiny_encoder("scitail", registry, 2)
    with torch.no_grad():
        for tm, bias in ((x_tm, [math.log(1.0), math.log(3.0)]), (n_tm, [0.0, 0.0])):
            tm.module.classifier.weight.zero_()
            tm.module.classifier.bias.copy_(torch.tensor(bias))
    xs = [IDENTITY.render(e) for e in data.eval]
    ns = [null.render(e) for e in data.eval]
    _, _, x_rows = evaluate_template(x_tm, xs, 3)
    _, _, n_rows = evaluate_template(n_tm, ns, 3, template="null")
    store = ResultStore(tmp_path / "hand")
    _store_pair(store, x_rows, n_rows, "scitail")
    with store.connect(read_only=True) as con:
        got = con.execute(PVI_SQL).fetchall()
        view = dict(con.execute("SELECT example_id, pvi FROM pvi").fetchall())  # analysis/store/views.py
    assert view == pytest.approx({uid: v for _, uid, _, v in got}, abs=1e-12)
    gold = {e.uid: e.label for e in data.eval}
    assert len(got) == 8 and {g for _, _, g, _ in got} == {0, 1}
    for _, uid, g, pvi in got:
        assert g == gold[uid]
        assert pvi == pytest.approx(math.log2(1.5) if g == 1 else -1.0, abs=1e-6)  # float32 logits

    x_tm, n_tm = tiny_encoder("scitail", registry, 1), tiny_encoder("scitail", registry, 2)
    _, _, x_rows = evaluate_template(x_tm, xs, 3)
    _, _, n_rows = evaluate_template(n_tm, ns, 3, template="null")
    store = ResultStore(tmp_path / "random")
    _store_pair(store, x_rows, n_rows, "scitail")
    with store.connect(read_only=True) as con:
        got = {uid: pvi for _, uid, _, pvi in con.execute(PVI_SQL).fetchall()}

    def prob(tm, ex: Example) -> float:  # noqa: ANN001
        enc = tm.tokenizer(ex.text, return_tensors="pt")
        with torch.no_grad():
            return float(torch.softmax(tm.module(**enc).logits.double(), -1)[0, ex.label])

    want = {x.uid: -math.log2(prob(n_tm, n)) + math.log2(prob(x_tm, x)) for x, n in zip(xs, ns, strict=True)}
    assert got.keys() == want.keys()
    assert np.allclose([got[k] for k in want], list(want.values()), atol=1e-5)
    assert len({round(v, 6) for v in want.values()}) > 1  # the input matters to g'


# -- the job ------------------------------------------------------------------------------------------------
PVI_CFG = """
job: pvi
name: pvi-e2e
data_root: {data}
tasks: [cb, scitail]
seeds: [3]
sizes: {{train: 16, eval: 12}}
setups:
  - name: tiny
    model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}, max_length: 48}}
    train: {{epochs: 1, batch_size: 8}}
"""


FEWSHOT_CFG = """
job: fewshot
name: fs
data_root: {data}
tasks: [cb]
seeds: [5]
sizes: {{train: 40, eval: 6}}
setups:
  - name: tiny-lm
    model: {{name: tiny-lm, family: causal, max_length: 512, config: {{model_type: gpt2, n_embd: 16, n_layer: 1,
            n_head: 2, n_positions: 512}}}}
"""


@pytest.mark.integration
def test_pvi_job_on_ray_stores_run_pairs_on_the_held_out_pool_and_resumes(tmp_path: Path,
                                                                         registry: TaskRegistry) -> None:
    cfg = tmp_path / "pvi.yaml"
    cfg.write_text(PVI_CFG.format(data=DATA))
    results = tmp_path / "res"
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 (setup, task, seed) PVI pairs -> 4 runs, 0 already stored, 4 to run" in r.stdout
    con = duckdb.connect(str(results / "transferlab.duckdb"), read_only=True)
    runs = con.execute("SELECT run_key, kind, target, setup, seed, baseline_run_key, n_train, n_eval, status "
                       "FROM runs ORDER BY target, kind").fetchall()
    assert [(k, t, su, s, n, ne, st) for _, k, t, su, s, _, n, ne, st in runs] == [
        ("pvi_null", "cb", "tiny", 3, 16, 12, "ok"), ("pvi_x", "cb", "tiny", 3, 16, 12, "ok"),
        ("pvi_null", "scitail", "tiny", 3, 16, 12, "ok"), ("pvi_x", "scitail", "tiny", 3, 16, 12, "ok")]
    for null, x in (runs[0:2], runs[2:4]):
        assert x[5] == null[0] and null[5] is None
    for task in ("cb", "scitail"):
        data = registry.load_data(task, 16, 12, seed=3)
        ids = {}
        for kind, template in (("pvi_x", "input"), ("pvi_null", "null")):
            rows = con.execute("SELECT p.example_id, p.split, p.template, p.task, p.gold, list_sum(p.probs) "
                               "FROM predictions p JOIN runs r ON r.run_key = p.key WHERE r.kind = ? AND r.target = ?",
                               [kind, task]).fetchall()
            assert {(s, tp, tk) for _, s, tp, tk, _, _ in rows} == {("eval", template, task)}
            assert all(total == pytest.approx(1.0) for *_, total in rows)
            assert {i: g for i, _, _, _, g, _ in rows} == {e.uid: e.label for e in data.eval}
            ids[kind] = {i for i, *_ in rows}
        assert ids["pvi_x"] == ids["pvi_null"] and len(ids["pvi_x"]) == 12
        assert not ids["pvi_x"] & {e.uid for e in data.train}  # neither model trained on what it scores
    pvi = con.execute(PVI_SQL).fetchall()
    assert len(pvi) == 24 and all(math.isfinite(v) for *_, v in pvi)
    view = con.execute("SELECT task, example_id, split, pvi FROM pvi ORDER BY task, example_id").fetchall()
    assert [(t, i, v) for t, i, _, v in view] == [(t, i, pytest.approx(v)) for t, i, _, v in pvi]
    assert {s for _, _, s, _ in view} == {"eval"}
    assert con.execute("SELECT task, n_instances FROM pvi_tasks ORDER BY task").fetchall() == [("cb", 12),
                                                                                             ("scitail", 12)]
    con.close()

    mtimes = {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")}
    r = cli("run", str(cfg), "--results", str(results))
    assert r.returncode == 0 and "4 already stored, 0 to run" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.parquet")} == mtimes


@pytest.mark.parametrize("kind,edit,message", [
    ("pvi", {"tasks": ["cb", "squad_v2"]}, "squad_v2.*text answers"),
    ("pvi", {"tasks": ["cb", "nosuch"]}, "unknown task 'nosuch'"),
    ("pvi", {"setups.0.resources.workers": 2}, "one process"),
    ("fewshot", {"setups.0.model.family": "encoder"}, "needs a language model"),
    ("fewshot", {"setups.0.adaptation.method": "lora"}, "trains nothing"),
    ("fewshot", {"tasks": ["stsb"]}, "stsb.*score answers"),
])
def test_bad_configs_fail_before_training_naming_the_field(tmp_path: Path, kind: str, edit: dict,
                                                           message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(PVI_CFG.format(data=DATA) if kind == "pvi" else FEWSHOT_CFG.format(data=DATA))
    job, c = load_job_config(str(cfg), [f"{k}={v}" for k, v in edit.items()])
    store = ResultStore(tmp_path / "r")
    store.ensure_writable()
    with pytest.raises((ConfigError, TaskError), match=message):
        job.plan(c, store)


# -- few-shot baseline -----------------------------------------------------------------------------------
def test_demonstrations_one_per_class_in_label_order_or_the_first_k(registry: TaskRegistry) -> None:
    spec = registry.get("cb")
    pool = [Example(f"e{i}", ("Entailment", "Neutral", "Contradiction"), lab, uid=f"u{i}")
            for i, lab in enumerate([2, 0, 0, 1, 2])]
    assert [d.uid for d in pick_demos(pool, "classes", spec)] == ["u1", "u3", "u0"]
    assert [d.uid for d in pick_demos(pool, 2, spec)] == ["u0", "u1"]
    with pytest.raises(TaskError, match="class \\['Neutral'\\]"):
        pick_demos([pool[0], pool[1]], "classes", spec)
    with pytest.raises(TaskError, match="6 shots"):
        pick_demos(pool, 6, spec)


def test_fewshot_prompt_shows_each_demonstration_with_its_verbalised_answer() -> None:
    t = PromptTemplate(name="qa", input="Q: {input}\nA:", answer_choices=["no", "yes"])
    demos = [Example("d1", ("No", "Yes"), 1), Example("d2", ("No", "Yes"), 0)]
    r = fewshot_template(t, demos, "\n\n").render(Example("q", ("No", "Yes"), 1, uid="q1"))
    assert r.text == "Q: d1\nA: yes\n\nQ: d2\nA: no\n\nQ: q\nA:"
    assert (r.choices, r.label, r.uid) == (("no", "yes"), 1, "q1")


def test_fewshot_run_ranks_choices_by_their_log_likelihood_after_the_demonstrations(tmp_path: Path,
                                                                                  registry: TaskRegistry) -> None:
    from rayjobs.engine.trial import execute
    from rayjobs.fewshot import FewshotJob
    from rayjobs.train.loop import seed_everything

    cfg = tmp_path / "fs.yaml"
    cfg.write_text(FEWSHOT_CFG.format(data=DATA))
    job, c = load_job_config(str(cfg))
    store = ResultStore(tmp_path / "r")
    store.ensure_writable()
    (trial,) = FewshotJob().plan(c, store).trials
    row = execute(trial)
    store.ingest()
    data = registry.load_data("cb", 40, 6, seed=5)
    demos = [next(e for e in data.train if e.label == k) for k in range(3)]  # first of each class, label order
    assert row["kind"] == "fewshot" and row["target"] == "cb" and row["n_train"] == 3
    assert row["adaptation"] == "none" and row["trainable_params"] == 0 and row["train_time_s"] == 0
    assert row["metrics"]["demos"] == [d.uid for d in demos]
    with store.connect(read_only=True) as con:
        preds = con.execute("SELECT example_id, split, template, choices, logprobs, probs, prediction FROM predictions "
                            "WHERE key = ? ORDER BY example_id", [trial.run_key]).fetchall()
    assert {p[1] for p in preds} == {"eval"} and {p[2] for p in preds} == {"gpt3-style"}
    assert {p[0] for p in preds} == {e.uid for e in data.eval}
    assert not {p[0] for p in preds} & {d.uid for d in demos}

    # the same random model, scored by hand: sum of log p(answer token | prompt, earlier answer tokens)
    seed_everything(5)
    tm = build_task_model(trial.setup.model, AdaptationSpec(), data.spec)
    tm.module.eval()
    tok = tm.tokenizer
    gpt3 = resolve(data.spec, "gpt3-style", "causal")[0]
    prefix = "".join(f"{gpt3.render(d).text} {gpt3.render(d).target_text}\n\n" for d in demos)
    by_id = {e.uid: e for e in data.eval}
    for uid, _, _, choices, logprobs, probs, prediction in preds:
        prompt = prefix + gpt3.render(by_id[uid]).text
        assert choices == ["entailment", "neutral", "contradiction"]
        want = []
        for ch in choices:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tok(" " + ch, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(tm.module(torch.tensor([p_ids + c_ids])).logits[0].double(), -1)
            want.append(sum(float(lp[len(p_ids) + j - 1, c]) for j, c in enumerate(c_ids)))
        assert logprobs == pytest.approx(want, abs=1e-4)
        assert probs == pytest.approx(list(np.exp(want) / np.exp(want).sum()), abs=1e-4)
        assert prediction == int(np.argmax(want))
