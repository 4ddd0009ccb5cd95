"""What a job kind is, and the registry `transferlab run` dispatches on.

A job kind is one module under `rayjobs/` that defines a typed config (a `JobConfig` subclass whose
`job` field names the kind), `plan` (the config expanded into trials with run keys, after every check
that can fail before Ray starts), and `report` (the lines printed after the run). The driver
(`rayjobs/engine/driver.py`) does the rest for every kind: flags, overrides, smoke shrinking, skipping stored
run keys, running trials on Ray as their dependencies are stored, ingest, and the closing lines.

Adding a kind: write the module (its config, `plan`, the executors its trials name, `smoke`, `report`),
subclass `Job` (`class MyJob(Job, kind="my", config=MyConfig)`; its `--help` text is the module's
docstring), end it with `JOB = MyJob()` and `main = module_entry(JOB.kind, __name__)` (rayjobs.engine.driver), and add one line to `JOB_MODULES`: the one table of kinds.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rayjobs.config import ConfigError, JobConfig, load_typed, load_yaml
from rayjobs.tasks.registry import TaskError

if TYPE_CHECKING:
    from analysis.store.results import ResultStore
    from rayjobs.plan import TrialSpec

#: job kind -> module defining it (imported on first use, so `--help` stays fast)
JOB_MODULES: dict[str, str] = {
    "pairwise": "rayjobs.pairwise",
    "multitask": "rayjobs.multitask",
    "score": "rayjobs.score",
    "pvi": "rayjobs.pvi",
    "mtl": "rayjobs.mtl",
    "fewshot": "rayjobs.fewshot",
    "embed": "rayjobs.embed",
}


def task_spec(registry: Any, task: str, where: str, field: str = "tasks") -> Any:
    """A task a config names, known to the registry with its data; errors name the file and the field."""
    try:
        spec = registry.get(task)
        registry.origin(task)
    except TaskError as e:
        raise ConfigError(f"{where}: field `{field}`: {e}") from None
    return spec


def check_choice_tasks(where: str, tasks: list[str], registry: Any, why: str) -> dict[str, Any]:
    """Every task of a config is known and answers with a choice among answers (`why`: what needs the
    choices); returns their specs."""
    specs = {}
    for t in tasks:
        spec = task_spec(registry, t, where)
        if spec.answer_type != "choice":
            raise ConfigError(f"{where}: field `tasks`: task {t!r} has {spec.answer_type} answers; {why}")
        specs[t] = spec
    return specs


@dataclass
class Plan:
    """A job's trials (in any order: the runner follows `TrialSpec.depends_on`) and what to say about them."""

    trials: list[TrialSpec]
    summary: str = ""  # e.g. "12 runs" or "40 (choice, target) cells -> 12 distinct runs"
    view: str = "runs"  # the SQL view the closing lines point at
    before_run: list[Callable[[ResultStore], None]] = field(default_factory=list)  # e.g. record selections
    gate: Any = None  # what the searcher may release (rayjobs.engine.budget.BudgetGate); None: every trial


class Job(ABC):
    """One job kind."""

    kind: ClassVar[str]
    config_cls: ClassVar[type[JobConfig]]
    description: ClassVar[str] = ""

    def __init_subclass__(cls, kind: str | None = None, config: type[JobConfig] | None = None,
                          **kwargs: Any) -> None:
        """`class PviJob(Job, kind="pvi", config=PviConfig)`; `description` defaults to the module's docstring."""
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
        if config is not None:
            cls.config_cls = config
        if "description" not in cls.__dict__:
            cls.description = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""

    @abstractmethod
    def plan(self, cfg: Any, store: ResultStore) -> Plan:
        """Validate everything that can be validated before Ray starts; expand into trials."""

    def smoke(self, cfg: Any) -> Any:
        """`--smoke`: the config shrunk to run end to end on a laptop CPU, by the kind module's `smoke(cfg)`."""
        shrink = getattr(sys.modules[type(self).__module__], "smoke", None)
        if shrink is None:
            raise ConfigError(f"job kind {self.kind!r} has no --smoke variant (define `smoke(cfg)` in its module)")
        return shrink(cfg)

    def report(self, cfg: Any, store: ResultStore) -> list[str]:
        """Lines printed after the run (a matrix, a table); nothing by default."""
        return []


def job_kinds() -> list[str]:
    return sorted(JOB_MODULES)


def get_job(kind: str, where: str = "config") -> Job:
    if kind not in JOB_MODULES:
        raise ConfigError(f"{where}: field `job`: unknown job kind {kind!r} (known: {', '.join(job_kinds())})")
    module = importlib.import_module(JOB_MODULES[kind])
    return module.JOB


def load_job_config(path: str, overrides: list[str] | None = None, default_kind: str = "pairwise"
                    ) -> tuple[Job, JobConfig]:
    """The job a config names (`job:`, else `default_kind`) and the config validated as that kind."""
    data = load_yaml(path)
    kind = data.get("job", default_kind)
    for o in overrides or []:
        if o.partition("=")[0].strip() == "job":
            kind = o.partition("=")[2].strip()
    if not isinstance(kind, str):
        raise ConfigError(f"{path}: field `job`: expected a job kind name ({', '.join(job_kinds())})")
    job = get_job(kind, str(path))
    try:
        cfg = load_typed(path, job.config_cls, overrides, data=data)
    except ConfigError as e:
        hint = _kind_hint(data, kind)
        raise ConfigError(f"{e}{hint}") from None
    return job, cfg


def _kind_hint(data: dict[str, Any], kind: str) -> str:
    """A config of another kind without `job:` fails on that kind's fields: say which kind it looks like."""
    if "job" in data:
        return ""
    for other in job_kinds():
        if other == kind:
            continue
        own = set(get_job(other).config_cls.model_fields) - set(JobConfig.model_fields)
        if own and own & set(data) and not (set(data) - set(get_job(other).config_cls.model_fields)):
            return f"\n(this looks like a `job: {other}` config: add `job: {other}` at the top)"
    return ""
