"""The one job driver: every config is a job of the kind it names; run keys (so stored results) are
those of the code before the driver existed; overrides and config-relative paths; layering."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.store.duck import open_store
from analysis.store.results import ResultStore
from rayjobs.config import ConfigError
from rayjobs.engine.smoke import config_kind, smoke_variant
from rayjobs.job import load_job_config

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def taskweb_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from analysis.importers.taskweb import import_taskweb

    db = tmp_path_factory.mktemp("tw") / "taskweb.duckdb"
    with open_store(db, create=True) as con:
        import_taskweb(con, DATA / "taskweb")
    return db


def planned(path: Path, smoke: bool, results: Path, selection_store: Path) -> list[tuple]:
    overrides = [f"selection.store={selection_store}"] if config_kind(path) == "multitask" else []
    job, cfg = load_job_config(str(path), overrides)
    if smoke:
        cfg = smoke_variant(cfg)
    store = ResultStore(results)
    store.ensure_writable()
    trials = job.plan(cfg, store).trials
    if job.kind == "multitask":
        return sorted(("multitask", t.setup.key, "+".join(t.sources), t.target, t.seed, t.run_key) for t in trials)
    return sorted((t.kind, t.setup.key, t.source or "", t.target or "", t.seed, t.run_key) for t in trials)


def test_every_config_plans_the_run_keys_stored_before_the_driver(tmp_path: Path, taskweb_store: Path) -> None:
    """tests/fixtures/run_keys_v2.json was written by the pre-driver code (pairwise.plan / multitask.plan):
    a store made then resumes now, because every trial keeps its run key."""
    golden = json.loads((REPO / "tests" / "fixtures" / "run_keys_v2.json").read_text())
    checked = _check_golden(golden, tmp_path, taskweb_store)
    assert checked >= 20


def test_every_job_kind_plans_the_run_keys_stored_before_the_package_layout(tmp_path: Path,
                                                                           taskweb_store: Path) -> None:
    """tests/fixtures/run_keys_every_kind.json was written by the code before the subpackage layout (commit
    98e3242) for every other config, full and --smoke: score, pvi, mtl, fewshot, embed and the ITS pairwise
    grids plan the same run keys after the move."""
    golden = json.loads((REPO / "tests" / "fixtures" / "run_keys_every_kind.json").read_text())
    assert {w["kind"] for w in golden.values()} == {"score", "pvi", "mtl", "fewshot", "embed", "pairwise"}
    assert _check_golden(golden, tmp_path, taskweb_store) == len(golden) >= 20


def _check_golden(golden: dict, tmp_path: Path, taskweb_store: Path) -> int:
    checked = 0
    for name, want in golden.items():
        stem, _, smoke = name.partition("@")
        got = planned(REPO / "configs" / f"{stem}.yaml", bool(smoke), tmp_path / name, taskweb_store)
        got = [list(t) for t in got]
        assert len(got) == want["n"], name
        assert hashlib.sha256(json.dumps(got).encode()).hexdigest() == want["sha256"], name
        if "trials" in want:
            assert got == want["trials"], name
        checked += 1
    return checked


def test_every_top_level_yaml_is_a_job_config_that_smoke_accepts(tmp_path: Path, taskweb_store: Path) -> None:
    for path in CONFIGS:
        assert config_kind(path) is not None, f"{path.name} is not a job config (task files go in configs/tasks/)"
        trials = planned(path, True, tmp_path / path.stem, taskweb_store)
        assert trials, path.name


def test_multitask_config_runs_through_run_and_a_missing_job_field_is_explained(tmp_path: Path) -> None:
    job, cfg = load_job_config(str(REPO / "configs" / "multitask_quickstart.yaml"))
    assert job.kind == "multitask" and cfg.targets == ["cb", "copa"]
    text = (REPO / "configs" / "multitask_quickstart.yaml").read_text().replace("job: multitask\n", "")
    bare = tmp_path / "mt.yaml"
    bare.write_text(text)
    with pytest.raises(ConfigError, match=r"field `targets`: unknown field[\s\S]*add `job: multitask`"):
        load_job_config(str(bare))
    (tmp_path / "bad.yaml").write_text("job: nosuch\nname: x\n")
    with pytest.raises(ConfigError, match="unknown job kind 'nosuch'"):
        load_job_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_job_config(str(tmp_path / "empty.yaml"))


def test_overrides_and_config_relative_input_paths(tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    (folder / "tasks").mkdir(parents=True)
    (folder / "tasks" / "extra.yaml").write_text(
        "tasks:\n  mycb:\n    choices: [Entailment, Neutral, Contradiction]\n"
        "    local: {format: natinstruct, path: tasks/natinstruct/cb.jsonl}\n")
    (folder / "c.yaml").write_text(f"""
name: rel
data_root: {DATA}
task_files: [tasks/extra.yaml]
tasks: {{sources: [mycb, snli]}}
seeds: [1]
setups: [{{model: {{name: tiny, config: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1,
          num_attention_heads: 2, intermediate_size: 32}}}}}}]
""")
    # run from another folder: the task file is found next to the config, not in the working directory
    code = ("import sys; from rayjobs.job import load_job_config; "
            "j, c = load_job_config(sys.argv[1], sys.argv[2:]); print(c.task_files[0]); print(c.seeds); "
            "print(c.setups[0].train.epochs)")
    r = subprocess.run([sys.executable, "-c", code, str(folder / "c.yaml"), "seeds=[3, 4]",
                        "setups.0.train.epochs=1"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == [str(folder / "tasks" / "extra.yaml"), "[3, 4]", "1.0"]
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_job_config(str(folder / "c.yaml"), ["seeds"])
    with pytest.raises(ConfigError, match="no list item '5'"):
        load_job_config(str(folder / "c.yaml"), ["setups.5.train.epochs=1"])


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_layers_analysis_imports_neither_jobs_nor_serving_nor_the_cli() -> None:
    """DESIGN.md: analysis <- rayjobs <- serving <- CLI; analysis imports nothing of the others."""
    for path in sorted((REPO / "analysis").glob("*.py")):
        bad = _imports(path) & {"rayjobs", "serving"}
        assert not bad, f"{path.name} imports {bad}"
    for path in sorted((REPO / "rayjobs").rglob("*.py")):
        if path.name != "cli.py":
            assert "serving" not in _imports(path), f"{path.relative_to(REPO)} imports serving"


def test_reading_commands_find_the_store_run_wrote(tmp_path: Path) -> None:
    """`transferlab run` writes results/<experiment>/transferlab.duckdb; `sql` without --db reads the newest
    store under ./results (so the README's SQL works right after `make demo`); $TRANSFERLAB_DB wins."""
    import os
    import time

    from tests.conftest import cli

    for i, name in enumerate(["old", "quickstart"]):
        store = ResultStore(tmp_path / "results" / name)
        store.ensure_writable()
        store.write_result({"run_key": f"k{i}", "experiment": name, "kind": "source", "score": 0.5})
        store.ingest()
        time.sleep(0.05)
    r = cli("sql", "SELECT experiment FROM runs", "--json", cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"experiment": "quickstart"}]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFERLAB_DB": str(tmp_path / "results" / "old" /
                                                                          "transferlab.duckdb")}
    r = cli("sql", "SELECT experiment FROM runs", "--json", cwd=tmp_path, env=env)
    assert json.loads(r.stdout) == [{"experiment": "old"}]


def test_unreachable_hub_model_fails_before_ray_starts(tmp_path: Path) -> None:
    from tests.conftest import cli

    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"name: hub\ndata_root: {DATA}\ntasks: {{sources: [cb, snli]}}\nseeds: [1]\n"
                   "setups: [{model: {name: x, path: nosuch-org/nosuch-model-123, family: seq2seq}}]\n")
    r = cli("run", str(cfg), "--results", str(tmp_path / "res"), env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "nosuch-org/nosuch-model-123" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "res" / "tune").exists()  # no trial was started
