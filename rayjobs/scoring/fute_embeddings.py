"""FUTE's model-facing half (paper 004): the surrogate base model of an embedding space and the two task
embedding methods computed from it.

An embedding space is fixed by `SpaceSpec` (surrogate model, method and variant, hyperparameters) plus the
probe pool and the seed (`rayjobs/embed.py` hashes all of them into the space id). Every embedding of a
space starts from the same surrogate: the pretrained weights with a head initialised from the seed.

Data, one form for DTE and MTE: examples `(x, choices)` with a target distribution q over the choices in
ONE canonical label order (the task's label set). A DTE's q is one-hot on the gold label; an MTE's q is the
black box's choice distribution (`predictions.probs`, already in the canonical order). The surrogate sees
the canonical choice names, never the black box's prompt or verbalisers. p(c | x) is the softmax over the
choices of the surrogate's choice scores (`choice_logprobs`): classification logits, multiple-choice pair
logits, or rank-classification log-likelihoods for text-to-text families - the same quantity the scoring
path stores as `probs`.

Training (`SoftLabelModel`): the one training loop (`train_loop.fit`) with the loss
`soft_cross_entropy` = -sum_c q_c log p(c | x), averaged over the batch: cross-entropy on gold labels for a
DTE, cross-entropy against the soft labels (= KL(q || p) + H(q)) for an MTE. (FUTE's released code trains
DTEs with cross-entropy but hands soft labels to a Hugging Face classification head, which then switches to
a multi-label BCE loss; here both use the same loss, recorded as `loss` in every result.)

Methods (`compute_embedding`), each named by the variant it computes:
  fisher_eq3      TaskEmb as the paper's Eq. 3: the diagonal of (1/n) sum_i g_i g_i^T, i.e. the mean over
                  examples of the squared per-example gradient g_i = grad_theta log p(y_i | x_i), after the
                  surrogate is trained on the task. With soft labels, `fisher_labels` says what y_i is:
                  `expected` (default) averages over the label distribution, sum_c q_c (grad log p(c|x_i))^2,
                  the empirical Fisher of the data's label distribution; `soft_loss` squares the gradient of
                  sum_c q_c log p(c|x_i). Both equal Eq. 3 exactly when q is one-hot.
  fisher_sq_mean  what FUTE's released code computes: the square of the mean gradient,
                  ((1/n) sum_i grad_theta loss_i)^2 with loss_i the training loss of example i.
  tupate_prefix_layer_mean
                  TuPaTE with prefix tuning (peft): the trained key/value prefix vectors of every layer,
                  averaged over the layers and flattened (num_virtual_tokens x 2 x hidden values).
  tupate_prompt   TuPaTE with prompt tuning (peft): the trained soft-prompt token vectors, flattened; for
                  surrogates whose architecture peft cannot prefix-tune (BERT-style encoders here).
TaskEmb's parameters: every non-head parameter by default (the paper); `fisher_params` (regular expressions
over parameter names) restricts them, e.g. to the last layer on a CPU. Task heads are never part of an
embedding (their shape depends on the label count; FUTE's code leaves them out too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from rayjobs.config import AdaptationSpec, ModelSpec, TrainSpec, _Strict
from rayjobs.models import build_task_model
from rayjobs.models.base import TaskModel
from rayjobs.models.encoder import EncoderClassifier, EncoderMultipleChoice
from rayjobs.models.loading import ModelError
from rayjobs.models.text_to_text import _TextToText
from rayjobs.tasks.registry import Example, LocalSource, TaskSpec

TASKEMB_VARIANTS = ("fisher_eq3", "fisher_sq_mean")
TUPATE_VARIANTS = {"prefix_tuning": "tupate_prefix_layer_mean", "prompt_tuning": "tupate_prompt"}
LOSS = "soft_cross_entropy"


class SpaceSpec(_Strict):
    """What fixes an embedding space besides its probe pool and seed (both added by the embed job)."""

    name: str = Field(description="short name shown in results (the space id is a hash of everything)")
    surrogate: ModelSpec = Field(description="the surrogate base model Theta_T (paper: T5-base)")
    method: Literal["taskemb", "tupate"] = "taskemb"
    variant: str | None = Field(default=None, description="taskemb: fisher_eq3 (default) | fisher_sq_mean; "
                                                          "tupate: follows the adaptation")
    adaptation: AdaptationSpec = Field(default_factory=AdaptationSpec,
                                       description="taskemb: full; tupate: prefix_tuning or prompt_tuning")
    train: TrainSpec = Field(default_factory=TrainSpec, description="training of the surrogate on each task")
    trainable: list[str] = Field(default_factory=list, description="taskemb: regexes of the parameters "
                                 "fine-tuned (default: all); the rest stay at their pretrained values")
    fisher_params: list[str] = Field(default_factory=list, description="taskemb: regexes of the parameters "
                                     "whose Fisher diagonal is the embedding (default: every non-head parameter)")
    fisher_labels: Literal["expected", "soft_loss"] = "expected"
    fisher_examples: int | None = Field(default=None, gt=0, description="examples the Fisher averages over "
                                        "(a seeded sample; default all)")
    loss: Literal["soft_cross_entropy"] = LOSS

    @model_validator(mode="after")
    def _method_fits(self) -> SpaceSpec:
        if self.method == "taskemb":
            if self.adaptation.method != "full":
                raise ValueError("method taskemb fine-tunes the surrogate: adaptation must be `full` "
                                 "(restrict it with `trainable`)")
            if self.variant not in (None, *TASKEMB_VARIANTS):
                raise ValueError(f"taskemb variant must be one of {TASKEMB_VARIANTS}, got {self.variant!r}")
        else:
            want = TUPATE_VARIANTS.get(self.adaptation.method)
            if want is None:
                raise ValueError(f"method tupate needs adaptation prefix_tuning or prompt_tuning, "
                                 f"got {self.adaptation.method!r}")
            if self.variant not in (None, want):
                raise ValueError(f"tupate with {self.adaptation.method} computes {want}, not {self.variant!r}")
            if self.trainable or self.fisher_params:
                raise ValueError("`trainable` and `fisher_params` belong to taskemb; tupate trains the prompt only")
        for pattern in [*self.trainable, *self.fisher_params]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad parameter-name pattern {pattern!r}: {e}") from None
        return self

    @property
    def resolved_variant(self) -> str:
        if self.method == "taskemb":
            return self.variant or "fisher_eq3"
        return TUPATE_VARIANTS[self.adaptation.method]


# -- the surrogate -----------------------------------------------------------------------------------------
def choice_task(name: str, choices: Sequence[str] | None) -> TaskSpec:
    """The task a surrogate is built for: a fixed label set (canonical order) or per-example choices."""
    return TaskSpec(name=name, answer_type="choice", choices=list(choices) if choices else None,
                    local=LocalSource(path="-"))


def build_surrogate(space: SpaceSpec, task: TaskSpec, seed: int) -> TaskModel:
    """The space's surrogate for one task, from the pretrained weights; the head (and prompt) from `seed`.

    An encoder surrogate takes its head from the space: `classification` (one logit per label; needs a
    fixed label set) or `multiple_choice` (one score per (input, choice) pair; any choices). `auto` is
    refused: two heads in one space would make its embeddings incomparable.
    """
    model = space.surrogate
    if model.family == "encoder":
        if model.head == "auto":
            raise ModelError(f"space {space.name!r}: an encoder surrogate needs `head: classification` or "
                             "`head: multiple_choice` (one head for every embedding of the space)")
        if model.head == "classification" and not task.choices:
            raise ModelError(f"space {space.name!r}: a classification head needs a fixed label set; task "
                             f"{task.name!r} has per-example choices (use head: multiple_choice)")
    torch.manual_seed(seed)
    tm = build_task_model(model, space.adaptation, task)
    if space.trainable:
        pats = [re.compile(p) for p in space.trainable]
        chosen = 0
        for name, p in tm.module.named_parameters():
            keep = tm.is_head(name) or any(r.search(name) for r in pats)
            p.requires_grad_(keep)
            chosen += int(keep and not tm.is_head(name))
        if not chosen:
            raise ModelError(f"space {space.name!r}: `trainable` {space.trainable} matches no parameter")
    return tm


def choice_logprobs(tm: TaskModel, batch: dict[str, Any]) -> torch.Tensor:
    """log p(c | x) over each example's choices, [batch, max choices], -inf where an example has fewer;
    differentiable (the training and Fisher paths), the same distribution the scoring path stores as `probs`."""

    batch = {k: v for k, v in batch.items() if k != "soft"}  # the targets are the loss's, not the model's
    own = getattr(tm, "choice_logits", None)
    if own is not None:
        logits = own(batch)
    elif isinstance(tm, EncoderMultipleChoice):
        logits = tm._logits(batch)
    elif isinstance(tm, EncoderClassifier):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "examples")}
        logits = tm.module(**inputs).logits
    elif isinstance(tm, _TextToText):
        examples: list[Example] = batch["examples"]
        prompts = [e.text for e in examples for _ in e.choices]
        conts = [c for e in examples for c in e.choices]
        summed, mean = tm._score(prompts, conts)
        used = mean if tm.mean_scoring else summed
        width = max(len(e.choices) for e in examples)
        logits = torch.full((len(examples), width), float("-inf"), dtype=used.dtype, device=used.device)
        j = 0
        for i, e in enumerate(examples):
            logits[i, :len(e.choices)] = used[j:j + len(e.choices)]
            j += len(e.choices)
    else:
        raise ModelError(f"{type(tm).__name__} has no choice distribution to train a surrogate with")
    return torch.log_softmax(logits.float(), -1)


def soft_cross_entropy(logp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per example -sum_c q_c log p_c (padding choices have q = 0 and log p = -inf: they add nothing)."""
    return -torch.where(q > 0, q * logp, torch.zeros_like(logp)).sum(-1)


def pad_targets(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out


class SoftLabelModel(TaskModel):
    """A surrogate seen by the training loop with the loss on target distributions.

    `targets` maps an example's uid to q (canonical order); the loop's `fit` trains it unchanged.
    """

    def __init__(self, inner: TaskModel, targets: dict[str, Sequence[float]]):
        self.inner = inner
        self.targets = targets
        self.task = inner.task
        self.head_prefixes = inner.head_prefixes

    @property
    def module(self) -> torch.nn.Module:  # type: ignore[override]
        return self.inner.module

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        batch = self.inner.collate(examples)
        batch["soft"] = pad_targets([self.targets[e.uid] for e in examples])
        return batch

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        logp = choice_logprobs(self.inner, batch)
        return soft_cross_entropy(logp, batch["soft"].to(logp.device)).mean()

    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        return self.inner.score(batch, generate)

    def save(self, folder: Any, meta: dict[str, Any] | None = None) -> Any:
        return self.inner.save(folder, meta)


# -- the methods ---------------------------------------------------------------------------------------------
def fisher_parameters(tm: TaskModel, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a TaskEmb embedding is over, in module order: every non-head parameter, or those
    matching `patterns`."""
    regs = [re.compile(p) for p in patterns]
    chosen = [(n, p) for n, p in tm.module.named_parameters()
              if not tm.is_head(n) and (not regs or any(r.search(n) for r in regs))]
    if not chosen:
        raise ModelError(f"fisher_params {list(patterns)} match no non-head parameter of the surrogate")
    return chosen


def _only_grad(params: list[torch.nn.Parameter], module: torch.nn.Module) -> dict[int, bool]:
    """Make exactly `params` require grad (autograd then stops below them); returns the old flags."""
    old = {id(p): p.requires_grad for p in module.parameters()}
    wanted = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in wanted)
    return old


def _restore(module: torch.nn.Module, old: dict[int, bool]) -> None:
    for p in module.parameters():
        p.requires_grad_(old[id(p)])


def fisher_embedding(tm: TaskModel, examples: Sequence[Example], targets: Sequence[Sequence[float]],
                     patterns: Sequence[str] = (), variant: str = "fisher_eq3",
                     labels: str = "expected") -> tuple[np.ndarray, dict[str, Any]]:
    """TaskEmb over the surrogate as trained: the Fisher diagonal (see the module docstring) as a float32
    vector, parameters concatenated in module order; and a description (variant, parameter names and sizes).

    Evaluation mode (no dropout): the Fisher of the deterministic trained model.
    """
    if variant not in TASKEMB_VARIANTS:
        raise ValueError(f"unknown TaskEmb variant {variant!r} (known: {TASKEMB_VARIANTS})")
    if labels not in ("expected", "soft_loss"):
        raise ValueError(f"fisher_labels must be 'expected' or 'soft_loss', got {labels!r}")
    if not examples:
        raise ValueError("the Fisher needs at least one example")
    named = fisher_parameters(tm, patterns)
    params = [p for _, p in named]
    module = tm.module
    module.eval()
    old = _only_grad(params, module)
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    try:
        device = params[0].device
        for e, q in zip(examples, targets, strict=True):
            batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in tm.collate([e]).items()}
            logp = choice_logprobs(tm, batch)[0, :len(e.choices)]
            qv = torch.tensor(list(q), dtype=logp.dtype, device=logp.device)
            if variant == "fisher_sq_mean":  # the gradient of the example's training loss, summed
                grads = torch.autograd.grad(-(torch.where(qv > 0, qv * logp, torch.zeros_like(logp))).sum(), params)
                for a, g in zip(acc, grads, strict=True):
                    a += g.double()
            elif labels == "soft_loss":
                grads = torch.autograd.grad((torch.where(qv > 0, qv * logp, torch.zeros_like(logp))).sum(), params)
                for a, g in zip(acc, grads, strict=True):
                    a += g.double() ** 2
            else:
                used = [c for c in range(len(e.choices)) if float(qv[c]) > 0]
                for k, c in enumerate(used):
                    grads = torch.autograd.grad(logp[c], params, retain_graph=k < len(used) - 1)
                    for a, g in zip(acc, grads, strict=True):
                        a += float(qv[c]) * g.double() ** 2
    finally:
        _restore(module, old)
    n = len(examples)
    parts = [(a / n) ** 2 if variant == "fisher_sq_mean" else a / n for a in acc]
    vec = torch.cat([p.reshape(-1) for p in parts]).float().cpu().numpy()
    info = {"variant": variant, "fisher_labels": labels if variant == "fisher_eq3" else "loss_gradient",
            "n_fisher": n, "params": [[name, int(p.numel())] for name, p in named]}
    return vec, info


def tupate_embedding(tm: TaskModel) -> tuple[np.ndarray, dict[str, Any]]:
    """TuPaTE: the trained prompt of a peft prompt- or prefix-tuned surrogate.

    Prefix tuning: the prefix encoder's output for the virtual tokens, [T, layers * 2 * hidden] (peft's
    layout: layer-major, then key/value), reshaped to [T, layers, 2, hidden], averaged over the layers and
    flattened. Prompt tuning: the [T, hidden] soft-prompt vectors flattened.
    """
    module = tm.module
    cfg = getattr(module, "active_peft_config", None)
    if cfg is None:
        raise ModelError("TuPaTE needs a peft prompt- or prefix-tuned surrogate")
    adapter = module.active_adapter
    encoder = module.prompt_encoder[adapter]
    tokens = module.prompt_tokens[adapter][:cfg.num_virtual_tokens].unsqueeze(0).to(encoder.embedding.weight.device)
    module.eval()
    with torch.no_grad():
        out = encoder(tokens)[0].float().cpu()
    kind = str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type)
    if kind == "PREFIX_TUNING":
        t, layers, hidden = cfg.num_virtual_tokens, cfg.num_layers, cfg.token_dim
        vec = out.reshape(t, layers, 2, hidden).mean(1).reshape(-1)
        variant = "tupate_prefix_layer_mean"
        shape = [t, 2, hidden]
    elif kind == "PROMPT_TUNING":
        vec = out.reshape(-1)
        variant = "tupate_prompt"
        shape = list(out.shape)
    else:
        raise ModelError(f"TuPaTE reads prompt or prefix tuning parameters, not {kind}")
    return vec.numpy().astype(np.float32), {"variant": variant, "shape": shape}


def compute_embedding(space: SpaceSpec, tm: TaskModel, examples: Sequence[Example],
                      targets: Sequence[Sequence[float]], seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The space's embedding of the trained surrogate; the Fisher over a seeded sample of `fisher_examples`."""
    if space.method == "tupate":
        return tupate_embedding(tm)
    idx = list(range(len(examples)))
    if space.fisher_examples is not None and space.fisher_examples < len(idx):
        idx = sorted(np.random.default_rng(seed).choice(len(idx), space.fisher_examples, replace=False).tolist())
    return fisher_embedding(tm, [examples[i] for i in idx], [targets[i] for i in idx], space.fisher_params,
                            space.resolved_variant, space.fisher_labels)
