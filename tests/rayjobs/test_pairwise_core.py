"""Config validation, run keys, staging and PC/PM against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.store.results import ResultStore
from rayjobs.config import ConfigError, load_config
from rayjobs.plan import expand_pairwise
from rayjobs.tasks.registry import TaskError, TaskRegistry

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

BASE = """
name: t
tasks: {sources: [snli, scitail, mrpc]}
seeds: [1, 2]
sizes: {source_train: 8, target_train: 8, eval: 8}
setups:
  - model: {name: tiny, config: {model_type: bert, hidden_size: 16, num_hidden_layers: 1,
            num_attention_heads: 2, intermediate_size: 32}}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\ntasks: [a, b\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line \d+.*malformed YAML"):
        load_config(p)


def test_unknown_and_bad_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field `setups.0.adaptation.method`"):
        load_config(write(tmp_path, BASE + "    adaptation: {method: dreambooth}\n"))
    with pytest.raises(ConfigError, match=r"field `sizes.bogus`: unknown field"):
        load_config(write(tmp_path, BASE.replace("eval: 8}", "eval: 8, bogus: 1}")))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_task_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE.replace("mrpc", "nosuchtask")))
    with pytest.raises(TaskError, match="unknown task 'nosuchtask'"):
        expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp_path))


@needs_data
def test_run_keys_are_stable_and_sensitive(tmp_path: Path) -> None:
    reg = TaskRegistry.load(data_root=DATA)
    cfg = load_config(write(tmp_path, BASE))
    a = [t.run_key for t in expand_pairwise(cfg, reg, str(tmp_path / "r1"))]
    b = [t.run_key for t in expand_pairwise(load_config(tmp_path / "c.yaml"), reg, str(tmp_path / "r2"))]
    assert a == b and len(set(a)) == len(a)  # stable, independent of results location, unique
    lr = load_config(write(tmp_path, BASE + "    train: {learning_rate: 0.001}\n"))
    c = {t.run_key for t in expand_pairwise(lr, reg, str(tmp_path))}
    assert not (c & set(a))  # a hyperparameter change changes every key
    res = load_config(write(tmp_path, BASE + "    resources: {cpu: 2}\n"))
    assert [t.run_key for t in expand_pairwise(res, reg, str(tmp_path))] == a  # resources do not


@needs_data
def test_stages_train_each_source_once_per_setup_and_seed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    trials = expand_pairwise(cfg, TaskRegistry.load(data_root=DATA), str(tmp_path))
    kinds = [t.kind for t in trials]
    assert kinds.count("source") == 3 * 2 and kinds.count("target") == 3 * 2
    assert kinds.count("transfer") == 3 * 2 * 2  # 3x3 minus self, 2 seeds
    sources = {t.run_key: t for t in trials if t.kind == "source"}
    baselines = {t.run_key: t for t in trials if t.kind == "target"}
    for t in trials:
        if t.kind == "transfer":
            src, base = sources[t.source_run_key], baselines[t.baseline_run_key]
            assert (src.source, src.seed) == (t.source, t.seed)
            assert (base.target, base.seed) == (t.target, t.seed)


def test_transfer_scores_match_hand_computation(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.ensure_writable()
    common = {"setup": "full:m", "model": "m", "adaptation": "full"}
    # baselines for target t: seed 1 -> 0.50, seed 2 -> 0.80; transfers s->t: 0.60, 0.72
    for seed, pb, px in [(1, 0.50, 0.60), (2, 0.80, 0.72)]:
        store.write_result({**common, "run_key": f"b{seed}", "kind": "target", "target": "t", "seed": seed,
                            "score": pb})
        store.write_result({**common, "run_key": f"x{seed}", "kind": "transfer", "source": "s", "target": "t",
                            "seed": seed, "score": px, "baseline_run_key": f"b{seed}"})
    store.ingest()
    store.ingest()  # idempotent
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 4
        pc, pm, score, n = con.execute(
            "SELECT pc, pm, score, n_seeds FROM transfer_scores WHERE source='s' AND target='t'").fetchone()
    # by hand: PC = mean(0.1/0.5, -0.08/0.8) = mean(0.2, -0.1) = 0.05; PM = 1/2
    assert pc == pytest.approx(0.05)
    assert pm == pytest.approx(0.5)
    assert score == pytest.approx(0.5 * 0.05 + 0.5 * (0.2 * 0.5 - 0.1))
    assert n == 2
