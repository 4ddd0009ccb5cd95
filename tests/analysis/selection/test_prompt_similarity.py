"""Prompt-similarity selectors of Lin et al. (paper 001): FEATURE (two variants), UNIGRAM, MAX (both
directions) and SEMB on hand-made vectors, the soft-prompt loader on a real peft checkpoint layout,
and the selectors computed from a store's prompt-tuning runs and evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from analysis.errors import AnalysisError
from analysis.ranking.evaluate import evaluate_selection
from analysis.selection import prompt_similarity as ps
from analysis.selection.selectors import resolve
from analysis.store.duck import open_store
from analysis.store.results import ResultStore

R2 = math.sqrt(2)


# -- the formulas on tiny tensors -------------------------------------------------------------------------------
def test_feature_both_variants():
    s = [[3.0, 0.0], [0.0, 1.0]]  # mean (1.5, 0.5); unit tokens (1, 0), (0, 1): mean (0.5, 0.5)
    t = [[1.0, 1.0]]  # one token, another N: FEATURE only needs the same width
    assert ps.feature_similarity(s, t) == pytest.approx(2 / math.sqrt(5), abs=1e-12)  # 2 / (sqrt(2.5) sqrt(2))
    assert ps.feature_similarity(s, t, normalise_tokens=True) == pytest.approx(1.0, abs=1e-12)
    assert ps.PROMPT_SIMILARITIES["feature-l2"](s, t) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(AnalysisError, match="different width: source dim 2, target dim 3"):
        ps.feature_similarity(s, [[1.0, 2.0, 3.0]])
    with pytest.raises(AnalysisError, match="zero vector"):
        ps.feature_similarity([[1.0, 0.0], [-1.0, 0.0]], t)  # the mean token is 0


def test_unigram():
    s = [[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]]  # per-token means (2, 2, 0)
    t = [[4.0, 0.0], [0.0, 0.0], [1.0, 1.0]]  # (2, 0, 1)
    assert ps.unigram_similarity(s, t) == pytest.approx(4 / math.sqrt(8 * 5), abs=1e-12)
    with pytest.raises(AnalysisError, match="source has 3 prompt tokens, target 1"):
        ps.unigram_similarity(s, [[1.0, 1.0]])


def test_max_both_directions():
    s = [[1.0, 0.0], [0.0, 1.0]]
    t = [[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]
    # cos(s_i, t_j): s1 -> (1/sqrt2, 1, -1), s2 -> (1/sqrt2, 0, 0)
    # Eq. 4: per target token the best source token: 1/sqrt2, 1, 0 -> mean over the 3 target tokens
    assert ps.max_similarity(s, t) == pytest.approx((1 / R2 + 1 + 0) / 3, abs=1e-12)
    # reverse: per source token the best target token: 1, 1/sqrt2 -> mean over the 2 source tokens
    assert ps.max_similarity(s, t, reverse=True) == pytest.approx((1 + 1 / R2) / 2, abs=1e-12)
    assert ps.PROMPT_SIMILARITIES["max-reverse"](s, t) == pytest.approx((1 + 1 / R2) / 2, abs=1e-12)


def test_max_against_a_loop_on_random_prompts():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    want = sum(max(cos(s[i], t[j]) for i in range(7)) for j in range(4)) / 4
    want_rev = sum(max(cos(s[i], t[j]) for j in range(4)) for i in range(7)) / 7
    assert ps.max_similarity(s, t) == pytest.approx(want, abs=1e-12)
    assert ps.max_similarity(s, t, reverse=True) == pytest.approx(want_rev, abs=1e-12)
    assert ps.max_similarity(s, t) != pytest.approx(want_rev)  # the two directions differ here


def test_semb_from_embeddings_and_minilm():
    assert ps.semb_from_embeddings([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]]) == pytest.approx(1 / R2, abs=1e-12)
    from sentence_transformers import SentenceTransformer

    from rayjobs.models.loading import resolve_path

    texts = {"a": ["The cat sat on the mat.", "A dog barked."], "b": ["Stocks fell sharply today."],
             "c": ["The kitten slept on the rug.", "Is the premise entailed?"]}
    table, params = ps.semb_scores(texts)
    got = {(s, t): v for s, t, v in zip(*(table.column(c).to_pylist() for c in ("source", "target", "score")),
                                         strict=True)}
    st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
    mean = {k: st.encode(v, convert_to_numpy=True, normalize_embeddings=True).mean(axis=0) for k, v in texts.items()}
    assert set(got) == {(s, t) for s in "abc" for t in "abc" if s != t}
    for (s, t), v in got.items():
        want = float(mean[s] @ mean[t] / (np.linalg.norm(mean[s]) * np.linalg.norm(mean[t])))
        assert v == pytest.approx(want, abs=1e-5)
    assert got[("a", "c")] > got[("b", "c")]  # cats and rugs are closer than stock markets
    assert ps.semb_similarity(texts["a"], texts["c"]) == pytest.approx(got[("a", "c")], abs=1e-5)
    with pytest.raises(AnalysisError, match="input texts of task\\(s\\) d"):
        ps.semb_scores(texts, targets=["d"])



def test_compute_selector_semb_stores_the_cosines_of_mean_input_embeddings(tmp_path):
    import json

    from sentence_transformers import SentenceTransformer

    from rayjobs.cli import main
    from rayjobs.models.loading import resolve_path

    texts = {"a": ["The cat sat on the mat.", "A dog barked."], "b": ["Stocks fell sharply today."],
             "c": ["The kitten slept on the rug."]}
    jsonl = tmp_path / "ex.jsonl"  # RoE's records: SEMB embeds the inputs only, not the choices
    jsonl.write_text("".join(json.dumps({"task": t, "input": x, "choices": ["yes", "no"]}) + "\n"
                             for t, xs in texts.items() for x in xs))
    db = tmp_path / "s.duckdb"
    assert main(["compute-selector", "semb", "--db", str(db), "--examples", str(jsonl), "--tasks", "a,b,c"]) == 0
    with open_store(db) as con:
        got = {(s, t): v for s, t, v in con.execute(
            "SELECT source, target, score FROM selector_scores WHERE selector = 'semb'").fetchall()}
    st = SentenceTransformer(resolve_path("builtin:minilm"), device="cpu")
    mean = {k: st.encode(v, convert_to_numpy=True, normalize_embeddings=True).mean(axis=0) for k, v in texts.items()}
    assert set(got) == {(s, t) for s in "abc" for t in "abc" if s != t}
    for (s, t), v in got.items():
        assert v == pytest.approx(float(mean[s] @ mean[t] / (np.linalg.norm(mean[s]) * np.linalg.norm(mean[t]))),
                                  abs=1e-5)


# -- checkpoints ------------------------------------------------------------------------------------------------
def test_loader_reads_a_peft_prompt_tuning_checkpoint(tmp_path):
    """The trainable state of a real peft prompt-tuning model, saved as the trainer saves it."""
    import peft
    import transformers
    from safetensors.torch import save_file as save_torch

    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(cfg),
                                peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_torch(state, str(tmp_path / "trained.safetensors"))
    prompt = ps.load_soft_prompt(tmp_path)
    assert prompt.shape == (5, 8)
    want = model.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert np.array_equal(prompt, want.astype(np.float64))


def test_loader_errors(tmp_path):
    with pytest.raises(AnalysisError, match="trained.safetensors does not exist"):
        ps.load_soft_prompt(tmp_path)
    save_file({"base_model.lora_A.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "trained.safetensors"))
    with pytest.raises(AnalysisError, match="has no soft-prompt tensor.*lora_A.*not a prompt-tuning checkpoint"):
        ps.load_soft_prompt(tmp_path)
    (tmp_path / "trained.safetensors").write_bytes(b"garbage")
    with pytest.raises(AnalysisError, match="not a readable safetensors file"):
        ps.load_soft_prompt(tmp_path)


PROMPTS = {  # [N=2, d=2] prompts
    "a": [[1.0, 0.0], [0.0, 1.0]],
    "a_weak": [[0.0, 1.0], [0.0, 1.0]],  # a lower-scoring seed of source a: must not be used
    "b": [[0.0, 1.0], [0.0, 2.0]],
    "t": [[1.0, 0.0], [1.0, 0.0]],
}


def _prompt_store(root, baseline_column=True):
    """Sources a (two seeds) and b, target t's baseline, transfers a/b -> t; prompt-tuning setup 'pt:m'."""
    store = ResultStore(root, db_path=root / "s.duckdb")
    store.ensure_writable()

    def ckpt(key, name):
        folder = store.checkpoint_dir(key)
        folder.mkdir(parents=True)
        save_file({"prompt_encoder.default.embedding.weight": np.array(PROMPTS[name], np.float32),
                   "base_model.classifier.modules_to_save.default.bias": np.zeros(2, np.float32)},
                  str(folder / "trained.safetensors"))
        return str(folder)

    common = {"setup": "pt:m", "model": "m", "adaptation": "prompt_tuning"}
    rows = [{"run_key": "src-a-1", "kind": "source", "source": "a", "seed": 1, "score": 0.9, **common,
             "checkpoint": ckpt("src-a-1", "a")},
            {"run_key": "src-a-2", "kind": "source", "source": "a", "seed": 2, "score": 0.5, **common,
             "checkpoint": ckpt("src-a-2", "a_weak")},
            {"run_key": "src-b-1", "kind": "source", "source": "b", "seed": 1, "score": 0.7, **common,
             "checkpoint": ckpt("src-b-1", "b")},
            {"run_key": "base-t-1", "kind": "target", "target": "t", "seed": 1, "score": 0.6, **common}]
    path = ckpt("base-t-1", "t")
    if baseline_column:
        rows[-1]["checkpoint"] = path
    rows += [{"run_key": f"x-{s}", "kind": "transfer", "source": s, "target": "t", "seed": 1, "score": v,
              "baseline_run_key": "base-t-1", **common} for s, v in (("a", 0.61), ("b", 0.66))]  # b better into t
    with open_store(store.db_path) as con:
        store.insert_rows(rows, con)
    return store.db_path


def test_selectors_from_stored_checkpoints(tmp_path):
    db = _prompt_store(tmp_path, baseline_column=False)  # the baseline's folder found by run key
    with open_store(db) as con:
        names = {m: resolve(con, m, setup="pt:m") for m in ("feature", "feature-l2", "unigram", "max", "max-reverse")}
        got = {m: dict(con.execute("SELECT source, score FROM selector_scores WHERE selector = ? AND target = 't'",
                                   [n]).fetchall()) for m, n in names.items()}
        params = con.execute("SELECT params FROM selector_scores WHERE selector = 'max[pt:m]' LIMIT 1").fetchone()[0]
        lin = evaluate_selection(con, "feature", "pt:m", k=1, metrics="lin")
    assert names["feature"] == "feature[pt:m]"
    # a = [[1,0],[0,1]] (seed 1, the better run), b = [[0,1],[0,2]], t = [[1,0],[1,0]]
    assert got["feature"] == pytest.approx({"a": 1 / R2, "b": 0.0}, abs=1e-12)
    assert got["feature-l2"] == pytest.approx({"a": 1 / R2, "b": 0.0}, abs=1e-12)
    # UNIGRAM: per-token means a (.5, .5), b (.5, 1), t (.5, .5)
    assert got["unigram"] == pytest.approx({"a": 1.0, "b": 0.75 / math.sqrt(1.25 * 0.5)}, abs=1e-12)
    assert got["max"] == pytest.approx({"a": 1.0, "b": 0.0}, abs=1e-12)
    assert got["max-reverse"] == pytest.approx({"a": 0.5, "b": 0.0}, abs=1e-12)
    assert '"src-a-1"' in params and '"base-t-1"' in params and "src-a-2" not in params
    # FEATURE prefers a, the transfers prefer b (66 vs 61): regret (66 - 61) / 66
    assert lin["by_target"]["t"]["predicted_top"] == ["a"]
    assert lin["regret_at_1"] == pytest.approx((66 - 61) / 66, abs=1e-9)


def test_selector_errors(tmp_path):
    db = _prompt_store(tmp_path)
    with open_store(db) as con:
        with pytest.raises(AnalysisError, match="selector 'max' needs a transfer setup"):
            resolve(con, "max")
        with pytest.raises(AnalysisError, match="no runs of setup 'x:y'"):
            resolve(con, "max", setup="x:y")
        assert ps.compute_prompt_similarity(con, "max", "pt:m", seed=1) == "max[pt:m][seed=1]"
        with pytest.raises(AnalysisError, match="no target-only baseline runs of setup 'pt:m' with seed 2"):
            ps.compute_prompt_similarity(con, "max", "pt:m", seed=2)
        with pytest.raises(AnalysisError, match="unknown prompt similarity 'min'"):
            ps.compute_prompt_similarity(con, "min", "pt:m")
        con.execute("UPDATE runs SET adaptation = 'lora'")
        with pytest.raises(AnalysisError, match="adapts with 'lora', not prompt_tuning"):
            resolve(con, "feature", setup="pt:m")
        con.execute("UPDATE runs SET adaptation = 'prompt_tuning'; DELETE FROM runs WHERE kind = 'target'")
        with pytest.raises(AnalysisError, match="no target-only baseline runs of setup 'pt:m'"):
            resolve(con, "feature", setup="pt:m")


def test_seq2seq_prompt_keeps_the_encoder_rows_peft_trains(tmp_path) -> None:
    """peft doubles a seq2seq prompt table (encoder + never-used decoder half): only the first N rows are
    the prompt the model reads."""
    from rayjobs.config import AdaptationSpec, ModelSpec, SetupSpec
    from rayjobs.models import build_task_model
    from rayjobs.tasks.registry import LocalSource, TaskSpec
    from tests.conftest import TINY_T5

    setup = SetupSpec(model=ModelSpec(name="t5", config=dict(TINY_T5), family="seq2seq"),
                      adaptation=AdaptationSpec(method="prompt_tuning", params={"num_virtual_tokens": 4}))
    task = TaskSpec(name="x", choices=["a", "b"], local=LocalSource(path="-"))
    tm = build_task_model(setup.model, setup.adaptation, task)
    table = next(p for n, p in tm.module.named_parameters() if "prompt_encoder" in n)
    assert table.shape[0] == 8  # peft's default for seq2seq: two transformer submodules
    tm.save(tmp_path / "ck", {"setup_spec": setup.model_dump(mode="json")})
    got = ps.load_soft_prompt(tmp_path / "ck")
    assert got.shape == (4, table.shape[1])
    assert np.allclose(got, table[:4].detach().numpy())
