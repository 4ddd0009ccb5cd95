"""Optimisation backends of the training loop: plain torch (AdamW or Adafactor) or a DeepSpeed ZeRO engine.

The loop only calls `backward`, `step`, `model_for_eval` and `save` (and, for best-step selection in a
single process, `snapshot` / `restore`); everything that differs between a single CPU process and a
sharded multi-GPU run lives behind these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rayjobs.config import TrainSpec
from rayjobs.models.base import TaskModel


def _linear_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def make_optimizer(tm: TaskModel, hp: TrainSpec) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable parameters, no weight decay on biases and norm weights.

    adamw: torch's AdamW. adafactor: transformers' Adafactor at the fixed learning rate `learning_rate`
    (relative_step, scale_parameter and warmup_init off: the setting of prompt tuning in Lester et al.
    2021 and Lin et al. 2024), its other settings at their defaults (no momentum, update clipping 1.0);
    the loop's linear schedule drives its lr as it does AdamW's.
    """
    decay, no_decay = [], []
    for name, p in tm.module.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": hp.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if hp.optimizer == "adafactor":
        from transformers.optimization import Adafactor  # lazy: transformers loads only when a model is built

        return Adafactor(groups, lr=hp.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    return torch.optim.AdamW(groups, lr=hp.learning_rate)


class TorchBackend:
    """Single process (or plain data parallel via Ray Train's DDP wrapping of `tm.module`)."""

    def __init__(self, tm: TaskModel, hp: TrainSpec, total_steps: int):
        self.tm, self.hp = tm, hp
        self.params = [p for p in tm.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(tm, hp)
        self.scheduler = _linear_warmup(self.optimizer, int(hp.warmup_ratio * total_steps), total_steps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.hp.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def model_for_eval(self) -> TaskModel:
        return self.tm

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable parameters (what changes during training), for best-step selection."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.tm.module.named_parameters() if p.requires_grad}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.tm.module.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def save(self, folder: Path, meta: dict[str, Any] | None) -> Path:
        return self.tm.save(folder, meta or {})
