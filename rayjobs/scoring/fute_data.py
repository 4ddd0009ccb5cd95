"""The data FUTE embeds: the unlabelled probe pool (MTE), labelled task samples and few-shot prompted
examples (DTE). Everything is rebuilt deterministically from its spec wherever a trial runs, and checked
against the digest the plan recorded.

Probe pool (paper 004, Sec. 3.3 "Sourcing Unsupervised Data"): the paper samples text from CrossFit with
every evaluation dataset removed and labels discarded. Here: task inputs from `../shared/data` (a seeded
training sample of registry tasks, and/or rows of the prompted-examples file), labels and outputs
dropped, every evaluation target excluded by task name and, for registry targets with local data, by exact
input text too. Its composition (tasks, counts, what was excluded, digest) is stored with every result.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from analysis.importers.prompted import read_prompted as read_prompted_jsonl
from rayjobs.config import _Strict
from rayjobs.tasks.registry import DEFAULT_DATA_ROOT, Example, TaskError, TaskRegistry

DEFAULT_PROMPTED = DEFAULT_DATA_ROOT / "taskweb" / "prompted_examples_32.jsonl"


class PoolSpec(_Strict):
    """The unlabelled probe pool the black boxes label for their model task embeddings."""

    tasks: list[str] = Field(default_factory=list, description="registry tasks: inputs of a seeded training "
                                                               "sample, labels dropped")
    prompted_tasks: list[str] = Field(default_factory=list, description="tasks of the prompted-examples file: "
                                                                        "inputs, outputs dropped")
    prompted_file: str | None = Field(default=None, description="default ../shared/data/taskweb/prompted_examples_32.jsonl")
    n_per_task: int = Field(default=100, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class ProbePool:
    examples: tuple[Example, ...]  # text = the input, no choices, label -1; uid = "<pool task>:<uid>"
    composition: dict[str, Any] = field(hash=False)

    @property
    def digest(self) -> str:
        return str(self.composition["digest"])


def _prompted_file(path: str | None) -> Path:
    p = Path(path) if path else DEFAULT_PROMPTED
    if not p.is_file():
        raise TaskError(f"prompted-examples file {p} not found")
    return p


def read_prompted(path: str | None) -> dict[str, list[dict[str, Any]]]:
    """Rows {"input", "output", "choices", "line"} of the prompted-examples JSONL per task (the default file
    without a path); errors are task errors."""
    return read_prompted_jsonl(_prompted_file(path), TaskError)


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _seeded(rows: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    if n is None or n >= len(rows):
        return list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def build_pool(spec: PoolSpec, registry: TaskRegistry, targets: Sequence[str], split_seed: int = 0,
               eval_fraction: float = 0.2) -> ProbePool:
    """The probe pool of `spec`, evaluation `targets` excluded (by name: an error; by text: dropped)."""
    named = [t for t in [*spec.tasks, *spec.prompted_tasks] if t in set(targets)]
    if named:
        raise TaskError(f"probe pool: task(s) {', '.join(sorted(set(named)))} are evaluation targets; the pool "
                        "must be disjoint from every target")
    target_texts: set[str] = set()
    for t in targets:  # registry targets with local data: drop pool inputs identical to any of their inputs
        try:
            if registry.origin(t).startswith("local:"):
                d = registry.load_data(t, None, None, seed=0, eval_fraction=eval_fraction, split_seed=split_seed)
                target_texts.update(e.text for e in (*d.train, *d.eval))
        except TaskError:
            continue
    examples: list[Example] = []
    counts: dict[str, int] = {}
    origins: dict[str, str] = {}
    dropped = 0
    for t in spec.tasks:
        data = registry.load_data(t, spec.n_per_task, 1, seed=spec.seed, eval_fraction=eval_fraction,
                                  split_seed=split_seed)
        origins[t] = data.origin
        kept = [e for e in data.train if e.text not in target_texts]
        dropped += len(data.train) - len(kept)
        examples += [Example(e.text, (), -1, uid=f"{t}:{e.uid}") for e in kept]
        counts[t] = len(kept)
    if spec.prompted_tasks:
        path = _prompted_file(spec.prompted_file)
        rows = read_prompted(str(path))
        missing = [t for t in spec.prompted_tasks if t not in rows]
        if missing:
            raise TaskError(f"probe pool: no prompted examples of task(s) {', '.join(missing)} in {path}")
        for t in spec.prompted_tasks:
            picked = _seeded(rows[t], spec.n_per_task, spec.seed)
            kept = [r for r in picked if r["input"] not in target_texts]
            dropped += len(picked) - len(kept)
            examples += [Example(r["input"], (), -1, uid=f"prompted/{t}:{r['line']}") for r in kept]
            counts[f"prompted/{t}"] = len(kept)
            origins[f"prompted/{t}"] = f"{path.name}#{file_digest(path)}"
    seen: set[str] = set()
    unique = []
    for e in examples:  # one copy of each input text
        if e.text not in seen:
            seen.add(e.text)
            unique.append(e)
    blob = json.dumps([[e.uid, hashlib.sha1(e.text.encode()).hexdigest()[:12]] for e in unique])
    composition = {"counts": counts, "n": len(unique), "origins": origins, "n_per_task": spec.n_per_task,
                   "seed": spec.seed, "excluded_targets": sorted(set(targets)),
                   "dropped_same_text_as_a_target": dropped, "dropped_duplicates": len(examples) - len(unique),
                   "digest": hashlib.sha256(blob.encode()).hexdigest()[:16]}
    return ProbePool(tuple(unique), composition)


# -- labelled data (DTE) ---------------------------------------------------------------------------------------
class DatasetRef(_Strict):
    """Labelled data of one DTE: a registry task's training sample, or a task's prompted few-shot rows."""

    task: str
    source: str = Field(description="registry | prompted")
    n: int | None = None
    free_text_choices: int = Field(default=3, ge=2, description="prompted rows without choices: the gold output "
                                   "and (k - 1) other outputs of the task as the choices")
    prompted_file: str | None = None

    @property
    def data_name(self) -> str:
        return f"{self.source}:{self.n if self.n is not None else 'all'}"


def registry_examples(registry: TaskRegistry, task: str, n: int | None, seed: int, split_seed: int,
                      eval_fraction: float) -> tuple[list[Example], list[str], str]:
    """A seeded labelled training sample of a registry task with a fixed label set: (examples, canonical
    label order, data origin)."""
    spec = registry.get(task)
    if spec.answer_type != "choice" or not spec.choices:
        raise TaskError(f"task {task!r} has no fixed label set (answer type {spec.answer_type}); a DTE or MTE "
                        "over the registry needs one (few-shot prompted rows work for any task)")
    data = registry.load_data(task, n, 1, seed=seed, eval_fraction=eval_fraction, split_seed=split_seed)
    examples = [replace(e, choices=tuple(spec.choices), uid=f"{task}:{e.uid}") for e in data.train]
    return examples, list(spec.choices), data.origin


def prompted_examples(path: str | None, task: str, n: int | None, seed: int, free_text_choices: int = 3
                      ) -> tuple[list[Example], str]:
    """A seeded sample of a task's prompted rows as choice examples (each row's own choices).

    A row whose output is one of its choices is labelled by that index; a row without choices (free text,
    scores) or whose output is not among them gets `free_text_choices` choices: its output and other outputs
    of the task, drawn with `seed`, in a seeded order.
    """
    p = _prompted_file(path)
    rows = read_prompted(str(p)).get(task)
    if not rows:
        raise TaskError(f"no prompted examples of task {task!r} in {p}")
    picked = _seeded(rows, n, seed)
    outputs = sorted({str(r["output"]) for r in rows if r["output"] is not None})
    rng = random.Random(seed)
    out = []
    for r in picked:
        gold = str(r["output"])
        choices = [str(c) for c in (r["choices"] or [])]
        if gold in choices and len(choices) >= 2:
            label = choices.index(gold)
        else:
            others = [o for o in outputs if o != gold]
            choices = [gold, *rng.sample(others, min(free_text_choices - 1, len(others)))]
            if len(choices) < 2:
                raise TaskError(f"prompted task {task!r}: row {r['line']} has no choices and the task has no other "
                                "output to contrast it with")
            rng.shuffle(choices)
            label = choices.index(gold)
        out.append(Example(r["input"], tuple(choices), label, uid=f"prompted/{task}:{r['line']}"))
    return out, f"{p.name}#{file_digest(p)}"


def mte_examples(pool: ProbePool, rows: Sequence[dict[str, Any]], choices: Sequence[str]
                 ) -> tuple[list[Example], list[list[float]]]:
    """The surrogate's training data of a model task embedding: every probe input with the canonical choice
    names (never the black box's prompt or verbalisers) and the black box's choice distribution from its
    `predictions` rows (`probs`, in the canonical order). Every probe input must have exactly one row."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["example_id"] in by_id:
            raise ValueError(f"probe input {r['example_id']} scored twice")
        by_id[r["example_id"]] = r
    missing = [e.uid for e in pool.examples if e.uid not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} probe inputs have no predictions row (e.g. {missing[0]})")
    examples, targets = [], []
    for e in pool.examples:
        probs = by_id[e.uid].get("probs")
        if probs is None or len(probs) != len(choices):
            raise ValueError(f"probe input {e.uid}: expected {len(choices)} choice probabilities in the canonical "
                             f"order {list(choices)}, got {probs}")
        q = [float(x) for x in probs]
        total = sum(q)
        if not 0.999 < total < 1.001 or min(q) < 0:
            raise ValueError(f"probe input {e.uid}: probabilities {q} are not a distribution")
        q = [x / total for x in q]
        label = max(range(len(q)), key=q.__getitem__)
        examples.append(Example(e.text, tuple(choices), label, uid=e.uid))
        targets.append(q)
    return examples, targets


def one_hot(examples: Sequence[Example]) -> list[list[float]]:
    return [[1.0 if c == e.label else 0.0 for c in range(len(e.choices))] for e in examples]
