"""Adaptation methods: which parameters of a model are trained.

`full` trains everything; `bitfit` trains bias terms (and the task head, as in Zaken et al.);
the PEFT methods wrap the module with peft and train only the added parameters (and the head).
"""

from __future__ import annotations

from rayjobs.config import AdaptationSpec
from rayjobs.models.base import TaskModel
from rayjobs.models.loading import ModelError


def apply_adaptation(tm: TaskModel, spec: AdaptationSpec, family: str) -> TaskModel:
    method = spec.method
    if method == "full":
        for p in tm.module.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        if spec.params:
            raise ModelError(f"adaptation bitfit takes no params, got {sorted(spec.params)}")
        for name, p in tm.module.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name == "bias" or tm.is_head(name))
    else:
        from rayjobs.models.peft_methods import apply_peft

        apply_peft(tm, spec, family)
    if not any(p.requires_grad for p in tm.module.parameters()):
        raise ModelError(f"adaptation {method!r} leaves no trainable parameters in this model")
    return tm
