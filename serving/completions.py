"""OpenAI-style completions from a causal LM `TaskModel`: prompt log-probabilities and greedy generation.

Why here and not in the model: this is only the wire format of the endpoint that `EndpointBox` (and any
OpenAI client) scores through. The numbers come from raw logits (log-softmax, no processors), one padded
forward pass over all prompts for `echo`, so a choice's log-likelihood read from the echoed tokens equals
`TaskModel.score` on the same model. The route takes `max_tokens` >= 1, as vLLM does: with `echo` the
echoed prompt tokens come first, then the generated ones (offsets from len(prompt) on), which a scoring
client drops. `complete` itself still takes 0 (prompt only) for callers inside the process. Prompts are tokenised without special tokens
(as `CausalModel` scores them); `text_offset` holds each token's start character in the prompt (the
tokenizer's offsets), so a client can pick the continuation tokens of `prompt + " " + choice`.
"""

from __future__ import annotations

from typing import Any

import torch

from rayjobs.models.base import TaskModel
from rayjobs.models.text_to_text import CausalModel


def causal_lm(tm: Any) -> bool:
    return isinstance(tm, CausalModel)


def _tokens(text: str, starts: list[int], end: int) -> list[str]:
    """Token strings as slices of the text between consecutive offsets (they concatenate to the text)."""
    bounds = starts[1:] + [end]
    return [text[s:e] for s, e in zip(starts, bounds, strict=True)]


def _top(logp: torch.Tensor, k: int, tokenizer: Any) -> dict[str, float]:
    vals, ids = logp.topk(k)
    return {tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, ids, strict=True)}


@torch.no_grad()
def prompt_logprobs(tm: TaskModel, prompts: list[str], top: int = 0) -> list[dict[str, Any]]:
    """Per prompt: tokens, token_logprobs (the first None: nothing predicts it), text_offset, top_logprobs.

    Prompts longer than the model's `max_length` keep their last tokens (as `CausalModel` does)."""
    tok = tm.tokenizer
    enc = tok(prompts, add_special_tokens=False, return_offsets_mapping=True)
    ids = [x[-tm.max_length:] for x in enc["input_ids"]]
    offs = [[int(s) for s, _ in o][-tm.max_length:] for o in enc["offset_mapping"]]
    width = max(1, max(len(x) for x in ids))
    inp = torch.full((len(ids), width), tm.pad_id, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)], att[i, :len(x)] = torch.tensor(x, dtype=torch.long), 1
    dev = tm.device
    logits = tm.module(input_ids=inp.to(dev), attention_mask=att.to(dev)).logits
    logits = logits[:, -width:, :].float()  # prompt tuning prepends virtual tokens
    logp = torch.log_softmax(logits, -1)
    out = []
    for i, (x, o, text) in enumerate(zip(ids, offs, prompts, strict=True)):
        values: list[float | None] = [None] + [float(logp[i, j - 1, x[j]]) for j in range(1, len(x))]
        tops = None
        if top > 0:
            tops = [None] + [_top(logp[i, j - 1], top, tok) for j in range(1, len(x))]
        out.append({"tokens": _tokens(text, o, len(text)), "token_logprobs": values, "text_offset": o,
                    "top_logprobs": tops, "n_tokens": len(x)})
    return out


@torch.no_grad()
def greedy(tm: TaskModel, prompt: str, max_tokens: int, top: int = 0) -> dict[str, Any]:
    """Greedy continuation (argmax of raw logits, stops at EOS): text, per-token log-probabilities and
    offsets (relative to the continuation), finish_reason."""
    from transformers import GenerationConfig  # lazy: transformers loads only when a model is built

    tok = tm.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"][-max(1, tm.max_length - max_tokens):]
    if not ids:  # an empty prompt: start from BOS / EOS as GPT-2 does
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tm.eos_id or tm.pad_id]
    inp = torch.tensor([ids], dtype=torch.long, device=tm.device)
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1, pad_token_id=tm.pad_id,
                           eos_token_id=tm.eos_id, output_logits=True, return_dict_in_generate=True)
    gen = tm.module.generate(input_ids=inp, attention_mask=torch.ones_like(inp), generation_config=cfg)
    new = [int(t) for t in gen.sequences[0, inp.shape[1]:]]
    logps = [torch.log_softmax(step[0].float(), -1) for step in gen.logits]
    stopped = bool(new) and tm.eos_id is not None and new[-1] == tm.eos_id
    kept = new[:-1] if stopped else new
    pieces, offsets, pos = [], [], 0
    for j in range(len(kept)):
        text_j = tok.decode(kept[:j + 1], skip_special_tokens=True)
        offsets.append(pos)
        pieces.append(text_j[pos:])
        pos = len(text_j)
    return {"text": "".join(pieces), "tokens": pieces, "text_offset": offsets,
            "token_logprobs": [float(lp[t]) for lp, t in zip(logps, kept, strict=False)],
            "top_logprobs": [_top(lp, top, tok) for lp in logps[:len(kept)]] if top > 0 else None,
            "finish_reason": "stop" if stopped else "length", "n_prompt": len(ids), "n_new": len(new)}


def complete(tm: TaskModel, prompts: list[str], max_tokens: int, echo: bool, logprobs: int | None
             ) -> tuple[list[dict[str, Any]], int, int]:
    """OpenAI completion choices for `prompts`, and (prompt tokens, completion tokens) for `usage`."""
    top = logprobs or 0
    echoed = prompt_logprobs(tm, prompts, top) if echo or max_tokens == 0 else None
    choices, n_prompt, n_new = [], 0, 0
    for i, prompt in enumerate(prompts):
        if max_tokens > 0:
            g = greedy(tm, prompt, max_tokens, top)
            n_new += g["n_new"]
            text, finish = g["text"], g["finish_reason"]
        else:
            g, text, finish = None, "", "length"
        n_prompt += echoed[i]["n_tokens"] if echoed else g["n_prompt"]  # type: ignore[index]
        lp: dict[str, Any] | None = None
        if logprobs is not None:
            parts = ([echoed[i]] if echo and echoed else []) + ([g] if g else [])
            shift = [0] + ([len(prompt)] if echo and echoed and g else [])
            lp = {"tokens": [t for p in parts for t in p["tokens"]],
                  "token_logprobs": [v for p in parts for v in p["token_logprobs"]],
                  "text_offset": [o + s for p, s in zip(parts, shift, strict=True) for o in p["text_offset"]],
                  "top_logprobs": ([t for p in parts for t in (p["top_logprobs"] or [])] if top else None)}
        choices.append({"text": (prompt if echo else "") + text, "index": i, "logprobs": lp,
                        "finish_reason": finish})
    return choices, n_prompt, n_new
