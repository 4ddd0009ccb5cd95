"""Experiment configs: YAML validated into typed objects.

One config describes what to train (tasks, setups = model x adaptation, seeds, sample sizes),
how (per-setup hyperparameters, Ray resources) and where results go. Everything that changes a
result is part of the run key (see `runkey.py`); resources and locations are not.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from analysis.budget.config import BudgetConfig
from rayjobs.search_space import Space, check_space_values, split_spaces

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A model: an HF hub id, a local folder, `builtin:minilm`, or a tiny model built from `config`."""

    name: str = Field(description="short name used in results (e.g. minilm, t5l)")
    path: str | None = Field(default=None, description="hub id, local folder or builtin:minilm")
    family: Literal["encoder", "seq2seq", "causal"] = "encoder"
    # A tiny random-weight model: transformers config kwargs (must include model_type).
    config: dict[str, Any] | None = None
    tokenizer: str | None = Field(default=None, description="tokenizer path if not the model's own")
    max_length: int = Field(default=128, gt=0)
    head: Literal["auto", "classification", "multiple_choice"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # text-to-text families (seq2seq, causal): answers are scored or generated as text
    choice_scoring: Literal["sum", "mean"] = Field(
        default="sum", description="rank classification by the summed (T0) or length-normalised log-likelihood")
    max_target_length: int = Field(default=32, gt=0, description="answer tokens trained on / generated")

    @model_validator(mode="after")
    def _path_or_config(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (hub id / folder / builtin:minilm) or `config`")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` of a tiny model needs `model_type` (e.g. bert, t5, gpt2)")
        return self


class AdaptationSpec(_Strict):
    """How the pretrained weights are adapted; `params` are method-specific (e.g. LoRA rank)."""

    method: Literal["full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"] = "full"
    params: dict[str, Any] = Field(default_factory=dict)


class ValidationSpec(_Strict):
    """Examples held out of a trial's training sample for periodic evaluation (`TrainSpec.eval_every`).

    They come from the training pool, never from the evaluation pool, so picking the best step does not
    look at the data the run is scored on. `n` and `fraction` cap the count together (the smaller one);
    the split is seeded by the trial's seed, so a transfer and its baseline validate on the same examples.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    n: int | None = Field(default=None, gt=0, description="at most this many examples")
    fraction: float | None = Field(default=None, gt=0, lt=1, description="at most this share of the sample")
    from_: Literal["train"] = Field(default="train", alias="from", description="the pool held out from")

    @model_validator(mode="after")
    def _some_size(self) -> ValidationSpec:
        if self.n is None and self.fraction is None:
            raise ValueError("give `n` (examples) and/or `fraction` (of the training sample)")
        return self

    def size(self, pool: int) -> int:
        caps = [c for c in (self.n, None if self.fraction is None else max(1, round(self.fraction * pool)))
                if c is not None]
        return min(caps)


class TrainSpec(_Strict):
    epochs: float = Field(default=3, gt=0)
    learning_rate: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=16, gt=0)
    eval_batch_size: int = Field(default=64, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_accum_steps: int = Field(default=1, gt=0)
    max_grad_norm: float | None = 1.0
    max_steps: int | None = Field(default=None, gt=0, description="caps the number of optimiser steps")
    gradient_checkpointing: bool = False
    # added after run-key version 2: in a run key only when not the default (plan.identity_dump)
    optimizer: Literal["adamw", "adafactor"] = Field(
        default="adamw", description="adafactor: fixed lr, no relative step / parameter scaling (Lester et al.)")
    eval_every: int | None = Field(
        default=None, gt=0, description="evaluate on `validation` every N optimiser steps; keep the best state")
    validation: ValidationSpec | None = Field(default=None, description="held-out part of the training sample")

    @model_validator(mode="after")
    def _eval_needs_validation(self) -> TrainSpec:
        if (self.eval_every is None) != (self.validation is None):
            raise ValueError("`eval_every` and `validation` go together: evaluate every N steps on examples "
                             "held out of the training sample (validation: {n: 500, from: train})")
        return self


class DeepSpeedSpec(_Strict):
    """DeepSpeed ZeRO for a trial run as a multi-worker Ray Train job."""

    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed JSON config")


class ResourceSpec(_Strict):
    """Ray resources of one trial; with workers > 1 (or deepspeed) they are per worker."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    workers: int = Field(default=1, gt=0)
    memory_gb: float | None = Field(default=None, gt=0)


class PromptSpec(_Strict):
    """Which prompt templates (rayjobs/tasks/templates.py) render the tasks for training and for evaluation.

    `default`: the base rendering for encoders, the task's first template for seq2seq/causal models;
    `all`: train on a seeded template per example, evaluate as the mean over all templates;
    `first`, `input` (the base rendering) or a template name.
    """

    train: str = "default"
    eval: str = "default"


class SimulateSpec(_Strict):
    """A benchmark tool (rayjobs.engine.simulate, benchmarks/bench_scale.py): the setup's trials do not train but
    sleep and write realistic rows, predictions and checkpoints. Part of the run key, so simulated runs
    never pass for trained ones."""

    sleep_s: float = Field(default=0.1, ge=0, description="seconds each trial sleeps (stands in for training)")
    examples: int = Field(default=1000, gt=0, description="prediction rows per evaluation")
    choices: int = Field(default=2, ge=2, description="answer choices per example")
    checkpoint_bytes: int = Field(default=4096, ge=0, description="size of a stored checkpoint")


class SetupSpec(_Strict):
    """One training setup: a model with an adaptation method and its hyperparameters."""

    name: str | None = None
    model: ModelSpec
    adaptation: AdaptationSpec = AdaptationSpec()
    train: TrainSpec = TrainSpec()
    source_train: TrainSpec | None = Field(default=None, description="hyperparameters of the source stage")
    resources: ResourceSpec = ResourceSpec()
    deepspeed: DeepSpeedSpec | None = None
    prompts: PromptSpec = PromptSpec()
    simulate: SimulateSpec | None = Field(default=None, description="benchmark tool: simulated trials")
    # search spaces (rayjobs.search_space), written inline in `train` / `source_train` and moved here when
    # the config is read; `train` then holds each space's first value
    train_space: dict[str, Space] = Field(default_factory=dict, description="spaces of `train`'s fields")
    source_train_space: dict[str, Space] = Field(default_factory=dict,
                                                 description="spaces of `source_train`'s fields")

    @model_validator(mode="before")
    @classmethod
    def _spaces(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for stage in ("train", "source_train"):
            plain, spaces = split_spaces(stage, data.get(stage))
            if spaces:
                data[stage] = plain
                data[f"{stage}_space"] = {**spaces, **dict(data.get(f"{stage}_space") or {})}
        return data

    @model_validator(mode="after")
    def _check_spaces(self) -> SetupSpec:
        if self.source_train_space and self.source_train is None:
            raise ValueError("`source_train_space` without `source_train`")
        for stage, hp, spaces in (("train", self.train, self.train_space),
                                  ("source_train", self.source_train, self.source_train_space)):
            if not spaces or hp is None:
                continue
            check_space_values(stage, hp, spaces)
            if hp.validation is None:
                raise ValueError(f"{stage} has search spaces ({', '.join(spaces)}) but no validation: the best "
                                 "configuration is chosen on validation data only (never the eval split); give "
                                 f"{stage} `eval_every` and `validation` (e.g. validation: {{n: 100}})")
        return self

    @property
    def key(self) -> str:
        return self.name or f"{self.adaptation.method}:{self.model.name}"

    @property
    def source_hparams(self) -> TrainSpec:
        return self.source_train or self.train

    @property
    def source_space(self) -> dict[str, Space]:
        """The spaces of the source stage: `source_train`'s, or `train`'s when the stages share hyperparameters."""
        return self.source_train_space if self.source_train is not None else self.train_space

    @property
    def searched(self) -> bool:
        return bool(self.train_space or self.source_space)


class TaskSelection(_Strict):
    sources: list[str] = Field(min_length=1)
    targets: list[str] | None = Field(default=None, description="defaults to the sources")
    exclude_self: bool = True

    @property
    def target_list(self) -> list[str]:
        return list(self.targets) if self.targets is not None else list(self.sources)


class SizeSpec(_Strict):
    """Examples per stage; None means the whole training pool."""

    source_train: int | None = Field(default=None, gt=0)
    target_train: int | None = Field(default=1000, gt=0, description="TaskWeb fine-tunes on 1,000 target examples")
    eval: int | None = Field(default=1000, gt=0)
    eval_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of a local file held out for eval")
    split_seed: int = 0


class AshaSpec(_Strict):
    """Tune's ASHA scheduler over the periodic validation results (`train.eval_every`)."""

    metric: str = "validation_score"
    mode: Literal["max", "min"] = "max"
    time_attr: str = Field(default="step", description="what grace_period and max_t count: optimiser steps")
    grace_period: int = Field(default=1, gt=0)
    reduction_factor: float = Field(default=4, gt=1)
    max_t: int = Field(default=10**9, gt=0)


class MedianStoppingSpec(_Strict):
    """Tune's median stopping rule over the periodic validation results."""

    metric: str = "validation_score"
    mode: Literal["max", "min"] = "max"
    time_attr: str = "step"
    grace_period: float = Field(default=0, ge=0)
    min_samples_required: int = Field(default=3, gt=0)


class SchedulerSpec(_Strict):
    """Early stopping: one of `asha` or `median`. A stopped trial is stored with status 'stopped'."""

    asha: AshaSpec | None = None
    median: MedianStoppingSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> SchedulerSpec:
        if (self.asha is None) == (self.median is None):
            raise ValueError("give exactly one of `asha` or `median`")
        return self


class SearchSpec(_Strict):
    """How a setup's search spaces become configurations (rayjobs.search_space), when the plan is made."""

    algorithm: str = Field(
        default="basic", description="Tune's basic variant generator: grids crossed, other spaces sampled")
    seed: int = Field(default=0, description="seeds the sampling: the same seed gives the same run keys")

    @field_validator("algorithm")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "basic":
            raise ValueError(f"unknown search algorithm {v!r}: only `basic` (Tune's variant generator) is offered; "
                             "adaptive ones (optuna, hyperopt) choose configurations from results, so their runs "
                             "could not be keyed and resumed before they run")
        return v


class RunSpec(_Strict):
    """How the job runs (on Ray Tune); none of this changes a result (`num_samples` and `search` change
    which configurations run, not what a run with given hyperparameters computes)."""

    ray_address: str | None = Field(default=None, description="None: $RAY_ADDRESS or an embedded local Ray")
    max_concurrent_trials: int | None = Field(default=None, gt=0)
    max_failures: int = Field(default=0, ge=0, description="retries of a failed trial (Tune's FailureConfig)")
    verbose: int = Field(default=1, ge=0, le=3)
    scheduler: SchedulerSpec | None = Field(default=None, description="early stopping (Tune trial scheduler)")
    callbacks: list[Literal["csv", "json", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["json", "csv"],
        description="Tune logger callbacks; mlflow logs to a local file store, wandb offline, by default")
    num_samples: int = Field(default=1, gt=0, description="samples of a setup's non-grid search spaces per grid point")
    search: SearchSpec = SearchSpec()


TASKWEB_SEEDS = [10, 15, 20, 25, 30, 35, 40, 42]


class JobConfig(_Strict):
    """The fields every job kind shares; `job` names the kind (`transferlab run` dispatches on it).

    Input paths (`data_root`, `task_files`, and a kind's own input files) are relative to the config
    file; `results_dir` is an output and relative to where the command runs.
    """

    job: str = "pairwise"
    name: str
    results_dir: str = "results"
    data_root: str | None = Field(default=None, description="folder with tasks/natinstruct; default ../shared/data")
    task_files: list[str] = Field(default_factory=list, description="extra task registry YAML files")
    seeds: list[int] = Field(default_factory=lambda: list(TASKWEB_SEEDS), min_length=1)
    sizes: SizeSpec = SizeSpec()
    setups: list[SetupSpec] = Field(default_factory=list, description="model x adaptation (training jobs)")
    run: RunSpec = RunSpec()
    # the file it came from, so later (semantic) errors name it like validation errors do
    _source: str = PrivateAttr(default="config")

    #: dotted fields holding input paths, resolved against the config file's folder
    input_paths: ClassVar[tuple[str, ...]] = ("data_root", "task_files")
    #: whether the kind expands search spaces of its setups (rayjobs.search_space)
    searches: ClassVar[bool] = False

    @property
    def source_file(self) -> str:
        return self._source

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        return require_unique(v, "seeds")

    @model_validator(mode="after")
    def _unique_setups(self) -> JobConfig:
        unique_setup_keys(self.setups)
        searched = [s.key for s in self.setups if s.searched]
        if searched and not self.searches:
            raise ValueError(f"setups {searched} have search spaces ({{grid: ...}} etc.), which only `job: pairwise` "
                             f"expands; a `job: {self.job}` setup takes plain values")
        return self


class SeedLists(_Strict):
    """Separate seeds of the two stages (Lin et al.: sources 42/150/386, transfers 112/28/52).

    Each source is trained once per `source` seed and each target-only baseline once per `target` seed;
    a transfer starts from a source run and trains with a target seed, and is paired with the baseline
    of that target seed. `cross`: every source seed with every target seed; `zip`: the i-th source
    seed with the i-th target seed (lists of equal length; 3 transfers per pair as in Lin et al.'s counts).
    """

    source: list[int] = Field(min_length=1)
    target: list[int] = Field(min_length=1)
    pairing: Literal["cross", "zip"] = "cross"

    @model_validator(mode="after")
    def _check(self) -> SeedLists:
        for name in ("source", "target"):
            require_unique(getattr(self, name), f"seeds.{name}")
        if self.pairing == "zip" and len(self.source) != len(self.target):
            raise ValueError(f"seeds.pairing zip needs as many source as target seeds "
                             f"({len(self.source)} vs {len(self.target)})")
        return self

    def pairs(self) -> list[tuple[int, int]]:
        """(source seed, target seed) of every transfer of one (source, target) pair."""
        if self.pairing == "zip":
            return list(zip(self.source, self.target, strict=True))
        return [(s, t) for s in self.source for t in self.target]


def _seeds_form(v: Any) -> str:
    return "stages" if isinstance(v, dict | SeedLists) else "list"


#: `seeds:` of a pairwise config: one list for every stage, or separate source / target lists
PairwiseSeeds = Annotated[Annotated[list[int], Field(min_length=1), Tag("list")] | Annotated[SeedLists, Tag("stages")],
                          Discriminator(_seeds_form)]


class PairwiseConfig(JobConfig):
    """A pairwise (intermediate-task) transfer grid.

    `seeds: [..]` trains a source, a baseline and a transfer with the same seed; `seeds: {source: [..],
    target: [..]}` (SeedLists) gives the stages separate seeds.
    """

    searches: ClassVar[bool] = True
    job: Literal["pairwise"] = "pairwise"
    tasks: TaskSelection
    setups: list[SetupSpec] = Field(min_length=1)
    seeds: PairwiseSeeds = Field(default_factory=lambda: list(TASKWEB_SEEDS))  # type: ignore[assignment]
    save_target_checkpoints: bool = Field(
        default=False, description="also keep the target-only baselines' trained parameters (the target's own "
        "soft prompt for prompt-similarity selectors); a baseline stored without one is not retrained")
    budget: BudgetConfig | None = Field(
        default=None, description="train only what a budget policy proposes (rayjobs.engine.budget); default: the full grid")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int] | SeedLists) -> list[int] | SeedLists:
        return require_unique(v, "seeds") if isinstance(v, list) else v

    @model_validator(mode="after")
    def _budget_without_spaces(self) -> PairwiseConfig:
        if self.budget is not None and any(s.searched for s in self.setups):
            raise ValueError("`budget` and search spaces do not combine: a budget policy proposes single runs, "
                             "not searches over configurations")
        return self

    @property
    def source_seeds(self) -> list[int]:
        return list(self.seeds.source) if isinstance(self.seeds, SeedLists) else list(self.seeds)

    @property
    def target_seeds(self) -> list[int]:
        return list(self.seeds.target) if isinstance(self.seeds, SeedLists) else list(self.seeds)

    def seed_pairs(self) -> list[tuple[int, int]]:
        """(source seed, target seed) of the transfers: the same seed twice for a plain list."""
        return self.seeds.pairs() if isinstance(self.seeds, SeedLists) else [(s, s) for s in self.seeds]


def require_unique(values: list[Any], what: str) -> list[Any]:
    """A validator's check: `values` unchanged when none repeats, else the error "<what> must be unique"."""
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must be unique")
    return values


def unique_setup_keys(setups: list[SetupSpec]) -> None:
    """Setup keys name results (runs.setup): two setups with one key would mix their runs."""
    keys = [s.key for s in setups]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(f"setup names must be unique, repeated: {sorted(dup)} (give each a `name`)")


def _format_validation_error(path: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{path}: field `{loc}`: {msg}")
    return "\n".join(lines)


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; anything near this is not a config
MAX_CONFIG_NODES = 200_000  # YAML nodes after aliases are expanded (an alias bomb grows past any bound)


def _expanded_nodes(node: yaml.Node, where: str) -> int:
    """Nodes of the document once every alias is expanded, counted over the composed graph (aliases share
    nodes, so this is cheap), stopping at the bound; a recursive alias is refused."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (recursive anchor)")
        active.add(id(n))
        children = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else
                    n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1
        for c in children:
            total += size(c)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(f"{where}: the config expands to more than {MAX_CONFIG_NODES} YAML nodes "
                                  "(aliases of aliases: a YAML alias bomb?); write the values out")
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes; a config file may hold at most {MAX_CONFIG_BYTES}")
    loader = yaml.SafeLoader(p.read_text())
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_nodes(node, str(p))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise ConfigError(f"{p}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{p}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None, where: str) -> dict[str, Any]:
    """`key=value` overrides (dotted keys, list indices as numbers, values parsed as YAML) on raw config data."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o, where) for o in overrides]
    data = copy.deepcopy(data)
    for key, value in items:
        parts = key.split(".")
        cur: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(cur, list):
                if not part.isdigit() or int(part) >= len(cur):
                    raise ConfigError(f"{where}: override `{key}`: no list item {part!r}")
                cur = cur[int(part)]
            else:
                if cur.get(part) is None:
                    cur[part] = [] if nxt.isdigit() else {}
                cur = cur[part]
        last = parts[-1]
        if isinstance(cur, list):
            if not last.isdigit() or int(last) >= len(cur):
                raise ConfigError(f"{where}: override `{key}`: no list item {last!r}")
            cur[int(last)] = value
        elif isinstance(cur, dict):
            cur[last] = value
        else:
            raise ConfigError(f"{where}: override `{key}`: {'.'.join(parts[:-1])} is not a mapping")
    return data


def _split_override(text: str, where: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{where}: override {text!r} is not KEY=VALUE (e.g. seeds=[1,2] or setups.0.train.epochs=1)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_inputs(data: dict[str, Any], fields: tuple[str, ...], base: Path) -> dict[str, Any]:
    """Make the relative input paths named by dotted `fields` absolute, relative to `base`."""
    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            return str((base / v).resolve())
        if isinstance(v, str):
            return str(Path(v).expanduser())
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    data = dict(data)
    for dotted in fields:
        head, _, rest = dotted.partition(".")
        if head not in data or data[head] is None:
            continue
        if rest:
            if isinstance(data[head], dict):
                data[head] = resolve_inputs(data[head], (rest,), base)
        else:
            data[head] = fix(data[head])
    return data


def load_typed(path: str | os.PathLike, cls: type[M], overrides: list[str] | dict[str, Any] | None = None,
               data: dict[str, Any] | None = None) -> M:
    """Load a YAML file and validate it into `cls`; errors name the file and the field. Input paths of
    a `JobConfig` are resolved against the file's folder."""
    data = apply_overrides(load_yaml(path) if data is None else data, overrides, str(path))
    if issubclass(cls, JobConfig):
        data = resolve_inputs(data, cls.input_paths, Path(path).resolve().parent)
    try:
        cfg = cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(str(path), e)) from None
    if isinstance(cfg, JobConfig):
        cfg._source = str(path)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None) -> PairwiseConfig:
    """Load and validate a pairwise experiment config."""
    return load_typed(path, PairwiseConfig, overrides)
