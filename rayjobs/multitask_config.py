"""Multi-task sweep configs (paper 000, sections 4.2 and 5.2-5.3): YAML validated into typed objects.

A sweep trains, per target, one model on a multi-task set of n prompted examples from each chosen
source and evaluates the target zero-shot. The config names the targets, the candidate source pool,
the selection store and selector used for choosing sources, and the *choices* of source sets:

  top / bottom / random   the selector's k best, k worst, or k random (seeded; drawn from the
                          candidates in name order, so independent of the scores) candidates
                          (k = 1, 3, 5, 10 or `all`); `selector: oracle` ranks by the stored
                          transfers themselves (the paper's TaskWeb rows)
  all                     every pool task but the target (the paper's "T5-3B + all tasks")
  most_similar            the hand-picked task of `most_similar[target]`, with n * most_similar_k
                          examples so the training set is as large as a top-k set
  mix                     top-k, then the top-k replaced one at a time by the bottom-k
                          (0..k replaced; the paper's Figure 4)

Model, adaptation, hyperparameters, sizes and Ray settings reuse the pairwise job's types.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rayjobs.config import JobConfig, SetupSpec, SizeSpec, _Strict, load_typed, require_unique
from rayjobs.tasks.templates import PromptTemplate

ChoiceKind = Literal["top", "bottom", "random", "all", "most_similar", "mix"]
RANKED_KINDS = ("top", "bottom", "random", "mix")
K = int | Literal["all"]


class SelectionSpec(_Strict):
    """Where source rankings come from: a DuckDB store with selector scores and/or transfers."""

    store: str | None = Field(default=None, description="DuckDB file; default: the results database")
    selector: str = Field(default="taskshop-roe", description="default selector of top/bottom/random/mix")
    setup: str | None = Field(default=None, description="transfer setup for taskshop-* and oracle")
    lam: float | None = Field(default=None, alias="lambda", ge=0, le=1, description="TaskShop lambda (default 0.7)")


class ChoiceSpec(_Strict):
    """One way of choosing source sets; expands to one set per (target, k)."""

    kind: ChoiceKind
    k: list[K] | None = Field(default=None, description="set sizes (top/bottom/random: default [5]; mix: one k)")
    selector: str | None = Field(default=None, description="default: selection.selector; 'oracle' = transfers")
    setup: str | None = Field(default=None, description="default: selection.setup; when given, the selection "
                                                        "name carries it: top-5:oracle[finetune:t5b]")
    seed: int = Field(default=0, description="random: seed of the drawn set")
    targets: list[str] | None = Field(default=None, description="only these targets (default: all)")

    @field_validator("k", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, int | str) else v

    @model_validator(mode="after")
    def _check(self) -> ChoiceSpec:
        used = self.model_fields_set
        if self.kind in ("all", "most_similar"):
            extra = sorted(used & {"k", "selector", "setup", "seed"})
            if extra:
                raise ValueError(f"kind {self.kind!r} takes no {', '.join(extra)}")
            return self
        if self.kind != "random" and "seed" in used:
            raise ValueError(f"`seed` is only for kind 'random', not {self.kind!r}")
        ks = self.k if self.k is not None else [5]
        if not ks:
            raise ValueError("`k` needs at least one value")
        for k in ks:
            if isinstance(k, int) and k < 1:
                raise ValueError(f"k must be at least 1 or 'all', got {k}")
        require_unique(ks, "k values")
        if self.kind == "mix" and (len(ks) != 1 or ks[0] == "all"):
            raise ValueError("kind 'mix' takes one integer k (top-k replaced one by one by the bottom-k)")
        if self.kind == "random" and "all" in ks:
            raise ValueError("kind 'random' with k 'all' is the kind 'all'")
        return self

    @property
    def ks(self) -> list[K]:
        return list(self.k) if self.k is not None else [5]


class MultitaskConfig(JobConfig):
    job: Literal["multitask"] = "multitask"
    targets: list[str] = Field(min_length=1, description="evaluated zero-shot; never trained on")
    pool: list[str] | None = Field(default=None, description="candidate sources; default: tasks with a local file")
    n_per_source: int = Field(default=2000, gt=0, description="prompted examples sampled from each source")
    most_similar: dict[str, str] = Field(default_factory=dict, description="target -> hand-picked source")
    most_similar_k: int = Field(default=5, gt=0, description="most_similar trains on n_per_source * this")
    selection: SelectionSpec = SelectionSpec()
    choices: list[ChoiceSpec] = Field(min_length=1)
    eval_templates: list[PromptTemplate] = Field(
        default_factory=list, description="extra prompt templates (strings over {input}) for every target")
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    setups: list[SetupSpec] = Field(min_length=1)

    input_paths: ClassVar[tuple[str, ...]] = ("data_root", "task_files", "selection.store")

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        return require_unique(v, "values")

    @field_validator("eval_templates", mode="before")
    @classmethod
    def _templates(cls, v: Any) -> Any:
        if isinstance(v, list):  # plain strings are templates named extra0, extra1, ...
            return [{"name": f"extra{i}", "input": t} if isinstance(t, str) else t for i, t in enumerate(v)]
        return v

    @field_validator("eval_templates")
    @classmethod
    def _unique_templates(cls, v: list[PromptTemplate]) -> list[PromptTemplate]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"template names must be unique, got {names}")
        return v

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: SizeSpec) -> SizeSpec:
        stray = sorted(v.model_fields_set & {"source_train", "target_train"})
        if stray:
            raise ValueError(f"{', '.join(stray)} do not apply to a multi-task sweep (use n_per_source)")
        return v


def load_multitask_config(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None
                          ) -> MultitaskConfig:
    """Load and validate a multi-task sweep config; errors name the file and the field."""
    return load_typed(path, MultitaskConfig, overrides)
