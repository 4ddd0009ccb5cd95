"""Checks that fail a job before any training starts: models, adaptations, tasks, resources."""

from __future__ import annotations

from rayjobs.config import ExperimentConfig, SetupSpec
from rayjobs.models.loading import ModelError, resolve_path, tokenizer_path
from rayjobs.tasks import TaskRegistry

# adaptation methods each family supports
FAMILY_METHODS = {
    "encoder": {"full", "bitfit", "lora", "adapter"},
    "seq2seq": {"full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"},
    "causal": {"full", "bitfit", "lora", "adapter", "prompt_tuning", "prefix_tuning"},
}


def check_setup(setup: SetupSpec, tasks: list[str], registry: TaskRegistry) -> None:
    where = f"setup {setup.key!r}"
    if setup.model.path:
        resolve_path(setup.model.path)
    tokenizer_path(setup.model)
    fam = setup.model.family
    if setup.adaptation.method not in FAMILY_METHODS[fam]:
        raise ModelError(f"{where}: adaptation {setup.adaptation.method!r} does not fit a {fam} model "
                         f"(supported: {sorted(FAMILY_METHODS[fam])})")
    for t in tasks:
        spec = registry.get(t)
        if fam == "encoder" and spec.answer_type == "text":
            raise ModelError(f"{where}: task {t!r} has free-text answers; an encoder model cannot produce them "
                             "(use a seq2seq or causal model)")
    ds, res = setup.deepspeed, setup.resources
    if ds is not None:
        if ds.offload_params and ds.stage != 3:
            raise ModelError(f"{where}: deepspeed.offload_params needs ZeRO stage 3 (got stage {ds.stage})")
        if ds.precision in ("bf16", "fp16") and res.gpu == 0:
            raise ModelError(f"{where}: deepspeed precision {ds.precision} needs GPUs (resources.gpu = 0); "
                             "use precision fp32 on CPU")
    if res.gpu and res.gpu != int(res.gpu) and (res.workers > 1 or ds is not None):
        raise ModelError(f"{where}: fractional resources.gpu ({res.gpu}) cannot be used by multi-worker training")


def check_setups(cfg: ExperimentConfig, registry: TaskRegistry) -> None:
    tasks = list(dict.fromkeys(cfg.tasks.sources + cfg.tasks.target_list))
    for t in tasks:
        registry.get(t)
    for setup in cfg.setups:
        check_setup(setup, tasks, registry)
