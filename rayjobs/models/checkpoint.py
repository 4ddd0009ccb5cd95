"""The one checkpoint format: the trained parameters by name (safetensors, fp32 where gathered) plus a
meta.json, written atomically.

A checkpoint folder appears complete or not at all: files go to a temporary sibling folder that is
renamed into place, so a trial killed mid-save never leaves a half-written source model that a
transfer would load. Task heads are skipped on load (they are re-initialised per task).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "trained.safetensors"
META = "meta.json"


def save(folder: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Write `state` and `meta` as `folder/` atomically (an existing folder is replaced whole)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta or {}, indent=1, sort_keys=True, default=str))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return load_file(str(path))


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def load_into(module: nn.Module, folder: str | os.PathLike, skip: Callable[[str], bool] = lambda _: False) -> int:
    """Copy a checkpoint's tensors into `module`'s parameters of the same names; returns how many."""
    state = read_state(folder)
    own = dict(module.named_parameters())
    loaded = 0
    with torch.no_grad():
        for name, tensor in state.items():
            if skip(name):
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
