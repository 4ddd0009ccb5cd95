"""Adaptation methods: which parameters of a model are trained.

`full` trains everything; `bitfit` trains bias terms (and the task head, as in Zaken et al.);
the PEFT methods wrap the module with peft and train only the added parameters (and the head).
T5 has no bias terms at all, so BitFit first adds zero-initialised biases to every bias-free linear
layer (as Compacter's BitFit baseline for T5 does; `add_missing_biases: false` turns that off);
the output embedding (`lm_head`) is left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from rayjobs.config import AdaptationSpec
from rayjobs.models.base import TaskModel
from rayjobs.models.loading import ModelError
from rayjobs.models.peft_methods import apply_peft


def apply_adaptation(tm: TaskModel, spec: AdaptationSpec, family: str) -> TaskModel:
    method = spec.method
    if method == "full":
        for p in tm.module.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        unknown = sorted(set(spec.params) - {"add_missing_biases"})
        if unknown:
            raise ModelError(f"adaptation bitfit takes only `add_missing_biases`, got {unknown}")
        if spec.params.get("add_missing_biases", True):
            add_missing_biases(tm.module)
        for name, p in tm.module.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name == "bias" or tm.is_head(name))
    else:
        apply_peft(tm, spec, family)
    if not any(p.requires_grad for p in tm.module.parameters()):
        raise ModelError(f"adaptation {method!r} leaves no trainable parameters in this model")
    return tm


def add_missing_biases(module: nn.Module) -> int:
    """Give every bias-free nn.Linear (but the output embedding) a zero bias; returns how many."""
    added = 0
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is None and not name.endswith("lm_head"):
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device))
            added += 1
    return added
