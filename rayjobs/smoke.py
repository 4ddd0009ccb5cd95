"""`--smoke`: the same config shrunk to run end to end on a laptop CPU in minutes.

Tiny sample sizes, one seed, a few optimiser steps; models named by hub id are replaced by a tiny
random-weight model of the same family (MiniLM's tokenizer), GPUs and half precision dropped.
"""

from __future__ import annotations

from rayjobs.config import ExperimentConfig, ModelSpec, SetupSpec

TINY = {
    "encoder": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 512},
    "seq2seq": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                "num_heads": 4, "decoder_start_token_id": 0},
    "causal": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512},
}


def tiny_model(spec: ModelSpec) -> ModelSpec:
    if spec.config is not None or (spec.path or "").startswith("builtin:"):
        return spec
    return ModelSpec(name=spec.name, config=dict(TINY[spec.family]), family=spec.family,
                     max_length=min(spec.max_length, 128), head=spec.head)


def _smoke_setup(s: SetupSpec) -> SetupSpec:
    train = s.train.model_copy(update={"epochs": 1, "max_steps": 3, "batch_size": min(s.train.batch_size, 8),
                                       "grad_accum_steps": 1})
    src = s.source_train.model_copy(update={"epochs": 1, "max_steps": 3, "grad_accum_steps": 1,
                                            "batch_size": min(s.source_train.batch_size, 8)}) if s.source_train else None
    res = s.resources.model_copy(update={"gpu": 0, "cpu": 1, "workers": min(s.resources.workers, 2),
                                         "memory_gb": None})
    ds = s.deepspeed.model_copy(update={"precision": "fp32", "offload_optimizer": False, "offload_params": False}) \
        if s.deepspeed else None
    return s.model_copy(update={"name": s.key, "model": tiny_model(s.model), "train": train, "source_train": src,
                                "resources": res, "deepspeed": ds})


def smoke_variant(cfg: ExperimentConfig) -> ExperimentConfig:
    sizes = cfg.sizes.model_copy(update={"source_train": 24, "target_train": 24, "eval": 24})
    return cfg.model_copy(update={"name": f"{cfg.name}-smoke", "seeds": cfg.seeds[:1], "sizes": sizes,
                                  "setups": [_smoke_setup(s) for s in cfg.setups]})
