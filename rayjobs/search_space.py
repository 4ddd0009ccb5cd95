"""Search spaces over a setup's hyperparameters, and the choice of the best configuration on validation.

A numeric field of a setup's `train` / `source_train` may be a space instead of a value:

    train: {learning_rate: {grid: [1e-3, 1e-4]}, weight_decay: {loguniform: [1e-4, 1e-1]}, ...}

`{grid: [...]}` is crossed with every other grid (a cartesian product); `{choice: [...]}`,
`{uniform: [lo, hi]}` and `{loguniform: [lo, hi]}` are drawn `run.num_samples` times per grid point.
Expansion happens when the plan is made, with Tune's basic variant generator (`run.search.algorithm:
basic`) seeded by `run.search.seed`, so the same config always yields the same configurations and run
keys (resume finds them). Every configuration is its own source / baseline run (its values are in the
run key through its hyperparameters). Why at plan time: the run key is a run's identity, so a
configuration must be known before it runs; an adaptive algorithm (TPE, Bayesian optimisation) chooses
from results and is not offered (see the README).

The best configuration of a (setup, task, seed) is the one with the highest `best_validation_score`
(the periodic validation of `train.eval_every` on examples held out of the *training* sample, never the
eval split); equal scores go to the first configuration. A transfer starts from its source's best
configuration and trains with its target's best hyperparameters (pairing with that baseline); it is
resolved when it starts (`resolve`), once every candidate is decided. The `tuned_runs` view lists
the choices.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from pydantic import BaseModel as TrainSpecLike

SpaceKind = Literal["grid", "choice", "uniform", "loguniform"]
KINDS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform")

#: TrainSpec fields a space may replace, with their number type. Not `eval_batch_size` (it is not part of
#: a run key: it changes no result), nor the non-numeric fields (optimizer, validation, ...).
SEARCHABLE: dict[str, type] = {
    "epochs": float, "learning_rate": float, "batch_size": int, "weight_decay": float, "warmup_ratio": float,
    "grad_accum_steps": int, "max_grad_norm": float, "max_steps": int, "eval_every": int,
}

#: significant digits a sampled float keeps: readable in labels and the same on every platform's libm
SAMPLE_DIGITS = 6


class Space(BaseModel):
    """One field's space: `grid` / `choice` values, or `uniform` / `loguniform` bounds [lo, hi]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SpaceKind
    values: list[float | int]

    @property
    def first(self) -> float | int:
        """The value the setup's plain `train` holds for this field (the first configuration's for a grid)."""
        return self.values[0]


class SearchPoint(BaseModel):
    """Where a source / baseline trial sits in its (setup, stage, task, seed) search: recorded in its row
    (`metrics.search`) for the `tuned_runs` view."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str  # the same for every configuration of one (setup, stage, task, seed)
    index: int  # position among the group's configurations (ties go to the lowest)
    n: int  # configurations planned in the group
    values: dict[str, float | int]  # the sampled values


def parse_space(where: str, field: str, raw: Any) -> Space:
    """`raw` (a mapping in a config) as a `Space` of `field`; errors name `where.field` and what is wrong."""
    name = f"{where}.{field}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"{name}: a search space is a mapping with one key ({', '.join(KINDS)}), got {raw!r}")
    (kind, vals), = raw.items()
    if kind not in KINDS:
        raise ValueError(f"{name}: unknown search space kind {kind!r} (known: {', '.join(KINDS)})")
    if field not in SEARCHABLE:
        raise ValueError(f"{name}: a search space is allowed on the numeric fields that enter a run key "
                         f"({', '.join(SEARCHABLE)}), not on `{field}`")
    num = SEARCHABLE[field]
    if not isinstance(vals, list) or not vals:
        raise ValueError(f"{name}: `{kind}` takes a non-empty list, got {vals!r}")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in vals):
        raise ValueError(f"{name}: `{kind}` values must be numbers, got {vals!r}")
    if num is int and any(isinstance(v, float) and not v.is_integer() for v in vals):
        raise ValueError(f"{name}: `{field}` is an integer field; `{kind}` values must be integers, got {vals!r}")
    vals = [num(v) for v in vals]
    if kind in ("grid", "choice"):
        if len(set(vals)) != len(vals):
            raise ValueError(f"{name}: `{kind}` values repeat: {vals!r}")
        return Space(kind=kind, values=vals)
    if len(vals) != 2:
        raise ValueError(f"{name}: `{kind}` takes [lo, hi], got {vals!r}")
    lo, hi = vals
    if not lo < hi:
        raise ValueError(f"{name}: `{kind}` needs lo < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{name}: `loguniform` needs 0 < lo, got lo = {lo}")
    return Space(kind=kind, values=vals)


def split_spaces(where: str, raw: Any) -> tuple[Any, dict[str, Space]]:
    """A raw `train` mapping without its spaces (each replaced by its first value, so the rest validates as
    a TrainSpec) and the spaces by field. Not a mapping: returned as it is (pydantic says what is wrong)."""
    if not isinstance(raw, dict):
        return raw, {}
    plain, spaces = dict(raw), {}
    for field, value in raw.items():
        if isinstance(value, dict) and field != "validation":
            spaces[field] = parse_space(where, field, value)
            plain[field] = spaces[field].first
    return plain, spaces


def check_space_values(where: str, base: TrainSpecLike, spaces: dict[str, Space]) -> None:
    """Every value a space can give (grid / choice values, the bounds of a range) is a valid value of its
    field, so no sampled configuration fails later."""
    for field, space in spaces.items():
        for v in space.values:
            try:
                type(base).model_validate({**base.model_dump(), field: v})
            except ValidationError as e:
                why = "; ".join(err["msg"] for err in e.errors())
                raise ValueError(f"{where}.{field}: value {v} of the `{space.kind}` space is invalid: {why}") from None


def _tune_domain(space: Space, num: type) -> Any:
    from ray import tune  # lazy: ray only on the cluster path

    lo, hi = space.values[0], space.values[-1]
    if space.kind == "grid":
        return tune.grid_search(list(space.values))
    if space.kind == "choice":
        return tune.choice(list(space.values))
    if num is int:  # an integer range: hi included
        return tune.randint(int(lo), int(hi) + 1) if space.kind == "uniform" else tune.lograndint(int(lo), int(hi) + 1)
    return tune.uniform(lo, hi) if space.kind == "uniform" else tune.loguniform(lo, hi)


def _round(v: Any) -> Any:
    if isinstance(v, float) and v != 0 and math.isfinite(v):
        return float(f"{v:.{SAMPLE_DIGITS}g}")
    return int(v) if hasattr(v, "dtype") and "int" in str(v.dtype) else v


def configurations(base: TrainSpecLike, spaces: dict[str, Space], num_samples: int = 1, seed: int = 0,
                   algorithm: str = "basic") -> list[tuple[dict[str, Any], Any]]:
    """(sampled values, hyperparameters) of every configuration, in a fixed order: Tune's basic variant
    generator (grids crossed, the other spaces drawn anew for each grid point) run `num_samples` times
    from a `seed`ed random state; configurations that repeat (a grid with num_samples > 1) count once.
    No spaces: just `base`, so a config without spaces keeps its run keys."""
    if not spaces:
        return [({}, base)]
    if algorithm != "basic":
        raise ValueError(f"unknown search algorithm {algorithm!r} (known: basic)")
    from ray.tune.search.variant_generator import generate_variants  # lazy: ray only on the cluster path

    domains = {f: _tune_domain(s, SEARCHABLE[f]) for f, s in sorted(spaces.items())}
    rng = np.random.RandomState(seed)
    out: list[tuple[dict[str, Any], Any]] = []
    seen: set[str] = set()
    for _ in range(num_samples):
        for _, variant in generate_variants(domains, random_state=rng):
            values = {f: SEARCHABLE[f](_round(variant[f])) for f in domains}
            ident = json.dumps(values, sort_keys=True)
            if ident in seen:
                continue
            seen.add(ident)
            out.append((values, type(base).model_validate({**base.model_dump(), **values})))
    return out


def group_id(keys: list[str]) -> str:
    """The id of one search group: a hash of its configurations' run keys."""
    return hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()[:16]


# -- the choice -----------------------------------------------------------------------------------------
class NoValidationScore(ValueError):
    """A candidate run has no validation score, so the best configuration cannot be chosen on validation."""


def best_of(rows: list[dict[str, Any] | None], what: str) -> int:
    """Index of the best candidate among `rows` (stored run rows, in configuration order): the highest
    `best_validation_score` of the `ok` ones, the first of equal scores. Stopped runs are decided losers;
    a missing or failed candidate, or an ok one without a validation score, is an error (never the eval
    split instead)."""
    best, best_score = -1, -math.inf
    for i, row in enumerate(rows):
        if row is None or row.get("status") not in ("ok", "stopped"):
            raise ValueError(f"{what}: candidate {i} is not stored as a decided run "
                             f"({'missing' if row is None else row.get('status')})")
        if row["status"] != "ok":
            continue
        m = row.get("metrics") or {}
        m = json.loads(m) if isinstance(m, str) else m
        score = m.get("best_validation_score")
        if score is None:
            raise NoValidationScore(
                f"{what}: run {row['run_key']} has no validation score (metrics.best_validation_score); the best "
                "configuration is chosen on validation data only, never the eval split: give the setup's "
                "train / source_train `eval_every` and `validation`")
        if score > best_score:
            best, best_score = i, float(score)
    if best < 0:
        raise ValueError(f"{what}: every candidate configuration was stopped early; none to start from")
    return best
