"""Checks that fail a job before any training starts: models, adaptations, tasks, resources."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

from packaging.version import Version

from rayjobs.config import PairwiseConfig, SetupSpec
from rayjobs.models import encoder_head
from rayjobs.models.loading import ModelError, resolve_path, tokenizer_path
from rayjobs.tasks.registry import TaskRegistry
from rayjobs.tasks.templates import resolve

#: oldest DeepSpeed tested with `managed_gradient_accumulation: false` (caller-owned steps) on ZeRO stages 0-3
MIN_DEEPSPEED = "0.19.8"

# adaptation methods each family supports
FAMILY_METHODS = {
    # prompt tuning: classification head only (peft has no multiple-choice task type); prefix tuning
    # needs past key values, which encoder models do not take in transformers 5
    "encoder": {"full", "bitfit", "lora", "adapter", "prompt_tuning"},
    "seq2seq": {"full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"},
    "causal": {"full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"},
}


def check_setup(setup: SetupSpec, tasks: list[str], registry: TaskRegistry) -> None:
    where = f"setup {setup.key!r}"
    if setup.model.path:
        resolve_path(setup.model.path)
    tokenizer_path(setup.model)
    fam = setup.model.family
    if setup.adaptation.method not in FAMILY_METHODS[fam]:
        raise ModelError(f"{where}: adaptation {setup.adaptation.method!r} does not fit a {fam} model "
                         f"(supported: {sorted(FAMILY_METHODS[fam])})")
    for t in tasks:
        spec = registry.get(t)
        if fam == "encoder" and spec.answer_type == "text":
            raise ModelError(f"{where}: task {t!r} has free-text answers; an encoder model cannot produce them "
                             "(use a seq2seq or causal model)")
        if fam == "encoder" and setup.adaptation.method == "prompt_tuning" and encoder_head(setup.model, spec) != \
                "classification":
            raise ModelError(f"{where}: adaptation prompt_tuning does not fit the encoder multiple-choice head "
                             f"that task {t!r} needs (peft has no multiple-choice task type); use lora or adapter")
        for stage in ("train", "eval"):
            try:
                resolve(spec, getattr(setup.prompts, stage), fam)
            except ValueError as e:
                raise ModelError(f"{where}: prompts.{stage}: {e}") from None
    check_distributed(setup, _known_cluster())


def _known_cluster() -> dict[str, float] | None:
    """Total resources of the Ray cluster this process is already connected to, else None (not known yet)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return dict(ray.cluster_resources())


def check_distributed(setup: SetupSpec, cluster: dict[str, float] | None = None) -> None:
    """DeepSpeed / multi-worker settings that cannot run on the requested resources, before any training.

    `cluster` is `ray.cluster_resources()` where known (a connected cluster): a worker group larger
    than the whole cluster would otherwise wait for resources forever.
    """
    where = f"setup {setup.key!r}"
    ds, res = setup.deepspeed, setup.resources
    distributed = ds is not None or res.workers > 1
    if distributed and importlib.util.find_spec("deepspeed") is None:
        what = "`deepspeed` is set" if ds is not None else \
            f"resources.workers = {res.workers} (data parallel runs as DeepSpeed ZeRO stage 0)"
        raise ModelError(f"{where}: {what} but the deepspeed package is not installed "
                         "(pip install 'transferlab[deepspeed]')")
    if distributed and Version(importlib.metadata.version("deepspeed")) < Version(MIN_DEEPSPEED):
        raise ModelError(f"{where}: deepspeed {importlib.metadata.version('deepspeed')} is too old: the training "
                         f"loop owns the gradient-accumulation boundary, which needs deepspeed>={MIN_DEEPSPEED}")
    if ds is not None:
        if ds.offload_params and ds.stage != 3:
            raise ModelError(f"{where}: deepspeed.offload_params needs ZeRO stage 3 (got stage {ds.stage})")
        if ds.precision in ("bf16", "fp16") and res.gpu == 0:
            raise ModelError(f"{where}: deepspeed precision {ds.precision} needs GPUs (resources.gpu = 0); "
                             "use precision fp32 on CPU")
        if (ds.offload_optimizer or ds.offload_params) and res.gpu == 0:
            raise ModelError(f"{where}: deepspeed offload_optimizer/offload_params move state from GPU to CPU "
                             "memory; with resources.gpu = 0 everything is on the CPU already (set them false)")
        if setup.model.dtype != "float32" and setup.model.dtype != {"bf16": "bfloat16", "fp16": "float16"}.get(
                ds.precision):
            raise ModelError(f"{where}: model.dtype {setup.model.dtype} does not match deepspeed.precision "
                             f"{ds.precision}; load in float32 (DeepSpeed keeps fp32 master weights and casts) "
                             "or in the training precision")
        from rayjobs.train.deepspeed_backend import (  # lazy: torch stays out of CLI start-up
            DERIVED_KEYS,
            DERIVED_ZERO_KEYS,
        )

        clash = [k for k in DERIVED_KEYS if k in ds.extra]
        clash += [f"zero_optimization.{k}" for k in DERIVED_ZERO_KEYS if k in ds.extra.get("zero_optimization", {})]
        if clash:
            raise ModelError(f"{where}: deepspeed.extra sets {clash}, which are derived from the `train` and "
                             "`deepspeed` fields (batch_size, grad_accum_steps, max_grad_norm, stage, offload_*, "
                             "precision); set those instead")
    if res.gpu and res.gpu != int(res.gpu) and distributed:
        raise ModelError(f"{where}: fractional resources.gpu ({res.gpu}) cannot be used by multi-worker training")
    if distributed:
        for name, hp in (("train", setup.train), ("source_train", setup.source_hparams)):
            if hp.batch_size % (res.workers * hp.grad_accum_steps):
                raise ModelError(f"{where}: {name}.batch_size {hp.batch_size} is not divisible by resources.workers "
                                 f"x {name}.grad_accum_steps = {res.workers} x {hp.grad_accum_steps}; the global "
                                 "batch must split into equal micro-batches")
    if cluster is not None and distributed:
        for key, per in (("CPU", res.cpu), ("GPU", res.gpu)):
            need, have = per * res.workers, float(cluster.get(key, 0.0))
            if need > have:
                raise ModelError(f"{where}: {res.workers} workers x {per:g} {key} = {need:g} {key}, but the Ray "
                                 f"cluster has {have:g} {key} in all")


def check_setups(cfg: PairwiseConfig, registry: TaskRegistry) -> None:
    tasks = list(dict.fromkeys(cfg.tasks.sources + cfg.tasks.target_list))
    for t in tasks:
        registry.get(t)
    for setup in cfg.setups:
        check_setup(setup, tasks, registry)
