"""The user errors of every layer, and how a command reports one: one clear line and exit code 2.

Here, below the CLI and the driver, because both the `transferlab` CLI and `python -m rayjobs.<kind>`
(the driver's own entry point) report errors the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from analysis.errors import StoreError
from rayjobs.config import ConfigError
from rayjobs.models.loading import ModelError
from rayjobs.tasks.registry import TaskError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, TaskError, StoreError, ModelError,
                                                FileNotFoundError, PermissionError)


def guarded(fn: Callable[..., int | None], *args: Any) -> int:
    """Run a command; a user error becomes one clear line on stderr and exit code 2."""
    try:
        return int(fn(*args) or 0)
    except USER_ERRORS as e:
        msg = str(e).strip() or type(e).__name__
        print(f"transferlab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferlab: interrupted; finished runs are stored, re-run to resume", file=sys.stderr)
        return 130
