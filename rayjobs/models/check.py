"""Preflight check that a model can be loaded before any Ray worker tries.

Why: a hub id that is neither local nor reachable otherwise fails inside every trial, each one
retrying the hub for about a minute and ending in a traceback. Checked once on the driver, it is
one `ModelError` line (exit 2). The order is cheapest first: builtin, local folder, the local
Hugging Face cache, and only then one short request to the hub (never when HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import os
from pathlib import Path

from rayjobs.models.loading import ModelError, resolve_path

HUB_TIMEOUT_S = 5.0
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: the hub is unreachable by definition."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hf_cache(repo_id: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the model's config.json is in the local Hugging Face cache (what an offline load needs)."""
    from huggingface_hub import try_to_load_from_cache  # lazy: huggingface_hub only when exporting a model

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - an id the hub would reject (bad characters, too many slashes) is not cached
        return False
    return isinstance(found, str) and Path(found).is_file()


def check_model_available(path: str, timeout_s: float = HUB_TIMEOUT_S,
                          cache_dir: str | os.PathLike | None = None) -> None:
    """Return if `path` can be loaded (builtin, local folder, cached, or on a reachable hub); else `ModelError`.

    `cache_dir` defaults to the Hugging Face cache that transformers uses (HF_HUB_CACHE / HF_HOME).
    """
    resolved = resolve_path(path)  # builtin:* and paths that look local: ModelError when missing
    if path.startswith("builtin:") or Path(resolved).is_dir():
        return
    if in_hf_cache(path, cache_dir):
        return
    where = f"model {path!r} is not a local folder and not in the Hugging Face cache"
    if hub_offline():
        raise ModelError(f"{where}, and HF_HUB_OFFLINE is set: download it first or give a local folder")
    from huggingface_hub import model_info  # lazy: huggingface_hub only when exporting a model

    try:
        model_info(path, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - not found, gated, DNS, timeout: each means the trials cannot load it
        reason = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
        raise ModelError(f"{where}, and the hub does not serve it ({type(e).__name__}: {reason[:200]})") from None
