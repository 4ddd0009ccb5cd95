"""Task registry and loaders.

A task is declared as data (YAML, see `task_registry.yaml`), lm-evaluation-harness style: where
its examples come from (a local JSONL/CSV/Parquet file or a Hugging Face `datasets` id), how a
record renders into the one example form every model family consumes, and its metric.

The one example form is `Example(text, choices, label)`: classification tasks have a fixed label
set as choices, multiple-choice tasks carry per-example choices. Encoder heads, seq2seq and causal
LMs all train and evaluate from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayjobs.tasks.example import Example  # noqa: F401 - the registry hands these out
from rayjobs.tasks.templates import PromptTemplate, coerce_templates

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"


class TaskError(ValueError):
    """Unknown task, bad task spec, or task data that cannot be read."""


class LocalSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # natinstruct: {"input", "output": [label]} ; choices: {"text", "choices", "label"} ;
    # fields: any table, rendered with `input_template` / `label_field` of the task.
    format: Literal["natinstruct", "choices", "fields"] = "fields"
    path: str = Field(description="file path, relative to the data root unless absolute")


class HFSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    subset: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    # raw label values in the order of the task's choices (e.g. [0, 2, 1] or ["A", "B"]);
    # default: integer labels index the choices directly
    label_values: list[Any] | None = None


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    category: str | None = None
    # accuracy / acc_f1 / pearson_spearman (regression) / exact_match (free-text answers)
    metric: Literal["accuracy", "acc_f1", "pearson_spearman", "exact_match"] = "accuracy"
    answer_type: Literal["choice", "text", "score"] = "choice"
    f1_average: Literal["binary", "macro"] = "binary"
    positive_label: str | None = Field(default=None, description="positive class for binary F1")
    choices: list[str] | None = Field(default=None, description="fixed label set (classification)")
    # rendering of `fields` records (local tables and HF datasets)
    input_template: str | None = None
    label_field: str = "label"
    choice_fields: list[str] | None = None
    choices_field: str | None = None
    prompts: list[PromptTemplate] = Field(default_factory=list,
                                          description="prompt templates (PromptSource-style); see templates.py")
    local: LocalSource | None = None
    hf: HFSource | None = None

    @field_validator("prompts", mode="before")
    @classmethod
    def _coerce_prompts(cls, v: Any) -> Any:
        return coerce_templates(v)

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.local is None and self.hf is None:
            raise ValueError("a task needs a `local` file or an `hf` dataset id")
        if self.metric == "acc_f1" and self.f1_average == "binary" and not self.positive_label:
            raise ValueError("binary F1 needs `positive_label`")
        names = [t.name for t in self.prompts]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt template names must be unique, got {names}")
        for t in self.prompts:
            if t.answer_choices is not None and self.choices is not None and len(t.answer_choices) != len(self.choices):
                raise ValueError(f"prompt {t.name!r}: {len(t.answer_choices)} answer_choices for "
                                 f"{len(self.choices)} choices {self.choices}")
            if t.answer_choices is not None and self.choices is None:
                raise ValueError(f"prompt {t.name!r}: answer_choices need a fixed label set (`choices`)")
        return self

    @property
    def regression(self) -> bool:
        return self.answer_type == "score"


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    origin: str  # what was read: "local:<path>#<sha1>" or "hf:<id>/<subset>"
    train: tuple[Example, ...]
    eval: tuple[Example, ...]


class TaskRegistry:
    """Named task specs; later files override earlier ones."""

    def __init__(self, specs: dict[str, TaskSpec], data_root: Path, explicit_root: bool = False):
        self.specs = specs
        self.data_root = data_root
        # a data root the user named must hold the local files: no silent fallback to the hub
        self.explicit_root = explicit_root

    @classmethod
    def load(cls, extra_files: Sequence[str | os.PathLike] = (), data_root: str | os.PathLike | None = None) -> TaskRegistry:
        specs: dict[str, TaskSpec] = {}
        for f in [REGISTRY_FILE, *map(Path, extra_files)]:
            specs.update(_read_spec_file(Path(f)))
        named = data_root or os.environ.get("TRANSFERLAB_DATA")
        return cls(specs, Path(named or DEFAULT_DATA_ROOT), explicit_root=bool(named))

    @property
    def names(self) -> list[str]:
        return sorted(self.specs)

    def get(self, name: str) -> TaskSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(self.names)}") from None

    def local_path(self, spec: TaskSpec) -> Path | None:
        if spec.local is None:
            return None
        p = Path(spec.local.path)
        return p if p.is_absolute() else self.data_root / p

    def origin(self, name: str) -> str:
        """Identity of the data a task would load (part of every run key); cheap, cached per file."""
        spec = self.get(name)
        path = self.local_path(spec)
        if path is not None and path.is_file():
            return f"local:{path.name}#{_file_digest(str(path), path.stat().st_mtime_ns)}"
        if spec.hf is not None and not (path is not None and self.explicit_root):
            return f"hf:{spec.hf.id}/{spec.hf.subset or ''}"
        raise TaskError(f"task {name!r}: data file {path} not found (set data_root or TRANSFERLAB_DATA)")

    def load_data(self, name: str, n_train: int | None, n_eval: int | None, seed: int,
                  eval_fraction: float = 0.2, split_seed: int = 0) -> TaskData:
        """Deterministic split: eval pool fixed by `split_seed`, training sample drawn with `seed`."""
        spec = self.get(name)
        origin = self.origin(name)
        if origin.startswith("local:"):
            path = self.local_path(spec)
            assert path is not None
            examples = _read_local(spec, path)
            order = list(range(len(examples)))
            random.Random(split_seed).shuffle(order)
            n_ev = max(1, int(round(len(examples) * eval_fraction)))
            eval_pool = [examples[i] for i in order[:n_ev]]
            train_pool = [examples[i] for i in order[n_ev:]]
        else:
            train_pool, eval_pool = _read_hf(spec)
        if not train_pool or not eval_pool:
            raise TaskError(f"task {name!r}: no examples to train or evaluate on ({origin})")
        train = _sample(train_pool, n_train, seed)
        ev = eval_pool[:n_eval] if n_eval else eval_pool
        return TaskData(spec, origin, tuple(train), tuple(ev))


def _sample(pool: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(pool):
        out = list(pool)
        random.Random(seed).shuffle(out)
        return out
    return random.Random(seed).sample(pool, n)


@lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _read_spec_file(path: Path) -> dict[str, TaskSpec]:
    if not path.is_file():
        raise TaskError(f"{path}: task registry file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: malformed YAML: {e}") from None
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(tasks, dict):
        raise TaskError(f"{path}: expected a top-level `tasks:` mapping of name -> spec")
    specs = {}
    for name, body in tasks.items():
        try:
            specs[name] = TaskSpec.model_validate({"name": name, **(body or {})})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise TaskError(f"{path}: task {name!r} field `{loc}`: {err['msg']}") from None
    return specs


def _field(rec: dict[str, Any], dotted: str) -> Any:
    cur: Any = rec
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def _render(spec: TaskSpec, rec: dict[str, Any], where: str, label_values: list[Any] | None = None) -> Example:
    try:
        text = spec.input_template.format(**rec) if spec.input_template else str(rec["input"])
        if spec.choice_fields:
            choices = tuple(str(_field(rec, f)) for f in spec.choice_fields)
        elif spec.choices_field:
            choices = tuple(str(c) for c in _field(rec, spec.choices_field))
        else:
            choices = tuple(spec.choices or ())
        raw = _field(rec, spec.label_field)
    except KeyError as e:
        raise TaskError(f"{where}: task {spec.name!r}: record has no field {e}") from None
    if spec.answer_type == "text":
        ans = raw[0] if isinstance(raw, list) and raw else raw
        if isinstance(ans, dict):  # squad-style {"text": [...]}
            texts = ans.get("text") or [""]
            ans = texts[0]
        return Example(text, choices, -1, answer=str(ans))
    if spec.answer_type == "score":
        return Example(text, (), -1, value=float(raw))
    if label_values is not None:
        if raw not in label_values:
            raise TaskError(f"{where}: task {spec.name!r}: label {raw!r} not among {label_values}")
        raw = label_values.index(raw)
    return Example(text, choices, _label_index(spec, choices, raw, where))


def _label_index(spec: TaskSpec, choices: tuple[str, ...], raw: Any, where: str) -> int:
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if isinstance(raw, bool) or raw is None:
        raise TaskError(f"{where}: task {spec.name!r}: bad label {raw!r}")
    if isinstance(raw, int | float) and not isinstance(raw, bool) and not isinstance(raw, str):
        idx = int(raw)
        if 0 <= idx < len(choices):
            return idx
    elif str(raw) in choices:
        return choices.index(str(raw))
    raise TaskError(f"{where}: task {spec.name!r}: label {raw!r} not among choices {list(choices)}")


def _read_local(spec: TaskSpec, path: Path) -> list[Example]:
    assert spec.local is not None
    fmt = spec.local.format
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}:{i}: malformed JSON line: {e.msg}") from None
    elif suffix in (".csv", ".parquet"):
        import pandas as pd  # lazy: duckdb only when a store is opened

        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        records = [(f"{path}:{i + 2}", r) for i, r in enumerate(df.to_dict("records"))]
    else:
        raise TaskError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv or .parquet)")
    out = []
    for where, rec in records:
        if fmt == "natinstruct":
            if spec.answer_type == "text":
                ex = Example(str(rec["input"]), (), -1, answer=str((rec.get("output") or [""])[0]))
            else:
                ex = Example(str(rec["input"]), tuple(spec.choices or ()),
                             _label_index(spec, tuple(spec.choices or ()), rec.get("output"), where))
        elif fmt == "choices":
            choices = tuple(str(c) for c in rec["choices"])
            ex = Example(str(rec["text"]), choices, _label_index(spec, choices, rec["label"], where))
        else:
            ex = _render(spec, rec, where)
        rid = rec.get("id") if isinstance(rec, dict) else None
        out.append(dataclasses.replace(ex, uid=str(rid) if rid not in (None, "") and not _isnan(rid)
                                       else f"{path.name}:{where.rsplit(':', 1)[1]}"))
    return out


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v


def _read_hf(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    assert spec.hf is not None
    try:
        import datasets  # lazy: optional dependency (datasets)
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise TaskError(f"task {spec.name!r}: the `datasets` package is needed for {spec.hf.id}") from e
    pools = []
    for split in (spec.hf.train_split, spec.hf.eval_split):
        try:
            ds = datasets.load_dataset(spec.hf.id, spec.hf.subset, split=split)
        except Exception as e:  # hub unreachable, unknown id, ...
            raise TaskError(f"task {spec.name!r}: cannot load HF dataset {spec.hf.id}"
                            f"{'/' + spec.hf.subset if spec.hf.subset else ''} split {split}: {e}") from None
        pools.append([dataclasses.replace(_render(spec, dict(r), f"{spec.hf.id}[{split}][{i}]", spec.hf.label_values),
                                          uid=f"{split}:{i}")
                      for i, r in enumerate(ds)
                      if not (isinstance(r.get(spec.label_field), int) and r.get(spec.label_field) < 0)])
    return pools[0], pools[1]
