"""Multi-task training data (paper 000, section 4.2): n prompted examples from each source, shuffled.

The target is never trained on; it is evaluated zero-shot by the training loop over its prompt
templates (rayjobs/tasks/templates.py). Each source is rendered with its *own* templates before the
sources are shuffled together: afterwards nothing tells which task an example came from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from rayjobs.tasks.registry import Example, TaskData, TaskError, TaskRegistry, TaskSpec

Render = Callable[[TaskSpec, Sequence[Example]], list[Example]]


def load_mixture(registry: TaskRegistry, sources: Sequence[str], target: str, n_per_source: int | None,
                 seed: int, eval_fraction: float = 0.2, split_seed: int = 0, render: Render | None = None) -> TaskData:
    """n examples of each source (each drawn like a single-task run, then `render`ed with the source's
    spec), shuffled together with `seed`.

    The result carries the *target's* spec (its metric and answer space are what is evaluated) and
    no eval examples; `origin` records every source's data and how many examples it gave.
    """
    if target in sources:
        raise TaskError(f"multi-task set {list(sources)} contains its target {target!r}: "
                        "the target is evaluated zero-shot and must not be trained on")
    if len(set(sources)) != len(sources):
        raise TaskError(f"multi-task set {list(sources)} names a task twice")
    examples: list[Example] = []
    parts = []
    for s in sources:
        data = registry.load_data(s, n_per_source, 1, seed=seed, eval_fraction=eval_fraction, split_seed=split_seed)
        examples.extend(render(data.spec, data.train) if render else data.train)
        parts.append(f"{s}={data.origin}(n={len(data.train)})")
    random.Random(seed).shuffle(examples)
    return TaskData(registry.get(target), "mixture:" + ";".join(parts), tuple(examples), ())
