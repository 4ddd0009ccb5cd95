"""The one registry class behind every pluggable name: selectors, ranking-metric families, prompt baselines.

Why one class: each table used to be its own dict and decorator with its own duplicate check and its own
"unknown name" message. An entry is either the object itself or a lazy `"module:attr"` target (as in
lm-evaluation-harness), imported on first lookup, so a registry can name an entry whose module imports
torch, or imports the registry's own module, without an import at start-up or an import circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from analysis.errors import AnalysisError

T = TypeVar("T")


def load_target(target: str, what: str = "target") -> Any:
    """The object a `"module:attr"` string names; a malformed or unloadable one is a ValueError naming it."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what} {target!r} is not 'module:attr'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {target!r} cannot be loaded: {e}") from None


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> entries in registration order; `what` names the kind of entry in messages."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T | str] = {}
        self._lazy: set[str] = set()

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name registered twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def add_lazy(self, name: str, target: str) -> None:
        """Register the object at `"module:attr"`, imported when `name` is first looked up."""
        if ":" not in target:
            raise ValueError(f"lazy {self.what} {target!r} is not 'module:attr'")
        self.add(name, target)  # type: ignore[arg-type]
        self._lazy.add(name)

    def decorator(self, name: str, build: Callable[[Callable], T]) -> Callable[[Callable], Callable]:
        """`@registry.decorator(name, build)`: registers `build(fn)` and returns `fn` unchanged."""
        def register(fn: Callable) -> Callable:
            self.add(name, build(fn))
            return fn
        return register

    def require(self, name: str, hint: str = "") -> T:
        """The entry `name`, or an `AnalysisError` listing the known names."""
        if name not in self._entries:
            raise AnalysisError(f"unknown {self.what} '{name}'{hint} (choose from {', '.join(self._entries)})")
        return self[name]

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if name in self._lazy:
            entry = load_target(str(entry), f"lazy {self.what}")
            self._entries[name] = entry
            self._lazy.discard(name)
        return entry  # type: ignore[return-value]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry
        self._lazy.discard(name)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._lazy.discard(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
