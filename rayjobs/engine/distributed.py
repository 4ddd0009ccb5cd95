"""Multi-worker trials: a Ray Train `TorchTrainer` launched from the trial's worker.

Ray Train V2 (the default from Ray 2.51) runs a Train controller next to the caller and starts its
own placement group of `resources.workers` workers, each with `resources.cpu`/`gpu`; the trial's
worker only coordinates (see `pool.worker_shape`). Every worker runs the one training loop
(`train_and_evaluate`) as one rank; the loop shards each global batch across ranks and the
DeepSpeed backend reduces gradients. Rank 0's result row comes back as the training function's
return value (`Result.return_value`), with the loss curve averaged over ranks so it is the loss
of the global batch, comparable with a single-process run.

A setup with `workers > 1` and no `deepspeed` section runs as DeepSpeed ZeRO stage 0, which is plain
data parallelism (gradient all-reduce) behind the same backend interface.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from rayjobs.config import DeepSpeedSpec
from rayjobs.engine.faults import inject_fault
from rayjobs.plan import TrialSpec


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One rank of the trial (runs in a Ray Train worker)."""
    import ray.train  # lazy: ray only on the cluster path
    import torch  # lazy: torch stays out of CLI start-up
    import torch.distributed as dist  # lazy: torch stays out of CLI start-up

    from rayjobs.train.loop import TrainContext, train_and_evaluate  # lazy: torch stays out of CLI start-up

    spec = TrialSpec.model_validate(config["trial"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    inject_fault(spec, rank)  # tests: one rank fails while the others block in DeepSpeed's first collective
    device = "cpu"
    if spec.setup.resources.gpu > 0:
        import ray.train.torch  # lazy: ray only on the cluster path

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        device = str(dev)

    def progress(d: dict[str, Any]) -> None:
        # every rank calls this once per epoch (ray.train.report is a barrier): Ray Train's per-epoch record
        ray.train.report({**d, "done_training": False})

    row = train_and_evaluate(spec, TrainContext(rank=rank, world_size=world, device=device, progress=progress))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (row["loss_curve"], peak_rss, peak_gpu))
    curves = [g[0] for g in gathered]
    n = min(len(c) for c in curves)
    row["loss_curve"] = [float(np.mean([c[i] for c in curves])) for i in range(n)]
    row["hparams"] = {**row["hparams"], "workers": world}
    # memory of the busiest rank (this worker process lives for this trial only)
    row["metrics"] = {**row["metrics"], "peak_rss_mib": max(g[1] for g in gathered)}
    if peak_gpu is not None:
        row["metrics"]["peak_gpu_mib"] = max(g[2] for g in gathered)
    return {**row, "_rank": rank} if rank == 0 else None


def scaling_for(spec: TrialSpec) -> tuple[dict[str, float], bool]:
    """Per-worker resources and use_gpu of a trial's Ray Train worker group."""
    res = spec.setup.resources
    per_worker: dict[str, float] = {"CPU": res.cpu}
    if res.gpu:
        per_worker["GPU"] = res.gpu
    if res.memory_gb:
        per_worker["memory"] = res.memory_gb * 2**30
    return per_worker, res.gpu > 0


def _tune_forwarding() -> list[Any]:
    """Inside a Tune trial (how transferlab runs it), Ray Train's reports go on to Tune as the trial's
    intermediate results: Ray's `TuneReportCallback`, the documented way to run Train inside Tune."""
    try:
        from ray.tune.integration.ray_train import TuneReportCallback  # lazy: ray only on the cluster path
        from ray.tune.trainable.trainable_fn_utils import (
            _in_tune_session,  # lazy: ray only on the cluster path
        )

        if _in_tune_session():
            return [TuneReportCallback()]
    except Exception:  # noqa: BLE001 - not in a Tune trial (a benchmark calling this directly)
        pass
    return []


def train_distributed(spec: TrialSpec) -> dict[str, Any]:
    """Run one trial on `resources.workers` Ray Train workers; returns rank 0's result row."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # lazy: ray only on the cluster path
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: ray only on the cluster path

    from analysis.store.results import ResultStore  # lazy: duckdb only when a store is opened

    if spec.setup.deepspeed is None:  # plain data parallel = ZeRO stage 0
        spec = spec.model_copy(update={"setup": spec.setup.model_copy(update={"deepspeed": DeepSpeedSpec(stage=0)})})
    per_worker, use_gpu = scaling_for(spec)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"trial": spec.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.setup.resources.workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{spec.run_key}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(ResultStore(spec.results_dir).root / "train"),
                             failure_config=FailureConfig(max_failures=0), callbacks=_tune_forwarding()),
    )
    result = trainer.fit()
    if result.error is not None:  # pragma: no cover - fit() raises on failure in Train V2
        raise result.error
    row = result.return_value
    if not isinstance(row, dict) or row.pop("_rank", None) != 0:
        raise RuntimeError(f"Ray Train returned no rank-0 result row for {spec.label}")
    return row
