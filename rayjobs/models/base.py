"""What the training loop needs from a model, whatever its family.

A `TaskModel` wraps an `nn.Module` with the task-specific pieces: how a batch of `Example`s is
tensorised, the training loss, and predictions in the task's answer space. Checkpoints hold only
the parameters that were trained (all of them for full fine-tuning, biases for BitFit, the added
modules for PEFT methods), so the same save/load serves every adaptation method.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rayjobs.tasks import Example

CKPT_WEIGHTS = "trained.safetensors"
CKPT_META = "meta.json"


class TaskModel(ABC):
    module: nn.Module
    #: parameter-name prefixes of the task head; re-initialised per task, never transferred
    head_prefixes: tuple[str, ...] = ()

    @abstractmethod
    def collate(self, examples: list[Example]) -> dict[str, Any]: ...

    @abstractmethod
    def loss(self, batch: dict[str, Any]) -> torch.Tensor: ...

    @abstractmethod
    def predict(self, batch: dict[str, Any]) -> list[Any]:
        """Predictions comparable with `gold()`: choice indices, answer strings or floats."""

    @staticmethod
    def gold(examples: list[Example]) -> list[Any]:
        ex = examples[0] if examples else None
        if ex is not None and ex.answer is not None:
            return [e.answer for e in examples]
        if ex is not None and ex.value is not None:
            return [e.value for e in examples]
        return [e.label for e in examples]

    # -- parameters and checkpoints ---------------------------------------------------------------
    def param_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.module.parameters())
        return trainable, total

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if p.requires_grad}

    def is_head(self, name: str) -> bool:
        return any(name.startswith(p) or f".{p}" in name for p in self.head_prefixes)

    def save(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(folder / CKPT_WEIGHTS))
        (folder / CKPT_META).write_text(json.dumps(meta or {}, indent=1, sort_keys=True, default=str))
        return folder

    def load(self, folder: str | Path, skip_head: bool = True) -> int:
        """Load trained parameters from a source checkpoint; the target's task head stays fresh."""
        path = Path(folder) / CKPT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"source checkpoint {path} not found")
        state = load_file(str(path))
        own = dict(self.module.named_parameters())
        loaded = 0
        with torch.no_grad():
            for name, tensor in state.items():
                if skip_head and self.is_head(name):
                    continue
                if name not in own:
                    raise KeyError(f"checkpoint {folder} has parameter {name!r} the model does not have "
                                   "(different model or adaptation?)")
                if own[name].shape != tensor.shape:
                    raise ValueError(f"checkpoint {folder}: shape of {name!r} is {tuple(tensor.shape)}, "
                                     f"model expects {tuple(own[name].shape)}")
                own[name].copy_(tensor)
                loaded += 1
        return loaded
