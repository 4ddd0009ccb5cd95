"""DeepSpeed ZeRO-2/3 with two Ray Train workers, launched from trial workers on a real local Ray cluster.

The distributed runs must train like the single-process torch run (same global batches, same
schedule): loss curves and checkpoints agree to float32 round-off. So must a one-worker DeepSpeed
trial. The ZeRO-3 source checkpoint is an ordinary one that the transfer stage loads. A rank that
fails makes its trial a stored failed run, without hanging the stage. Bad DeepSpeed/resource
settings fail in preflight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from analysis.store.results import ResultStore
from rayjobs.config import PairwiseConfig, RunSpec, SetupSpec
from rayjobs.engine.preflight import check_distributed
from rayjobs.models.base import CKPT_META, CKPT_WEIGHTS
from rayjobs.models.loading import ModelError
from rayjobs.plan import TrialSpec, expand_pairwise
from rayjobs.tasks.registry import TaskRegistry
from rayjobs.train.deepspeed_backend import build_config
from tests.conftest import DATA, REPO, local_ray

needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="../shared/data not present")

# dropout off: ranks draw different dropout masks than one process would, which is not what we compare
TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
#: largest |difference| allowed between a distributed and the single-process loss / weight (fp32 round-off)
TOL = 1e-5


def experiment(stage: int | None, workers: int, cpu: float = 1, name: str | None = None,
               model_path: str | None = None) -> PairwiseConfig:
    model = {"name": "tiny", "path": model_path} if model_path else {"name": "tiny", "config": TINY}
    setup: dict[str, Any] = {
        "name": name,
        "model": {**model, "max_length": 64},
        "train": {"epochs": 1, "batch_size": 8, "grad_accum_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.25,
                  "max_steps": 4},
        "resources": {"cpu": cpu, "workers": workers}}
    if stage is not None:
        setup["deepspeed"] = {"stage": stage}
    if stage == 3:  # partition every parameter (by default ZeRO-3 keeps those under 1e5 elements whole)
        setup["deepspeed"]["extra"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return PairwiseConfig.model_validate({
        "name": "dist", "data_root": str(DATA), "tasks": {"sources": ["snli"], "targets": ["mrpc"]}, "seeds": [3],
        "sizes": {"source_train": 28, "target_train": 16, "eval": 16}, "setups": [setup]})


#: name -> (ZeRO stage or None for the plain torch backend, workers, CPU per worker). Half a CPU lets two
#: trials run side by side on the 2-CPU test cluster; ZeRO-3's workers take all of it, which only fits
#: because a distributed trial's coordinator reserves no CPU (see `pool.worker_shape`). The "pre_"
#: setups load TINY from a saved folder: ZeRO-3 builds such a model inside zero.Init.
SETUPS = {"single": (None, 1, 0.5), "ds1": (2, 1, 0.5), "zero2": (2, 2, 0.5), "zero3": (3, 2, 1.0),
          "fault": (2, 2, 0.5), "pre_single": (None, 1, 0.5), "pre_zero3": (3, 2, 0.5)}
#: rank 1 of the "fault" setup's trial raises while rank 0 waits for it in DeepSpeed's first collective
FAULT = "raise@rank1:source fault "


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    with local_ray(TRANSFERLAB_FAULT=FAULT) as ray:
        yield ray


def save_pretrained(config: dict[str, Any], folder: Path, seed: int = 0) -> Path:
    """A randomly initialised encoder saved like a hub checkpoint (no task head)."""
    from transformers import AutoConfig, AutoModel

    from rayjobs.config import ModelSpec
    from rayjobs.models.loading import load_tokenizer

    cfg = dict(config)
    tok = load_tokenizer(ModelSpec(name="t", config=cfg))
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok), **cfg))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sources(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each setup's source trial, all in one run; each setup has its own results folder
    (ZeRO stage and worker count are placement, not part of the run key)."""
    from rayjobs.engine.runner import run_stage

    root = tmp_path_factory.mktemp("dist")
    pretrained = str(save_pretrained(TINY, root / "tiny-pretrained"))
    reg = TaskRegistry.load(data_root=DATA)
    plans = {name: expand_pairwise(experiment(*sw, name=name, model_path=pretrained if name.startswith("pre_")
                                              else None), reg, str(root / name)) for name, sw in SETUPS.items()}
    trials = [next(t for t in plan if t.kind == "source") for plan in plans.values()]
    stage = run_stage("dist-sources", trials, RunSpec(verbose=0))
    rows = {name: ResultStore(str(root / name)).read_result(t.run_key) for name, t in zip(plans, trials, strict=True)}
    return {"root": root, "plans": plans, "rows": rows, "stage": stage}


def curve(row: dict[str, Any]) -> list[float]:
    m = row["metrics"]
    return (json.loads(m) if isinstance(m, str) else m)["loss_curve"]


@needs_data
@pytest.mark.integration
def test_zero2_zero3_two_workers_train_like_one_process(sources: dict[str, Any]) -> None:
    rows = sources["rows"]
    assert sources["stage"].ok == 6, {k: r.get("error") for k, r in rows.items()}
    single = curve(rows["single"])
    assert len(single) == 7  # 28 examples in global micro-batches of 4: groups of 2, a short last one
    for name, reference in (("ds1", "single"), ("zero2", "single"), ("zero3", "single"),
                            ("pre_zero3", "pre_single")):
        single = curve(rows[reference])
        row = rows[name]
        assert row["status"] == "ok", row.get("error")
        hp = json.loads(row["hparams"]) if isinstance(row["hparams"], str) else row["hparams"]
        world = SETUPS[name][1]
        assert (hp["world_size"], hp["micro_batch"], hp["steps"], hp["workers"]) == (world, 4 // world, 4, world)
        dist = curve(row)
        assert len(dist) == len(single), (single, dist)
        diff = max(abs(a - b) for a, b in zip(single, dist, strict=True))
        print(f"{name}: max |loss difference| vs single process over {len(dist)} steps = {diff:.2e}")
        assert diff < TOL, (single, dist)
        assert row["score"] == pytest.approx(rows[reference]["score"], abs=1e-6)
    # the weights moved away from their initial values (training happened) and agree across setups
    for name, reference in (("ds1", "single"), ("zero2", "single"), ("zero3", "single"),
                            ("pre_zero3", "pre_single")):
        a = load_file(str(Path(rows[reference]["checkpoint"]) / CKPT_WEIGHTS))
        b = load_file(str(Path(rows[name]["checkpoint"]) / CKPT_WEIGHTS))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"{name}: max |weight difference| vs single process = {worst:.2e}")
        assert worst < TOL


@needs_data
@pytest.mark.integration
def test_zero3_source_checkpoint_reloads_into_transfer_stage(sources: dict[str, Any]) -> None:
    """Both ways a ZeRO-3 model is built (whole, then partitioned by DeepSpeed; or partitioned from the
    start by zero.Init) save an ordinary checkpoint, which the transfer stage loads into the same build."""
    from rayjobs.engine.runner import run_stage

    transfers = []
    for name, zero_init in (("zero3", False), ("pre_zero3", True)):
        row = sources["rows"][name]
        folder = Path(row["checkpoint"])
        meta = json.loads((folder / CKPT_META).read_text())
        assert meta["deepspeed"] == {"stage": 3, "precision": "fp32", "world_size": 2, "zero_init": zero_init}
        state = load_file(str(folder / CKPT_WEIGHTS))
        assert all(t.numel() > 0 and t.dtype == torch.float32 for t in state.values())  # gathered, not shards
        n_params = sum(t.numel() for t in state.values())
        assert n_params == row["trainable_params"] > 0  # whole parameters, not this rank's partitions
        transfer = next(t for t in sources["plans"][name] if t.kind == "transfer")
        assert transfer.source_run_key == row["run_key"] and transfer.setup.deepspeed.stage == 3
        transfers.append(transfer)
    stage = run_stage("dist-transfer", transfers, RunSpec(verbose=0))
    assert stage.ok == 2, [r.error for r in stage.records]
    for transfer in transfers:
        out = ResultStore(transfer.results_dir).read_result(transfer.run_key)
        assert out["status"] == "ok", out.get("error")
        assert out["source_run_key"] == transfer.source_run_key and out["kind"] == "transfer"
    # the partitioned load put the source's weights in: starting from the checkpoint, not from scratch,
    # the transfer's first loss equals that of the same transfer run whole in a single process
    single = next(t for t in sources["plans"]["pre_single"] if t.kind == "transfer")
    single = single.model_copy(update={"source_run_key": transfers[1].source_run_key,
                                       "results_dir": transfers[1].results_dir, "run_key": "single-check"})
    run_stage("single-transfer", [single], RunSpec(verbose=0))
    a = curve(ResultStore(single.results_dir).read_result("single-check"))
    b = curve(ResultStore(transfers[1].results_dir).read_result(transfers[1].run_key))
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOL, (a, b)


@needs_data
@pytest.mark.integration
def test_failing_rank_fails_its_trial_without_hanging(sources: dict[str, Any]) -> None:
    """Rank 1 raises while rank 0 blocks in a gloo collective: Ray Train tears the group down, the
    trial is stored as failed with the worker's error, and the other trials of the stage finish."""
    (trial,) = [t for t in sources["plans"]["fault"] if t.kind == "source"]
    row = sources["rows"]["fault"]
    assert sources["stage"].failed == [trial.run_key]
    assert row["status"] == "failed" and row["checkpoint"] is None
    assert f"injected failure for {trial.label} on rank 1" in row["error"], row["error"]
    assert row["wall_time_s"] < 300  # torn down, not left waiting for the collective's 30-min timeout


# -- preflight: DeepSpeed / resources settings that cannot run ---------------------------------------------

def setup_with(**kw: Any) -> SetupSpec:
    base: dict[str, Any] = {"model": {"name": "tiny", "config": TINY}, "deepspeed": {"stage": 2},
                            "resources": {"cpu": 1, "workers": 2}, "train": {"batch_size": 8}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return SetupSpec.model_validate(base)


@pytest.mark.parametrize("kw, message", [
    ({"deepspeed": {"precision": "bf16"}}, "precision bf16 needs GPUs"),
    ({"deepspeed": {"precision": "fp16"}}, "precision fp16 needs GPUs"),
    ({"deepspeed": {"offload_params": True, "stage": 2}}, "offload_params needs ZeRO stage 3"),
    ({"deepspeed": {"offload_optimizer": True}}, "everything is on the CPU already"),
    ({"train": {"batch_size": 6, "grad_accum_steps": 2}}, "batch_size 6 is not divisible by resources.workers x"),
    ({"source_train": {"batch_size": 9}}, "source_train.batch_size 9 is not divisible"),
    ({"resources": {"gpu": 0.5, "workers": 2}, "deepspeed": {"precision": "fp32"}}, "fractional resources.gpu"),
    ({"deepspeed": {"extra": {"train_batch_size": 64}}}, "deepspeed.extra sets ['train_batch_size']"),
    ({"deepspeed": {"extra": {"zero_optimization": {"stage": 3}}}}, "zero_optimization.stage"),
    ({"model": {"name": "tiny", "config": TINY, "dtype": "bfloat16"}, "resources": {"gpu": 1}},
     "model.dtype bfloat16 does not match deepspeed.precision fp32"),
])
def test_preflight_rejects_deepspeed_settings_that_cannot_run(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match="setup 'full:tiny'") as e:
        check_distributed(setup_with(**kw))
    assert message in str(e.value)


def test_preflight_rejects_worker_groups_larger_than_the_cluster() -> None:
    gpu_setup = setup_with(resources={"cpu": 4, "gpu": 8, "workers": 4}, deepspeed={"stage": 3, "precision": "bf16"})
    with pytest.raises(ModelError, match="4 workers x 8 GPU = 32 GPU, but the Ray cluster has 16 GPU"):
        check_distributed(gpu_setup, {"CPU": 64.0, "GPU": 16.0})
    check_distributed(gpu_setup, {"CPU": 64.0, "GPU": 32.0})  # fits
    with pytest.raises(ModelError, match="2 workers x 1 CPU = 2 CPU, but the Ray cluster has 1 CPU"):
        check_distributed(setup_with(), {"CPU": 1.0})
    check_distributed(setup_with())  # cluster unknown: nothing to compare


def test_deepspeed_config_follows_train_and_deepspeed_fields() -> None:
    s = setup_with(train={"batch_size": 16, "grad_accum_steps": 2, "max_grad_norm": 0.5, "weight_decay": 0.01},
                   deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True, "precision": "bf16",
                              "extra": {"zero_optimization": {"stage3_max_live_parameters": 1000}}})
    cfg = build_config(s.train, s.deepspeed, world_size=2, micro=4, on_gpu=True)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (4, 2, 16)
    assert cfg["managed_gradient_accumulation"] is False and cfg["gradient_clipping"] == 0.5
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 1000  # extra merged into the nested section
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["weight_decay"] == 0.01 and not opt["params"]["torch_adam"]
    cpu = build_config(s.train, s.deepspeed.model_copy(update={"offload_optimizer": False}), 2, 4, on_gpu=False)
    assert cpu["optimizer"]["params"]["torch_adam"]  # no JIT-built op on CPU
    assert "reduce_bucket_size" not in cpu["zero_optimization"]  # DeepSpeed's default when the size is unknown
    small = build_config(s.train, s.deepspeed, 2, 4, on_gpu=True, n_params=1000)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] == 1024  # one bucket, not 5e8 elements
    big = build_config(s.train, s.deepspeed, 2, 4, on_gpu=True, n_params=3 * 10**9)["zero_optimization"]
    assert big["reduce_bucket_size"] == 5 * 10**8


def trial_of(setup: SetupSpec, results_dir: str = os.devnull) -> TrialSpec:
    return TrialSpec(run_key="k", experiment="e", kind="source", setup=setup, hparams=setup.train, train_task="snli",
                     eval_task="snli", seed=1, n_train=8, n_eval=8, eval_fraction=0.2, split_seed=0,
                     results_dir=results_dir)


def test_distributed_trial_reserves_no_cpu_for_its_coordinator() -> None:
    """The trial's worker must not take CPU the Ray Train workers need (2 workers x 1 CPU on a 2-CPU machine)."""
    from rayjobs.engine.pool import worker_shape

    shape = worker_shape(trial_of(setup_with()))
    assert shape.coordinator and shape.cpu == 0 and shape.gpu == 0 and shape.options()["num_cpus"] == 0
    single = worker_shape(trial_of(setup_with(deepspeed=None, resources={"cpu": 2, "workers": 1})))
    assert not single.coordinator and single.options()["num_cpus"] == 2


def test_stage_fails_before_training_when_a_worker_group_exceeds_the_local_cluster(
        ray_cluster: Any, tmp_path: Path) -> None:
    """Preflight runs before Ray starts; the runner re-checks against the cluster it started, where
    Ray Train would otherwise retry starting a 4-worker group on 2 CPUs forever."""
    from rayjobs.engine.runner import run_stage

    too_big = trial_of(setup_with(resources={"cpu": 1, "workers": 4}), str(tmp_path / "r"))
    with pytest.raises(ModelError, match="4 workers x 1 CPU = 4 CPU, but the Ray cluster has 2 CPU"):
        run_stage("too-big", [too_big], RunSpec(verbose=0))
    assert not (tmp_path / "tune").exists() and not (tmp_path / "r").exists()  # no trial started


def test_deepspeed_is_imported_only_by_the_backend() -> None:
    """deepspeed is an optional extra: configs, preflight and the coordinator must import without it."""
    code = ("import sys, rayjobs.train.deepspeed_backend, rayjobs.engine.distributed, rayjobs.engine.preflight, rayjobs.engine.runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@needs_data
def test_smoke_shrinks_distributed_configs_to_a_cpu_run() -> None:
    from rayjobs.config import load_config
    from rayjobs.engine.preflight import check_setups
    from rayjobs.engine.smoke import smoke_variant

    cfg = load_config(REPO / "configs" / "llama2_70b_lora.yaml")
    cfg = cfg.model_copy(update={"data_root": str(DATA)})
    smoke = smoke_variant(cfg)
    (s,) = smoke.setups
    assert (s.resources.workers, s.resources.gpu, s.deepspeed.stage, s.deepspeed.precision) == (2, 0, 3, "fp32")
    assert not s.deepspeed.offload_params and not s.deepspeed.extra and s.model.config is not None
    # a Llama stand-in, so the config's LoRA target modules (q_proj, ...) exist in the tiny model
    assert s.model.config["model_type"] == "llama" and "q_proj" in s.adaptation.params["target_modules"]
    assert s.train.batch_size % 2 == 0 and s.train.grad_accum_steps == 1
    assert len(smoke.tasks.sources) == 1 and len(smoke.tasks.target_list) == 1
    assert smoke.tasks.sources != smoke.tasks.target_list
    check_distributed(s)  # the shrunk setup passes the DeepSpeed preflight on CPU
    with pytest.raises(ModelError, match="needs GPUs"):
        check_distributed(cfg.setups[0].model_copy(update={"resources": s.resources}))
    full = load_config(REPO / "configs" / "quickstart.yaml")
    quick = smoke_variant(full)
    assert len(full.tasks.sources) == 3 and quick.tasks.sources == full.tasks.sources  # small grids keep their tasks
    check_setups(quick, TaskRegistry.load(data_root=DATA))


# -- ZeRO-3 model construction: zero.Init, memory per worker, dtype ----------------------------------------

#: an encoder whose parameters (~150 MB fp32, 16 layers) dominate a worker's memory
BIG = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 16, "num_attention_heads": 6,
       "intermediate_size": 1536}


def _anon_rss_mib() -> float:
    """Anonymous resident memory: the process's own pages (not the page cache of files it maps)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _construction_memory(config: dict[str, Any]) -> list[list[dict[str, Any]]] | None:
    """One Ray Train worker: build each trial's model through `prepare_model`, one after the other, and
    measure this worker's peak anonymous memory while it is built, what it holds afterwards, and its
    parameter bytes. Rank 0 returns every rank's measures."""
    import ctypes
    import gc
    import threading

    import ray.train
    import torch.distributed as dist

    from rayjobs.train.deepspeed_backend import is_partitioned, local_param_bytes
    from rayjobs.train.loop import TrainContext, prepare_data, prepare_model

    # a fixed mmap threshold: freed tensors go back to the OS, so RSS shows the live ones
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    tctx = ray.train.get_context()
    ctx = TrainContext(rank=tctx.get_world_rank(), world_size=tctx.get_world_size())
    warm = TrialSpec.model_validate(config["warm"])
    data = prepare_data(warm)
    prepare_model(warm, data, ctx)  # the same code paths on a tiny model: imports are not counted
    mine = []
    for spec in config["trials"]:
        trial = TrialSpec.model_validate(spec)
        gc.collect()
        base = _anon_rss_mib()
        peak, done = [base], threading.Event()

        def sample(peak: list[float] = peak, done: threading.Event = done) -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _anon_rss_mib())
                done.wait(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        tm = prepare_model(trial, data, ctx)
        done.set()
        sampler.join()
        gc.collect()
        mine.append({"rank": ctx.rank, "stage": trial.setup.deepspeed.stage,
                     "peak_mib": max(peak[0], _anon_rss_mib()) - base, "held_mib": _anon_rss_mib() - base,
                     "param_bytes": local_param_bytes(tm.module), "partitioned": is_partitioned(tm.module),
                     "whole_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in tm.module.parameters())})
        del tm
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    return [[ranks[i] for ranks in gathered] for i in range(len(mine))] if ctx.rank == 0 else None


def construction_memory(trials: list[TrialSpec], warm: TrialSpec, storage: Path) -> list[list[dict[str, Any]]]:
    """`_construction_memory` on a worker group of the trials' size (their setups agree on it)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = trials[0].setup.resources.workers
    result = TorchTrainer(
        _construction_memory, train_loop_config={"trials": [t.model_dump(mode="json") for t in trials],
                                                 "warm": warm.model_dump(mode="json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(storage))).fit()
    return result.return_value


@needs_data
@pytest.mark.integration
def test_zero3_init_memory_per_worker_falls_with_the_number_of_workers(
        ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A ZeRO-3 trial's pretrained model is built inside zero.Init: each worker holds 1/world of every
    parameter, and a worker's peak memory while building it falls with the number of workers. Built
    without zero.Init (ZeRO-2, same workers) every worker holds every parameter whole."""
    import ray
    from ray import cloudpickle

    from rayjobs.config import AdaptationSpec, ModelSpec
    from rayjobs.models import build_task_model

    root = tmp_path_factory.mktemp("zinit")
    big, tiny = save_pretrained(BIG, root / "big"), save_pretrained(TINY, root / "tiny")
    reg = TaskRegistry.load(data_root=DATA)

    def trial(path: Path, stage: int, workers: int) -> TrialSpec:
        cfg = experiment(stage, workers, name=f"z{stage}w{workers}", model_path=str(path))
        return next(t for t in expand_pairwise(cfg, reg, str(root / "r")) if t.kind == "source")

    # the reference: the same model built whole in this process, no DeepSpeed
    plain = build_task_model(ModelSpec(name="big", path=str(big)), AdaptationSpec(), reg.get("snli"))
    numels = [p.numel() for p in plain.module.parameters()]
    full = 4 * sum(numels)
    del plain
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    measure = ray.remote(num_cpus=0)(construction_memory)
    one, two = ray.get([  # side by side: 1 worker + 2 workers of half a CPU each
        measure.remote([trial(big, 3, 1)], trial(tiny, 3, 1), root / "train"),
        measure.remote([trial(big, 3, 2), trial(big, 2, 2)], trial(tiny, 3, 2), root / "train")])
    runs = {(3, 1): one[0], (3, 2): two[0], (2, 2): two[1]}
    for (stage, workers), ranks in runs.items():
        for r in ranks:
            print(f"ZeRO-{stage} build, {workers} worker(s), rank {r['rank']}: peak +{r['peak_mib']:.0f} MiB "
                  f"anonymous, holds +{r['held_mib']:.0f} MiB, parameters {r['param_bytes'] / 2**20:.0f} MiB")
    for (stage, workers), ranks in runs.items():
        assert len(ranks) == workers and all(r["whole_params"] == sum(numels) for r in ranks)
        for r in ranks:
            # zero.Init: each worker holds its partition of every parameter (DeepSpeed pads to world size);
            # without it (ZeRO-2) every worker holds the whole model
            want = 4 * sum(-(-n // workers) for n in numels) if stage == 3 else full
            assert (r["partitioned"], r["param_bytes"]) == (stage == 3, want)
    peak1, peak2 = (max(r["peak_mib"] for r in runs[(3, w)]) for w in (1, 2))
    assert peak2 < 0.8 * peak1, (peak1, peak2)  # the busiest worker's peak falls with the number of workers
    assert max(r["held_mib"] for r in runs[(3, 2)]) < 0.65 * min(r["held_mib"] for r in runs[(3, 1)])
    assert full / 2**20 > 100  # parameters dominate a worker's memory: the comparison is about them


@needs_data
def test_model_dtype_is_honoured() -> None:
    """`model.dtype` is the dtype the weights are built / loaded in, for config-built and pretrained models."""
    from rayjobs.config import AdaptationSpec, ModelSpec
    from rayjobs.models import build_task_model

    task = TaskRegistry.load(data_root=DATA).get("snli")
    for dtype in ("float32", "bfloat16", "float16"):
        for source in ({"config": TINY}, {"path": "builtin:minilm"}):
            tm = build_task_model(ModelSpec(name="m", dtype=dtype, **source), AdaptationSpec(), task)
            assert {p.dtype for p in tm.module.parameters()} == {getattr(torch, dtype)}, (dtype, source)
