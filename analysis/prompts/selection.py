"""Zero-shot prompt selection (paper 004, FUTE, Sec. 4.2): the unlabelled baselines and the selection
metrics, computed from the stored per-example choice distributions (table `predictions`).

A *prompt* is one black box: a (model, template) scoring run, i.e. one `key` of `predictions` for one
task. Every baseline sees only the choice distributions p(y|x) of each prompt on the task's inputs
(and, for SPELL, the perplexity of the rendered prompt); the true accuracy of a prompt, from the
`correct` column, is used only to evaluate the ranking. Every score is HIGHER = BETTER.

Baselines (DESIGN.md "Per-example outputs"; cited originals checked where FUTE only names them):
  - `mi` (Sorensen et al., 2022): I(X; Y) = H(mean_x p) - mean_x H(p); the prompt with the largest
    mutual information is selected.
  - `local_e` (Lu et al., 2022): mean_x H(p(.|x)). FUTE only says it "calculates the local entropy";
    Lu et al. rank candidates by entropy and keep the HIGHEST (an over-confident prompt is the bad
    one), so the score is the entropy itself, not negated.
  - `global_e` (Lu et al., 2022): entropy of the histogram of predicted labels argmax_y p(y|x) over
    the inputs; higher is better (a prompt that predicts one label for everything scores 0).
  - `zps_log`, `zps_prob`, `zps_vote` (Liao et al., 2022): per prompt the mean over inputs of the
    top-1 minus top-2 choice probability; 2-means over the prompts' mean margins; the prompts of the
    cluster with the larger centre ensemble their outputs (sum of log-probabilities / sum of
    probabilities / majority vote of argmaxes) into pseudo-labels; a prompt's score is the accuracy
    of its argmax predictions against them (every prompt is scored, the cluster only picks the
    ensemble). Differences from ZPS's released code, named: its margin is taken on exp(summed
    log-likelihood) of the answer strings (unnormalised); here, as DESIGN.md fixes, on the softmax
    over choices. Its KMeans is sklearn's Lloyd with random_state=0; here the exact 1-D optimum
    (`two_means_1d`). Its task-specific fallback (keep the top half when the confident cluster is
    smaller than a per-task constant) is not reproduced. The 'log' ensemble uses log(softmax), whose
    argmax over choices equals that of the summed raw log-likelihoods (the log-normaliser is a
    per-prompt constant per input).
  - `spell` (Gonen et al., 2023): lower perplexity of the rendered prompt is better; score = -ppl.
  - `random`: a seeded random permutation (a floor for the others).
  - `self_select` (Ramji and Kyimpopkin, 2023; FUTE: "a meta-prompt that queries LLM for selecting the
    most effective prompt"): the model's own choice among the prompts. Its meta-prompt rows are scored
    through the black box like any choice task (rayjobs/scoring/self_select.py: per input the candidates listed
    by name in a rotating order, the names as answer choices) and stored in `predictions` under a run of
    kind 'self_select'; a prompt's score is the mean over inputs of the probability the model gives its
    name (`self_select`). Without such rows the baseline is not applicable.

All of these declare `uses_labels=False`. FUTE's ranking (cos(MTE, DTE)) uses labelled target data for
its DTE; it is passed to `evaluate_prompt_selection` as `external_scores` and reported next to them
with `uses_labels=True`.

Metrics (FUTE Sec. 4.2.1 and Table 3; for source/model selection Sec. 4.1.1):
  - performance: the true score (accuracy, a fraction) of the prompt the method ranks first;
  - rate: performance / the best true score among the prompts;
  - ndcg: see `ndcg` (exponential gain, relevance = true score in percent, Vu et al. 2020's
    definition that FUTE follows, with the log2(i + 1) discount of Jarvelin and Kekalainen);
  - rho: mean over tasks (targets) of the 1-based rank the method gives to the true best candidate.
Rankings sort by score descending; ties keep the prompts' order (the reader orders prompts by
template name), so a tie is never broken by the true score; a NaN score ranks last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.errors import AnalysisError
from analysis.registry import Registry
from analysis.store.duck import query_arrow

ZPS_VARIANTS = ("log", "prob", "vote")
NDCG_GAINS = ("exp", "linear")
PPL_AGGREGATES = ("mean", "log_mean")

# --------------------------------------------------------------------------------------------
# Per-prompt statistics over one [n_examples, n_choices] probability matrix
# --------------------------------------------------------------------------------------------


def _check_probs(p: np.ndarray, what: str = "probs") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise AnalysisError(f"{what} must be a [n_examples >= 1, n_choices >= 2] matrix, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise AnalysisError(f"{what} holds negative or non-finite probabilities")
    return p


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1)


def local_e(p: np.ndarray) -> float:
    """LocalE: mean over inputs of the entropy of p(.|x); higher is better (Lu et al., 2022)."""
    return float(_entropy_rows(_check_probs(p)).mean())


def mi(p: np.ndarray) -> float:
    """Mutual information H(mean_x p) - mean_x H(p) (Sorensen et al., 2022); higher is better."""
    p = _check_probs(p)
    return float(_entropy_rows(p.mean(axis=0)) - _entropy_rows(p).mean())


def global_e(p: np.ndarray) -> float:
    """GlobalE: entropy of the predicted-label histogram (argmax per input, first index on ties);
    higher is better (Lu et al., 2022)."""
    p = _check_probs(p)
    counts = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
    return float(_entropy_rows(counts / counts.sum()))


# --------------------------------------------------------------------------------------------
# ZPS
# --------------------------------------------------------------------------------------------


def two_means_1d(values: Sequence[float]) -> np.ndarray:
    """Exact 1-D k-means with k = 2: a boolean mask of the cluster with the larger centre.

    In one dimension an optimal 2-clustering is a split of the sorted values, so every split
    between two distinct consecutive values is tried and the one with the least within-cluster sum
    of squares kept (prefix sums, O(n log n)). Deterministic, unlike a randomly initialised Lloyd.
    Ties between splits go to the first (the larger high cluster). Equal values are never split, so
    a single value, or all values equal, gives one cluster: every entry is in the high cluster.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise AnalysisError(f"two_means_1d needs a non-empty 1-D array of finite values, got {v!r}")
    order = np.argsort(v, kind="stable")
    s = v[order]
    n = s.size
    splits = np.flatnonzero(s[1:] > s[:-1]) + 1  # left = s[:k], right = s[k:]
    mask = np.ones(n, dtype=bool)
    if splits.size == 0:
        return mask
    c1 = np.concatenate([[0.0], np.cumsum(s)])
    c2 = np.concatenate([[0.0], np.cumsum(s * s)])
    k = splits.astype(np.float64)
    sse_left = c2[splits] - c1[splits] ** 2 / k
    sse_right = (c2[n] - c2[splits]) - (c1[n] - c1[splits]) ** 2 / (n - k)
    sse = sse_left + sse_right
    tol = 1e-12 * max(1.0, float(np.abs(sse).max()))
    best = int(splits[np.flatnonzero(sse <= sse.min() + tol)[0]])
    mask[:] = False
    mask[order[best:]] = True
    return mask


def _stack(probs_list: Sequence[np.ndarray]) -> np.ndarray:
    if len(probs_list) == 0:
        raise AnalysisError("no prompts given")
    mats = [_check_probs(p, f"probs of prompt {i}") for i, p in enumerate(probs_list)]
    if len({m.shape for m in mats}) != 1:
        raise AnalysisError(f"prompts must share one [n_examples, n_choices] shape (aligned examples), "
                            f"got {sorted({m.shape for m in mats})}")
    return np.stack(mats)


def zps_margins(probs_list: Sequence[np.ndarray]) -> np.ndarray:
    """Per prompt the mean over inputs of the top-1 minus top-2 choice probability."""
    P = _stack(probs_list)
    top2 = np.sort(P, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]).mean(axis=1)


def ensemble_labels(probs_list: Sequence[np.ndarray], variant: str) -> np.ndarray:
    """Pseudo-labels of an ensemble of prompts: 'log' argmax of summed log-probabilities, 'prob'
    argmax of summed probabilities, 'vote' the most frequent argmax (ties: lowest label index)."""
    if variant not in ZPS_VARIANTS:
        raise AnalysisError(f"unknown ZPS variant {variant!r}; choose one of {', '.join(ZPS_VARIANTS)}")
    P = _stack(probs_list)
    if variant == "log":
        return np.log(np.clip(P, np.finfo(np.float64).tiny, None)).sum(axis=0).argmax(axis=1)
    if variant == "prob":
        return P.sum(axis=0).argmax(axis=1)
    preds = P.argmax(axis=2)  # [prompts, examples]
    votes = (preds[..., None] == np.arange(P.shape[2])).sum(axis=0)  # [examples, choices]
    return votes.argmax(axis=1)


@dataclass(frozen=True)
class ZPSResult:
    scores: np.ndarray  # per prompt: accuracy against the pseudo-labels
    pseudo_labels: np.ndarray  # per example
    confident: np.ndarray  # mask of the prompts in the ensemble
    margins: np.ndarray  # per prompt mean top-1 minus top-2 probability


def zps_details(probs_list: Sequence[np.ndarray], variant: str = "log") -> ZPSResult:
    """ZPS with its intermediate quantities (see the module docstring)."""
    P = _stack(probs_list)
    margins = zps_margins(P)
    confident = two_means_1d(margins)
    labels = ensemble_labels(P[confident], variant)
    scores = (P.argmax(axis=2) == labels[None, :]).mean(axis=1)
    return ZPSResult(scores=scores, pseudo_labels=labels, confident=confident, margins=margins)


def zps(probs_list: Sequence[np.ndarray], variant: str = "log") -> np.ndarray:
    """ZPS score per prompt: accuracy of its predictions against the confident cluster's pseudo-labels."""
    return zps_details(probs_list, variant).scores


# --------------------------------------------------------------------------------------------
# SPELL, random
# --------------------------------------------------------------------------------------------


def spell(perplexities: Sequence[float]) -> np.ndarray:
    """SPELL score per prompt: minus the perplexity of the rendered prompt (lower ppl is better)."""
    v = np.asarray(perplexities, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise AnalysisError("spell needs one perplexity per prompt")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise AnalysisError("spell needs a finite, positive perplexity for every prompt")
    return -v


def random_scores(n_prompts: int, seed: int) -> np.ndarray:
    """A seeded random permutation of 0..n-1 as scores."""
    if n_prompts < 1:
        raise AnalysisError("random needs at least one prompt")
    return np.random.default_rng(seed).permutation(n_prompts).astype(np.float64)


def self_select(meta_probs: np.ndarray) -> np.ndarray:
    """Self-Select score per prompt: mean over the meta-prompts of the probability the model picks it
    ([n_meta, n_prompts], columns in the prompts' order)."""
    return _check_probs(meta_probs, "Self-Select meta-prompt probabilities").mean(axis=0)


SELF_SELECT = "self-select"  # template name of the meta-prompt rows (rayjobs.scoring.self_select.SELF_SELECT)


def self_select_probs(con: duckdb.DuckDBPyConnection, task: str, names: Sequence[str], *, model: str | None = None,
                      keys: Sequence[str] | None = None, split: str | None = None) -> np.ndarray | None:
    """The stored meta-prompt choice distributions of `task`, columns aligned to `names` by each row's
    `choices` (the order the prompts were listed in); None when no Self-Select rows are stored. Rows come
    from runs of kind 'self_select' of `model` (or the given run `keys`)."""
    where = ["r.kind = 'self_select'", "r.status = 'ok'", "p.task = $task", f"p.template = '{SELF_SELECT}'"]
    params: dict[str, Any] = {"task": task}
    if model is not None:
        where.append("r.model = $model")
        params["model"] = model
    if keys is not None:
        where.append("r.run_key IN (SELECT unnest($keys))")
        params["keys"] = list(keys)
    if split is not None:
        where.append("p.split = $split")
        params["split"] = split
    rows = con.execute(f"SELECT p.key, p.choices, p.probs FROM predictions p JOIN runs r ON r.run_key = p.key "
                       f"WHERE {' AND '.join(where)} ORDER BY p.key, p.example_id", params).fetchall()
    if not rows:
        return None
    if len({k for k, _, _ in rows}) > 1:
        raise AnalysisError(f"Self-Select rows of task {task!r} come from several runs "
                            f"({', '.join(sorted({k for k, _, _ in rows}))}): name the model or the key")
    col = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(rows), len(names)))
    for i, (_, choices, probs) in enumerate(rows):
        if sorted(choices) != sorted(names):
            raise AnalysisError(f"Self-Select was asked about prompts {sorted(choices)}, the comparison has "
                                f"{sorted(names)} (score the meta-prompt over the same prompts)")
        for c, v in zip(choices, probs, strict=True):
            out[i, col[c]] = v
    return out


# --------------------------------------------------------------------------------------------
# The registry: a baseline is a function over the unlabelled outputs, and a name
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptOutputs:
    """What a baseline may see: per prompt its choice distributions on the aligned inputs and the
    perplexity of its rendered prompt (NaN when not stored). No gold labels, no accuracy."""

    names: list[str]
    probs: np.ndarray  # [n_prompts, n_examples, n_choices]
    ppl: np.ndarray  # [n_prompts]
    meta: np.ndarray | None = None  # [n_meta, n_prompts] Self-Select's meta-prompt choices (None: not stored)


@dataclass(frozen=True)
class Baseline:
    name: str
    score: Callable[[PromptOutputs, int], np.ndarray]  # (outputs, seed) -> one score per prompt
    uses_labels: bool
    data: str  # what it reads, for reports


BASELINES: Registry[Baseline] = Registry("baseline")


def register_baseline(name: str, data: str, uses_labels: bool = False
                      ) -> Callable[[Callable[[PromptOutputs, int], np.ndarray]], Callable]:
    """Decorator: add `fn(outputs, seed) -> scores` (higher = better) to `BASELINES` under `name`."""
    return BASELINES.decorator(name, lambda fn: Baseline(name=name, score=fn, uses_labels=uses_labels, data=data))


_PROBS = "unlabelled choice distributions p(y|x)"


@register_baseline("mi", _PROBS)
def _mi(o: PromptOutputs, seed: int) -> np.ndarray:
    return np.array([mi(p) for p in o.probs])


@register_baseline("local_e", _PROBS)
def _local_e(o: PromptOutputs, seed: int) -> np.ndarray:
    return np.array([local_e(p) for p in o.probs])


@register_baseline("global_e", _PROBS)
def _global_e(o: PromptOutputs, seed: int) -> np.ndarray:
    return np.array([global_e(p) for p in o.probs])


for _variant in ZPS_VARIANTS:
    register_baseline(f"zps_{_variant}", _PROBS + " of all prompts")(
        lambda o, seed, _v=_variant: zps(o.probs, _v))


@register_baseline("spell", "perplexity of the rendered prompt")
def _spell(o: PromptOutputs, seed: int) -> np.ndarray:
    missing = [n for n, v in zip(o.names, o.ppl, strict=True) if not np.isfinite(v)]
    if missing:
        raise AnalysisError(f"spell needs prompt_ppl; none stored for prompt(s) {', '.join(missing)}")
    return spell(o.ppl)


@register_baseline("self_select", "the model's choice among the prompts through a meta-prompt")
def _self_select(o: PromptOutputs, seed: int) -> np.ndarray:
    if o.meta is None:
        raise AnalysisError("self_select needs the meta-prompt's choice distributions: score them with "
                            "`self_select: true` in the score config (or mte.self_select in the embed config)")
    return self_select(o.meta)


@register_baseline("random", "nothing (seeded permutation)")
def _random(o: PromptOutputs, seed: int) -> np.ndarray:
    return random_scores(len(o.names), seed)


# --------------------------------------------------------------------------------------------
# Selection metrics
# --------------------------------------------------------------------------------------------


def _pair(scores: Sequence[float], true_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(true_scores, dtype=np.float64)
    if s.ndim != 1 or s.shape != t.shape or s.size == 0:
        raise AnalysisError(f"scores and true scores must be two equal-length non-empty vectors, "
                            f"got {s.shape} and {t.shape}")
    if not np.all(np.isfinite(t)):
        raise AnalysisError("every candidate needs a finite true score (is `correct` stored?)")
    return s, t


def ranking(scores: Sequence[float]) -> np.ndarray:
    """Candidate indices from best to worst: score descending, ties by index, NaN last."""
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, kind="stable")


def performance(scores: Sequence[float], true_scores: Sequence[float]) -> float:
    """True score of the candidate ranked first."""
    s, t = _pair(scores, true_scores)
    return float(t[ranking(s)[0]])


def rate(scores: Sequence[float], true_scores: Sequence[float]) -> float:
    """Performance divided by the best true score (1.0 = the best candidate was selected)."""
    s, t = _pair(scores, true_scores)
    if t.max() <= 0:
        raise AnalysisError("rate is undefined when the best true score is not positive")
    return float(t[ranking(s)[0]] / t.max())


def ndcg(scores: Sequence[float], true_scores: Sequence[float], gain: str = "exp",
         relevance_scale: float = 100.0) -> float:
    """NDCG of the method's ranking against the true scores.

    rel_j = relevance_scale * true_score_j (the true score in percent by default);
    DCG(pi) = sum_{i=1..n} G(rel_{pi(i)}) / log2(i + 1) over the 1-based positions i of ranking pi;
    NDCG = DCG(method's ranking) / DCG(ranking by true score descending).
    gain 'exp' (default): G(r) = 2^r - 1, Vu et al. (2020)'s NDCG with relevance = target
    performance, which FUTE follows (Sec. 4.1.1) and uses with "relevance determined by
    performance" for prompts (Sec. 4.2.1); with percent relevance it weighs the top of the ranking
    heavily (a prompt 1 point worse counts half), consistent with Table 3's NDCG well below 100
    where all prompts score 50-90%. gain 'linear': G(r) = r (Jarvelin and Kekalainen's plain
    cumulated gain; near 1 whenever the candidates' scores are close).
    """
    if gain not in NDCG_GAINS:
        raise AnalysisError(f"unknown NDCG gain {gain!r}; choose one of {', '.join(NDCG_GAINS)}")
    s, t = _pair(scores, true_scores)
    rel = relevance_scale * t
    g = np.expm1(rel * math.log(2.0)) if gain == "exp" else rel
    discount = 1.0 / np.log2(np.arange(2, s.size + 2))
    ideal = float((np.sort(g)[::-1] * discount).sum())
    if ideal <= 0:
        raise AnalysisError("NDCG is undefined when every candidate has zero relevance")
    return float((g[ranking(s)] * discount).sum() / ideal)


def rank_of_true_best(scores: Sequence[float], true_scores: Sequence[float]) -> int:
    """1-based position, in the method's ranking, of the true best candidate (of the best placed
    one when several share the best true score)."""
    s, t = _pair(scores, true_scores)
    positions = np.empty(s.size, dtype=np.int64)
    positions[ranking(s)] = np.arange(1, s.size + 1)
    return int(positions[t == t.max()].min())


def rho(cases: Iterable[tuple[Sequence[float], Sequence[float]]]) -> float:
    """Mean over tasks (targets) of `rank_of_true_best`; each case is (scores, true_scores)."""
    ranks = [rank_of_true_best(s, t) for s, t in cases]
    if not ranks:
        raise AnalysisError("rho needs at least one (scores, true scores) case")
    return float(np.mean(ranks))


# --------------------------------------------------------------------------------------------
# Reading the store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTable:
    """The prompts of one task aligned on the examples every prompt scored (example_id order)."""

    task: str
    names: list[str]  # template names, sorted
    keys: list[str]  # the scoring key of each prompt
    example_ids: list[str]
    probs: np.ndarray  # [n_prompts, n_examples, n_choices]
    accuracy: np.ndarray  # [n_prompts] mean of `correct` over the aligned examples (NaN: unlabelled)
    n_labelled: np.ndarray  # [n_prompts] aligned examples with a non-NULL `correct`
    ppl: np.ndarray  # [n_prompts] aggregated prompt_ppl (NaN when none stored)
    outputs: PromptOutputs = field(repr=False)


def _prediction_selection(keys: Sequence[str] | None, model: str | None, task: str | None,
                          split: str | None) -> tuple[str, dict[str, Any]]:
    """The SELECT of the chosen `predictions` rows (by keys, or by the runs' model) and its parameters."""
    where, params = ["TRUE"], {}
    join = ""
    if keys is not None:
        if len(keys) == 0:
            raise AnalysisError("prompt_table got an empty list of keys")
        where.append("p.key IN (SELECT unnest($keys))")
        params["keys"] = list(keys)
    if model is not None:
        join = "JOIN runs r ON r.run_key = p.key AND r.status = 'ok' AND r.model = $model AND r.kind <> 'self_select'"
        params["model"] = model
    if task is not None:
        where.append("p.task = $task")
        params["task"] = task
    if split is not None:
        where.append("p.split = $split")
        params["split"] = split
    return f"SELECT p.* FROM predictions p {join} WHERE {' AND '.join(where)}", params


def _checked_selection(con: duckdb.DuckDBPyConnection, sel: str, params: dict[str, Any], what: str,
                       task: str | None, split: str | None) -> dict[str, Any]:
    """The selection's tasks, splits and prompt count; an error unless it is one task, one split, and
    each template under one key."""
    meta = query_arrow(con, f"""
        WITH sel AS ({sel})
        SELECT (SELECT list(DISTINCT task ORDER BY task) FROM sel) AS tasks,
               (SELECT list(DISTINCT split ORDER BY split) FROM sel) AS splits,
               (SELECT list(template || ' (' || keys || ')' ORDER BY template) FROM (
                    SELECT template, string_agg(DISTINCT key, ', ' ORDER BY key) AS keys
                    FROM sel GROUP BY template HAVING count(DISTINCT key) > 1)) AS dup_templates,
               (SELECT count(DISTINCT template) FROM sel) AS n_prompts
    """, params).to_pylist()[0]
    if meta["n_prompts"] == 0:
        raise AnalysisError(f"no predictions for {what}" + (f", task {task!r}" if task else "")
                            + (f", split {split!r}" if split else ""))
    if len(meta["tasks"]) > 1:
        raise AnalysisError(f"predictions of {what} span several tasks {meta['tasks']}: name one with task=")
    if len(meta["splits"] or []) > 1:
        raise AnalysisError(f"predictions of {what} span several splits {meta['splits']}: name one with split=")
    if meta["dup_templates"]:
        raise AnalysisError(f"a prompt (template) must come from one key; scored under several: "
                            f"{'; '.join(meta['dup_templates'])}")
    return meta


def prompt_table(con: duckdb.DuckDBPyConnection, keys: Sequence[str] | None = None, *, model: str | None = None,
                 task: str | None = None, split: str | None = None, ppl_agg: str = "mean") -> PromptTable:
    """The choice distributions of a set of prompts on one task, aligned by example_id.

    Select the prompts by `keys` (scoring keys of `predictions`) or by `model` and `task` (the
    `runs` row of each key names its model: keys of `status = 'ok'` runs whose model matches).
    Only examples scored by every prompt are kept. A prompt is a template; one template under two
    keys, or rows of several tasks or splits without `task` / `split` to choose, is an error.
    `ppl_agg` aggregates prompt_ppl over the aligned examples: 'mean' (arithmetic) or 'log_mean'
    (mean log-perplexity, i.e. the log of the geometric mean; the same SPELL ranking as a geometric
    mean).
    """
    if ppl_agg not in PPL_AGGREGATES:
        raise AnalysisError(f"unknown ppl_agg {ppl_agg!r}; choose one of {', '.join(PPL_AGGREGATES)}")
    if keys is None and (model is None or task is None):
        raise AnalysisError("prompt_table needs keys, or a model and a task")
    sel, params = _prediction_selection(keys, model, task, split)
    what = f"keys {list(keys)}" if keys is not None else f"model {model!r}"
    meta = _checked_selection(con, sel, params, what, task, split)
    n = int(meta["n_prompts"])
    ppl_expr = "avg(prompt_ppl)" if ppl_agg == "mean" else "avg(ln(prompt_ppl))"
    rows = query_arrow(con, f"""
        WITH sel AS ({sel}),
        common AS (SELECT example_id FROM sel GROUP BY example_id HAVING count(*) = {n})
        SELECT template, key, example_id, probs, correct, prompt_ppl
        FROM sel SEMI JOIN common USING (example_id)
        ORDER BY template, example_id
    """, params)
    if rows.num_rows == 0:
        raise AnalysisError(f"the {n} prompts of {what} share no scored example")
    per_prompt = query_arrow(con, f"""
        WITH sel AS ({sel}),
        common AS (SELECT example_id FROM sel GROUP BY example_id HAVING count(*) = {n})
        SELECT template, any_value(key) AS key, avg(correct::DOUBLE) AS accuracy,
               count(correct) AS n_labelled, {ppl_expr} AS ppl
        FROM sel SEMI JOIN common USING (example_id)
        GROUP BY template ORDER BY template
    """, params).to_pydict()
    probs = _probs_array(rows, n, per_prompt["template"])
    n_ex = probs.shape[1]
    names = list(per_prompt["template"])
    ppl = np.array([np.nan if v is None else v for v in per_prompt["ppl"]], dtype=np.float64)
    if ppl_agg == "log_mean":
        ppl = np.exp(ppl)
    outputs = PromptOutputs(names=names, probs=probs, ppl=ppl)
    return PromptTable(
        task=meta["tasks"][0], names=names, keys=list(per_prompt["key"]),
        example_ids=rows.column("example_id").slice(0, n_ex).to_pylist(), probs=probs,
        accuracy=np.array([np.nan if v is None else v for v in per_prompt["accuracy"]], dtype=np.float64),
        n_labelled=np.asarray(per_prompt["n_labelled"], dtype=np.int64), ppl=ppl, outputs=outputs)


def _probs_array(rows: pa.Table, n_prompts: int, templates: list[str]) -> np.ndarray:
    """The `probs` list column of rows ordered by (template, example_id) as [prompts, examples, C]."""
    col = rows.column("probs").combine_chunks()
    bad = rows.filter(pc.is_null(col)).column("template").unique().to_pylist() if col.null_count else []
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if bad:
        raise AnalysisError(f"prompt(s) {', '.join(bad)} have rows without probs (not a choice task?)")
    if lengths.size and (lengths.min() != lengths.max() or lengths.min() < 2):
        raise AnalysisError(f"prompts of one task must share one number of choices >= 2; got lengths "
                            f"{sorted(set(lengths.tolist()))} over templates {templates}")
    flat = pc.list_flatten(col)
    if flat.null_count:
        raise AnalysisError("probs lists hold NULL entries")
    c = int(lengths[0])
    return flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(n_prompts, -1, c)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_scores(names: Sequence[str], scores: Sequence[float], true_scores: Sequence[float],
                    gain: str = "exp") -> dict[str, Any]:
    """Ranking and the selection metrics of one method's scores."""
    s, t = _pair(scores, true_scores)
    order = ranking(s)
    return {"ranking": [names[i] for i in order], "scores": dict(zip(names, s.tolist(), strict=True)),
            "selected": names[order[0]], "performance": performance(s, t), "rate": rate(s, t),
            "ndcg": ndcg(s, t, gain=gain), "rank_of_best": rank_of_true_best(s, t)}


def evaluate_prompt_selection(con: duckdb.DuckDBPyConnection, task: str, keys: Sequence[str] | None = None,
                              methods: Sequence[str] | None = None, seed: int = 0, *, model: str | None = None,
                              split: str | None = None, gain: str = "exp",
                              external_scores: Mapping[str, Mapping[str, float]] | None = None,
                              external_uses_labels: bool = True) -> dict[str, Any]:
    """Rank the prompts of `task` with each method and score the rankings against the true accuracy.

    Prompts are chosen by `keys` or `model` (see `prompt_table`). `methods` are names of
    `BASELINES` (default: every one the stored outputs allow; the others are listed with why under
    "not_applicable"). Self-Select's meta-prompt rows are those of the prompts' model (`self_select_probs`). `external_scores` adds rankings computed elsewhere, e.g.
    {"fute_taskemb": {template: cos(MTE, DTE)}}; they are marked `uses_labels=external_uses_labels`
    (True: FUTE's DTE is learnt on labelled target data). Returns {"task", "prompts",
    "true_scores", "best", "n_examples", "methods": {name: {"ranking", "scores", "selected",
    "performance", "rate", "ndcg", "rank_of_best", "uses_labels", "data"}}}.
    """
    unknown = [m for m in methods or [] if m not in BASELINES]
    if unknown:
        raise AnalysisError(f"unknown prompt-selection method(s) {', '.join(unknown)}; "
                            f"known: {', '.join(BASELINES)}")
    table = prompt_table(con, keys, model=model, task=task, split=split)
    meta_model, meta, meta_error = model if model is not None else _model_of(con, table.keys), None, None
    if meta_model is not None:
        try:
            meta = self_select_probs(con, table.task, table.names, split=split, model=meta_model)
        except AnalysisError as e:  # rows that do not fit: Self-Select is not applicable, and says why
            meta_error = str(e)
    table = replace(table, outputs=replace(table.outputs, meta=meta))
    missing = {**applicable(table.outputs), **({"self_select": meta_error} if meta_error else {})}
    if meta_error and "self_select" in (methods or []):
        raise AnalysisError(meta_error)
    names = [m for m in BASELINES if m not in missing] if methods is None else list(methods)
    unlabelled = [n for n, k in zip(table.names, table.n_labelled, strict=True) if k == 0]
    if unlabelled:
        raise AnalysisError(f"no labelled examples (correct is NULL) for prompt(s) {', '.join(unlabelled)} "
                            f"of task {task!r}: nothing to evaluate against")
    out: dict[str, Any] = {
        "task": table.task, "prompts": table.names, "true_scores": dict(zip(table.names, table.accuracy.tolist(), strict=True)),
        "best": table.names[int(np.argmax(table.accuracy))], "n_examples": len(table.example_ids), "methods": {},
        "not_applicable": missing if methods is None else {}}
    for m in names:
        b = BASELINES[m]
        scores = np.asarray(b.score(table.outputs, seed), dtype=np.float64)
        if scores.shape != (len(table.names),):
            raise AnalysisError(f"baseline {m!r} returned {scores.shape} scores for {len(table.names)} prompts")
        out["methods"][m] = {**evaluate_scores(table.names, scores, table.accuracy, gain),
                             "uses_labels": b.uses_labels, "data": b.data}
    for m, by_prompt in (external_scores or {}).items():
        missing = [n for n in table.names if n not in by_prompt]
        if missing:
            raise AnalysisError(f"external scores {m!r} miss prompt(s) {', '.join(missing)}")
        scores = np.array([by_prompt[n] for n in table.names], dtype=np.float64)
        out["methods"][m] = {**evaluate_scores(table.names, scores, table.accuracy, gain),
                             "uses_labels": external_uses_labels, "data": "external scores"}
    return out


def _model_of(con: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> str | None:
    """The one model of the prompts' runs (None when the keys name none or several)."""
    models = [r[0] for r in con.execute("SELECT DISTINCT model FROM runs WHERE run_key IN (SELECT unnest(?))",
                                        [list(keys)]).fetchall()]
    return models[0] if len(models) == 1 else None


def applicable(outputs: PromptOutputs) -> dict[str, str]:
    """Baselines that cannot run on these outputs, with why (SPELL without perplexities, Self-Select
    without meta-prompt rows)."""
    out = {}
    if not np.all(np.isfinite(outputs.ppl)):
        out["spell"] = "no prompt perplexity stored (the black box is not a language model, or perplexity: false)"
    if outputs.meta is None:
        out["self_select"] = "no Self-Select meta-prompt rows stored (self_select: true in the score config)"
    return out


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method the mean over tasks of performance, rate and NDCG ("averaged across datasets",
    FUTE Sec. 4.2.1) and rho (mean rank of the true best prompt); only methods present in every
    result are summarised."""
    if not results:
        raise AnalysisError("summarise needs at least one task's results")
    common = set.intersection(*(set(r["methods"]) for r in results))
    order = [m for m in results[0]["methods"] if m in common]
    return {m: {"performance": float(np.mean([r["methods"][m]["performance"] for r in results])),
                "rate": float(np.mean([r["methods"][m]["rate"] for r in results])),
                "ndcg": float(np.mean([r["methods"][m]["ndcg"] for r in results])),
                "rho": float(np.mean([r["methods"][m]["rank_of_best"] for r in results])),
                "n_tasks": len(results), "uses_labels": results[0]["methods"][m]["uses_labels"]}
            for m in order}
