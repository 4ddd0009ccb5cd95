"""Text-to-text model families: seq2seq (T5 / LM-adapted T5) and decoder-only causal LMs (GPT-2 style).

Both train with teacher forcing on the answer text (the verbalised choice, the free-text answer, or
the score written as text). Choice tasks are predicted by rank classification: every choice is
scored by its log-likelihood given the prompt (summed over its tokens as in T0, or length-normalised
with `choice_scoring: mean`) and the best one wins, so a model can never answer outside the label
set. Free-text and regression answers are generated greedily (a regression answer is parsed as a
number). Prompts are truncated from the left: templates end with the question and the answer cue.

There is no task head, so a source checkpoint transfers every trained parameter.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from rayjobs.config import ModelSpec
from rayjobs.models.base import TaskModel, choice_record
from rayjobs.models.loading import from_pretrained_or_config, load_tokenizer
from rayjobs.tasks.registry import Example, TaskSpec

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float:
    """First number in a generated answer; 0.0 when there is none (counted as a wrong answer)."""
    m = _NUMBER.search(text)
    return float(m.group()) if m else 0.0


def _special_ids(tokenizer: Any) -> tuple[int, int | None]:
    """(pad, eos) ids; WordPiece tokenizers (tiny test models) have [SEP] where T5/GPT-2 have EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return pad, eos


def _choice_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (summed, length-normalised) log-likelihood of `labels` (-100 = not scored) under
    `logits` (aligned, not shifted)."""
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (lp * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)


class _TextToText(TaskModel):
    head_prefixes = ()

    def __init__(self, spec: ModelSpec, task: TaskSpec, auto_cls: Any):
        self.task = task
        self.max_length = spec.max_length
        self.max_target = spec.max_target_length
        self.mean_scoring = spec.choice_scoring == "mean"
        self.tokenizer = load_tokenizer(spec)
        self.tokenizer.truncation_side = "left"
        self.pad_id, self.eos_id = _special_ids(self.tokenizer)
        overrides = self._tiny_overrides(spec) if spec.config is not None else {}
        self.module = from_pretrained_or_config(auto_cls, spec, self.tokenizer, **overrides)
        for cfg in (self.module.config, getattr(self.module, "generation_config", None)):
            if cfg is not None:
                if getattr(cfg, "eos_token_id", None) is None:
                    cfg.eos_token_id = self.eos_id
                if getattr(cfg, "pad_token_id", None) is None:
                    cfg.pad_token_id = self.pad_id

    def _tiny_overrides(self, spec: ModelSpec) -> dict[str, Any]:
        """Special-token ids of a tiny model on a borrowed vocabulary (its config's defaults are GPT-2/T5's)."""
        own = spec.config or {}
        ids = {"eos_token_id": self.eos_id, "bos_token_id": self.tokenizer.bos_token_id or self.tokenizer.cls_token_id}
        return {k: v for k, v in ids.items() if k not in own and v is not None}

    def _greedy(self) -> Any:
        """Plain greedy decoding, whatever the checkpoint's generation_config asks (repetition penalty,
        sampling, beams): a black box's answers must not depend on shipped decoding defaults."""
        from transformers import GenerationConfig  # lazy: transformers loads only when a model is built

        return GenerationConfig(max_new_tokens=self.max_target, do_sample=False, num_beams=1,
                                pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                decoder_start_token_id=getattr(self.module.config, "decoder_start_token_id", None))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _encode(self, texts: list[str], max_length: int, special: bool = True) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                                   add_special_tokens=special, return_tensors="pt"))

    @torch.no_grad()
    def score(self, batch: dict[str, Any], generate: bool = False) -> list[dict[str, Any]]:
        """Choice tasks: rank classification (every choice's log-likelihood given the prompt; the
        prediction and probabilities use the summed or mean score as `choice_scoring` says). Free-text
        and score answers, or `generate=True`: greedy decoding with default generation settings."""
        examples: list[Example] = batch["examples"]
        out: list[dict[str, Any]] = [{} for _ in examples]
        if self.task.answer_type == "choice" and all(e.choices for e in examples):
            out = self._rank(examples)
        if generate or self.task.answer_type != "choice":
            for rec, text in zip(out, self._generate(examples), strict=True):
                rec["pred_text"] = text
                if self.task.answer_type == "score":
                    rec["pred_value"] = parse_number(text)
        return out

    def _rank(self, examples: list[Example]) -> list[dict[str, Any]]:
        prompts, conts, owner = [], [], []
        for i, e in enumerate(examples):
            for c in e.choices:
                prompts.append(e.text)
                conts.append(c)
                owner.append(i)
        summed, mean = self._score(prompts, conts)
        recs, j = [], 0
        for e in examples:
            n = len(e.choices)
            recs.append(choice_record(e.choices, summed[j:j + n], mean[j:j + n], self.mean_scoring))
            j += n
        return recs

    @abstractmethod
    def _score(self, prompts: list[str], continuations: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed, length-normalised) log-likelihood of each continuation given its prompt."""

    @abstractmethod
    def _generate(self, examples: list[Example]) -> list[str]:
        """Greedy answers."""


class Seq2SeqModel(_TextToText):
    """Encoder-decoder (T5): the prompt is the encoder input, the answer the decoder target."""

    def __init__(self, spec: ModelSpec, task: TaskSpec):
        from transformers import AutoModelForSeq2SeqLM  # lazy: transformers loads only when a model is built

        super().__init__(spec, task, AutoModelForSeq2SeqLM)

    def _tiny_overrides(self, spec: ModelSpec) -> dict[str, Any]:
        # T5 starts decoding from the pad token
        out = super()._tiny_overrides(spec)
        if "decoder_start_token_id" not in (spec.config or {}):
            out["decoder_start_token_id"] = self.pad_id
        return out

    def _targets(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(text_target=texts, truncation=True, max_length=self.max_target, padding=True,
                             return_tensors="pt")["input_ids"]
        return ids.masked_fill(ids == self.pad_id, -100)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        enc = self._encode([e.text for e in examples], self.max_length)
        enc["labels"] = self._targets([e.target_text for e in examples])
        return {**enc, "examples": examples}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss

    def _score(self, prompts: list[str], continuations: list[str]) -> torch.Tensor:
        enc = {k: v.to(self.device) for k, v in self._encode(prompts, self.max_length).items()}
        labels = self._targets(continuations).to(self.device)
        logits = self.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).logits
        return _choice_logprobs(logits, labels)

    @torch.no_grad()
    def prompt_perplexity(self, texts: list[str]) -> list[float | None]:
        """The prompt scored as the decoder's target given an empty encoder input (T5 has no plain LM)."""
        empty = {k: v.to(self.device) for k, v in self._encode([""] * len(texts), 8).items()}
        labels = self.tokenizer(text_target=texts, truncation=True, max_length=self.max_length, padding=True,
                                return_tensors="pt")["input_ids"]
        labels = labels.masked_fill(labels == self.pad_id, -100).to(self.device)
        logits = self.module(input_ids=empty["input_ids"], attention_mask=empty["attention_mask"], labels=labels).logits
        _, mean = _choice_logprobs(logits, labels)
        return torch.exp(-mean).tolist()

    def _generate(self, examples: list[Example]) -> list[str]:
        enc = {k: v.to(self.device) for k, v in self._encode([e.text for e in examples], self.max_length).items()}
        out = self.module.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   generation_config=self._greedy())
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


class CausalModel(_TextToText):
    """Decoder-only LM: prompt and answer are one sequence; only answer tokens are trained and scored."""

    def __init__(self, spec: ModelSpec, task: TaskSpec):
        from transformers import AutoModelForCausalLM  # lazy: transformers loads only when a model is built

        super().__init__(spec, task, AutoModelForCausalLM)

    def _join(self, prompts: list[str], continuations: list[str], eos: bool) -> dict[str, torch.Tensor]:
        """Right-padded prompt+answer ids with labels on the answer tokens only (prompt cut from the left)."""
        p_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        c_ids = self.tokenizer([" " + c for c in continuations], add_special_tokens=False)["input_ids"]
        rows, labels = [], []
        for p, c in zip(p_ids, c_ids, strict=True):
            c = c[:self.max_target] + ([self.eos_id] if eos and self.eos_id is not None else [])
            p = p[-max(1, self.max_length - len(c)):]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[i, :len(r)], lab[i, :len(lb)], att[i, :len(r)] = torch.tensor(r), torch.tensor(lb), 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    def _shifted(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) aligned so position i predicts label i; prompt tuning's virtual tokens,
        which peft prepends to the sequence, are cut off the logits."""
        logits = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1]:, :]
        return logits[:, :-1, :], batch["labels"][:, 1:]

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return {**self._join([e.text for e in examples], [e.target_text for e in examples], eos=True),
                "examples": examples}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        logits, labels = self._shifted(batch)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    def _score(self, prompts: list[str], continuations: list[str]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in self._join(prompts, continuations, eos=False).items()}
        return _choice_logprobs(*self._shifted(batch))

    @torch.no_grad()
    def prompt_perplexity(self, texts: list[str]) -> list[float | None]:
        """exp(-mean log-likelihood) of the prompt's tokens after the first (each predicted from its prefix)."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [x[-self.max_length:] for x in ids]
        width = max(2, max(len(x) for x in ids))
        inp = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(ids), width), -100, dtype=torch.long)
        att = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            inp[i, :len(x)], att[i, :len(x)] = torch.tensor(x), 1
            lab[i, 1:len(x)] = torch.tensor(x[1:], dtype=torch.long)
        batch = {"input_ids": inp.to(self.device), "attention_mask": att.to(self.device), "labels": lab.to(self.device)}
        _, mean = _choice_logprobs(*self._shifted(batch))
        return torch.exp(-mean).tolist()

    def _generate(self, examples: list[Example]) -> list[str]:
        self.tokenizer.padding_side = "left"
        try:
            enc = self._encode([e.text for e in examples], self.max_length - self.max_target, special=False)
        finally:
            self.tokenizer.padding_side = "right"
        enc = {k: v.to(self.device) for k, v in enc.items()}
        out = self.module.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   generation_config=self._greedy())
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.split("\n")[0].strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
