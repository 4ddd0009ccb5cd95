"""Parameter-efficient adaptation: LoRA, prompt tuning and prefix tuning through peft; bottleneck
adapters through `bottleneck.py`. Only the added parameters train, plus a fresh task head where the
model has one (encoder classification / multiple choice), so checkpoints hold just those.

LoRA and adapters are injected in place and work for every family and head. Prompt and prefix
tuning change the input sequence, which peft implements per task type: they fit seq2seq and causal
LMs and encoder classification heads, not the multiple-choice head (peft has no such task type).
"""

from __future__ import annotations

from typing import Any

from rayjobs.config import AdaptationSpec
from rayjobs.models.base import TaskModel
from rayjobs.models.bottleneck import add_adapters
from rayjobs.models.loading import ModelError

#: peft task type of a prompt-learning method, by (family, encoder head)
PROMPT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "encoder": "SEQ_CLS"}
PROMPT_DEFAULTS: dict[str, Any] = {"num_virtual_tokens": 20}


def _model_type(tm: TaskModel) -> str:
    return str(getattr(getattr(tm.module, "config", None), "model_type", ""))


def _peft_config(cls: Any, method: str, params: dict[str, Any], **fixed: Any) -> Any:
    try:
        return cls(**{**params, **fixed})
    except (TypeError, ValueError) as e:
        raise ModelError(f"adaptation {method}: bad params {sorted(params)}: {e}") from None


def apply_peft(tm: TaskModel, spec: AdaptationSpec, family: str) -> None:
    method, params = spec.method, dict(spec.params)
    heads = [n for n, _ in tm.module.named_parameters() if tm.is_head(n)]
    if method == "adapter":
        for p in tm.module.parameters():
            p.requires_grad_(False)
        try:
            add_adapters(tm.module, _model_type(tm), **params)
        except (TypeError, ValueError) as e:
            raise ModelError(f"adaptation adapter: {e}") from None
        for name, p in tm.module.named_parameters():
            p.requires_grad_(".adapter." in f".{name}" or name in heads)
        return
    import peft  # lazy: peft loads only for an adapter method

    if method == "lora":
        cfg = _peft_config(peft.LoraConfig, method, params)
        tm.module = peft.get_peft_model(tm.module, cfg)
    elif method in ("prompt_tuning", "prefix_tuning"):
        if family == "encoder" and type(tm).__name__ != "EncoderClassifier":
            raise ModelError(f"adaptation {method} does not fit the encoder multiple-choice head "
                             "(use a classification head, or a seq2seq/causal model)")
        cls = peft.PromptTuningConfig if method == "prompt_tuning" else peft.PrefixTuningConfig
        cfg = _peft_config(cls, method, {**PROMPT_DEFAULTS, **params}, task_type=PROMPT_TASK_TYPES[family])
        tm.module = peft.get_peft_model(tm.module, cfg)
    else:  # pragma: no cover - the config validates the method
        raise ModelError(f"unknown adaptation method {method!r}")
    # peft freezes the base model, the task head included; the head is fresh per task and must train
    for name, p in tm.module.named_parameters():
        if tm.is_head(name) and "original_module" not in name:
            p.requires_grad_(True)
