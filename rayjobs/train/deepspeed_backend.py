"""DeepSpeed ZeRO behind the training loop's backend interface (`backward`, `step`, `model_for_eval`, `save`).

Gradient accumulation: the loop owns the accumulation boundary (it calls `backward` per micro-batch
with the loss already divided by `grad_accum_steps`, and `step` once per boundary, including a short
last group at the end of an epoch). DeepSpeed's default "managed" accumulation instead counts
micro-steps and expects `engine.step()` after every micro-batch, which would misplace the boundary
of that short last group. So the engine runs with `managed_gradient_accumulation: false`
(DeepSpeed >= 0.19; stages 0-3): `engine.backward` only accumulates (ZeRO-2/3 still reduce-scatter
per backward), and each `engine.step()` is the boundary that finalises the gradients, clips,
updates and steps the LR schedule. `gradient_accumulation_steps` is still set to the loop's value so
DeepSpeed's batch bookkeeping (`train_batch_size`) is consistent; `scale_wrt_gas=False` because the
loop already scaled the loss.

Optimizer and schedule: the DeepSpeed config's AdamW over the same two parameter groups as the
torch backend (no decay on biases / norms). On CPU it is `torch_adam` (no op to JIT-compile, and
bit-compatible with the torch backend); on GPU DeepSpeed's fused Adam, or its CPU Adam with
optimizer offload. The LR schedule is the torch backend's own linear warmup + linear decay, passed
as a client scheduler: DeepSpeed's `WarmupDecayLR` starts warmup at lr 0 and needs >= 2 warmup steps,
so it cannot reproduce `warmup_ratio: 0` or the `(step + 1) / warmup` ramp. A `scheduler` section in
`deepspeed.extra` replaces it.

ZeRO-3 model construction (`model_init_context`): a pretrained model is loaded inside `zero.Init`
(through transformers' `HfDeepSpeedConfig`), so every parameter is partitioned as it is created and
no worker ever holds the whole model: a model larger than one worker's memory can start. Only rank 0
reads checkpoint values; the weights are exactly those of a plain `from_pretrained` (new heads too).
A model built from `config` (random weights) is built whole, as in a single process: under `zero.Init`
transformers skips torch's default initialisers and re-initialises module by module, which draws other
random numbers, and a ZeRO-3 run must equal its single-process run (they share a run key). Such
models are small stand-ins; models too large for one worker come from a path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rayjobs.config import DeepSpeedSpec, TrainSpec
from rayjobs.models import checkpoint
from rayjobs.models.base import TaskModel
from rayjobs.train.backend import _linear_warmup

#: DeepSpeed config keys the backend derives from `train`/`deepspeed` fields; `extra` must not set them
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "managed_gradient_accumulation")
DERIVED_ZERO_KEYS = ("stage", "offload_optimizer", "offload_param")
#: DeepSpeed's default reduce / all-gather bucket (elements)
DEFAULT_BUCKET = 500_000_000


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def param_groups(tm: TaskModel, hp: TrainSpec) -> list[dict[str, Any]]:
    """The torch backend's groups: weight decay on everything but biases and norm weights."""
    decay, no_decay = [], []
    for name, p in tm.module.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_config(hp: TrainSpec, ds: DeepSpeedSpec, world_size: int, micro: int, on_gpu: bool,
                 n_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config of one trial: derived from the train/deepspeed specs, then `extra` merged in.

    `n_params` (trainable parameters) caps the reduce / all-gather buckets: a model smaller than
    DeepSpeed's 5e8-element default fits one bucket either way, and ZeRO-1/2 allocate a full bucket
    per micro-step, so the cap saves GBs of memory per rank without changing what is communicated.
    """
    zero: dict[str, Any] = {"stage": ds.stage}
    if n_params:
        bucket = min(DEFAULT_BUCKET, -(-n_params // 1024) * 1024)  # a multiple of any alignment DeepSpeed asks
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.stage == 3:
        # the loop saves a consolidated copy itself (GatheredParameters), not via the 16-bit save hook
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": hp.grad_accum_steps,
        "train_batch_size": micro * hp.grad_accum_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(hp.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": hp.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": hp.weight_decay,
            # torch's AdamW on CPU (no JIT-built op); DeepSpeed's CPU Adam when the optimizer is offloaded
            "torch_adam": not on_gpu and not ds.offload_optimizer}},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, ds.extra)


class DeepSpeedBackend:
    """A DeepSpeed engine driving one rank; the TaskModel's forward runs through the engine while training."""

    def __init__(self, tm: TaskModel, hp: TrainSpec, ds: DeepSpeedSpec, ctx: Any, total_steps: int, micro: int):
        try:
            import deepspeed  # lazy: optional dependency (deepspeed)
        except ImportError as e:  # pragma: no cover - preflight reports this before training
            raise RuntimeError("setup.deepspeed needs the deepspeed package (pip install 'transformers[deepspeed]' "
                               "or the project's `deepspeed` extra)") from e
        self.tm, self.hp, self.ds = tm, hp, ds
        self.raw_module = tm.module
        # The loop turns on deterministic algorithms, which makes every torch.empty write NaNs over the
        # new memory. ZeRO allocates a fresh reduce bucket (5e8 elements by default) per micro-step and
        # overwrites it, so the fill only costs time and touches GBs of pages (seconds per step on CPU).
        torch.utils.deterministic.fill_uninitialized_memory = False
        on_gpu = str(ctx.device).startswith("cuda")
        # counts of whole parameters (numel() of a ZeRO-3 partitioned one is 0)
        counts = param_counts(tm.module)
        self.zero_init = is_partitioned(tm.module)  # built inside zero.Init (`model_init_context`)
        tm.param_counts = lambda: counts  # type: ignore[method-assign]
        self.config = build_config(hp, ds, ctx.world_size, micro, on_gpu, n_params=counts[0])
        warmup = int(hp.warmup_ratio * total_steps)
        scheduler = None if "scheduler" in self.config else (lambda opt: _linear_warmup(opt, warmup, total_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=tm.module, model_parameters=param_groups(tm, hp), config=self.config,
            lr_scheduler=scheduler, dist_init_required=None)
        managed = getattr(self.engine, "managed_gradient_accumulation", None)
        if not callable(managed) or managed():  # an older DeepSpeed ignores the key: steps would silently differ
            raise RuntimeError(f"deepspeed {deepspeed.__version__} has no unmanaged gradient accumulation "
                               "(`managed_gradient_accumulation: false`, all ZeRO stages); install deepspeed>=0.19.8")
        # Training forwards go through the engine (ZeRO-3 hooks, micro-step bookkeeping, autocast).
        tm.module = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()
        self.engine.zero_grad()

    def model_for_eval(self) -> TaskModel:
        """The TaskModel on the unwrapped module: names as in a single-process run; ZeRO-3 hooks still gather."""
        self.tm.module = self.raw_module
        return self.tm

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Full trainable parameters on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
        import deepspeed  # lazy: optional dependency (deepspeed)

        rank = dist.get_rank() if dist.is_initialized() else 0
        state: dict[str, torch.Tensor] = {}
        for name, p in self.raw_module.named_parameters():
            if not p.requires_grad:
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3 partitioned: gather one parameter at a time (bounded memory)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if rank == 0:
                        state[name] = p.detach().to("cpu", torch.float32, copy=True).contiguous()
            elif rank == 0:
                state[name] = p.detach().to("cpu", torch.float32, copy=True).contiguous()
        return state if rank == 0 else None

    def save(self, folder: Path, meta: dict[str, Any] | None) -> Path:
        """A checkpoint `TaskModel.load` reads (trainable params by name, fp32); rank 0 writes it."""
        state = self.trainable_state()
        if state is not None:
            info = {**(meta or {}), "deepspeed": {"stage": self.ds.stage, "precision": self.ds.precision,
                                                  "world_size": self.engine.world_size,
                                                  "zero_init": self.zero_init}}
            checkpoint.save(folder, state, info)
        return Path(folder)


# -- ZeRO-3 model construction ---------------------------------------------------------------------------
def builds_partitioned(setup: Any) -> bool:
    """Whether `model_init_context` builds this setup's model inside `zero.Init` (see the module docstring)."""
    return setup.deepspeed is not None and setup.deepspeed.stage == 3 and setup.model.path is not None


@contextlib.contextmanager
def model_init_context(trial: Any, ctx: Any) -> Iterator[bool]:
    """Inside it, transformers builds a ZeRO-3 trial's pretrained model partitioned across the ranks
    (`zero.Init` with the trial's DeepSpeed config, dtype from its precision); yields whether it does.
    The flag is process-wide in transformers, so it is set only while the model is built."""
    if not builds_partitioned(trial.setup):
        yield False
        return
    import deepspeed  # lazy: optional dependency (deepspeed)
    from transformers.integrations import (
        deepspeed as hf_ds,  # lazy: transformers loads only when a model is built
    )

    if dist.is_initialized():  # zero.Init reads the world size from DeepSpeed's own handle on the group
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    hp = trial.hparams
    micro = max(1, hp.batch_size // (ctx.world_size * hp.grad_accum_steps))
    cfg = build_config(hp, trial.setup.deepspeed, ctx.world_size, micro, str(ctx.device).startswith("cuda"))
    keep = hf_ds.HfDeepSpeedConfig(cfg)  # registers itself (weakly) with transformers
    try:
        yield True
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del keep


def param_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting a ZeRO-3 partitioned parameter whole."""
    def n(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(module.parameters())
    return sum(n(p) for p in params if p.requires_grad), sum(n(p) for p in params)


def is_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def local_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its partitions of ZeRO-3 parameters, others whole."""
    total = 0
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += t.numel() * t.element_size()
    return total


def load_into_partitioned(module: torch.nn.Module, folder: str | Path,
                          skip: Callable[[str], bool] = lambda _: False) -> int:
    """`checkpoint.load_into` for a model built partitioned: every rank walks the checkpoint's tensors in
    the same order and gathers one parameter at a time; rank 0 reads its value (bounded memory).
    Shapes are checked on every rank first, from metadata, so a bad checkpoint fails all ranks alike."""
    import deepspeed  # lazy: optional dependency (deepspeed)
    from safetensors import safe_open  # lazy: safetensors only when saving weights

    path = Path(folder) / checkpoint.WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    own = dict(module.named_parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    with safe_open(str(path), framework="pt") as f:
        names = [k for k in f.keys() if not skip(k)]  # noqa: SIM118 - safe_open has keys(), not iteration
        for name in names:
            if name not in own:
                raise KeyError(f"checkpoint {folder} has parameter {name!r} the model does not have "
                               "(different model or adaptation?)")
            shape = tuple(f.get_slice(name).get_shape())
            want = tuple(getattr(own[name], "ds_shape", own[name].shape))
            if shape != want:
                raise ValueError(f"checkpoint {folder}: shape of {name!r} is {shape}, model expects {want}")
        with torch.no_grad():
            for name in names:
                p = own[name]
                if not hasattr(p, "ds_id"):
                    p.copy_(f.get_tensor(name))
                    continue
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.copy_(f.get_tensor(name))
    return len(names)
