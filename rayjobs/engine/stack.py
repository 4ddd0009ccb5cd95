"""The software stack a run was produced with: library versions and the device, once per process.

Why: a store that mixes torch or transformers versions (a cluster upgraded mid-study, two images)
mixes numbers that need not agree; every run row records its stack (`runs.stack`) so `transferlab
status` and the report can say so (analysis.store.status.stack_warning).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import sys
from typing import Any

#: distributions whose versions determine a run's numbers
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "ray")


@functools.cache
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def device() -> str:
    """The accelerator this process computes on: the CUDA device's name, else `cpu`. Only a process that
    loaded torch can have used one, so torch is not imported here just to ask."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def describe() -> dict[str, Any]:
    """The stack of a run row: versions (computed once per process) and the device."""
    return {**versions(), "device": device()}
