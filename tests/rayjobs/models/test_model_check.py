"""Preflight model check: builtin, local folder and cached models pass; anything else is one
`ModelError` before Ray starts, quickly (offline: no request at all)."""

from __future__ import annotations

import time

import pytest

from rayjobs.models.check import check_model_available, in_hf_cache
from rayjobs.models.loading import ModelError


def _fake_cache(root, repo_id: str, with_config: bool = True):
    """The layout huggingface_hub writes: models--ORG--NAME/refs/main -> snapshots/<rev>/config.json."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    if with_config:
        (snap / "config.json").write_text("{}")
    return root


def test_builtin_and_local_folder_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_available("builtin:minilm")
    check_model_available(str(tmp_path))  # an existing folder: transformers reads it directly


def test_cached_hub_id_passes_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _fake_cache(tmp_path / "hub", "someorg/tiny-model")
    assert in_hf_cache("someorg/tiny-model", cache)
    check_model_available("someorg/tiny-model", cache_dir=cache)


def test_cache_without_config_does_not_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _fake_cache(tmp_path / "hub", "someorg/partial", with_config=False)
    assert not in_hf_cache("someorg/partial", cache)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        check_model_available("someorg/partial", cache_dir=cache)


def test_unknown_id_offline_fails_without_a_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"'nosuchorg/nosuchmodel' is not a local folder and not in the Hugging Face"):
        check_model_available("nosuchorg/nosuchmodel", cache_dir=tmp_path)
    assert time.monotonic() - t0 < 2.0


def test_unknown_id_online_fails_within_the_timeout(tmp_path, monkeypatch):
    """This workplace cannot reach the hub, so the request fails (DNS or timeout): one error, no retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="the hub does not serve it"):
        check_model_available("nosuchorg/nosuchmodel-xyz", timeout_s=2.0, cache_dir=tmp_path)
    assert time.monotonic() - t0 < 10.0


@pytest.mark.parametrize("path, message", [
    ("builtin:nope", "unknown builtin model 'nope'"),
    ("./no/such/folder", "does not exist"),
    ("a/b/c/d", "the hub does not serve it"),  # not a valid repo id: never looked up
])
def test_bad_paths_are_model_errors(path, message, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=message):
        check_model_available(path, timeout_s=2.0, cache_dir=tmp_path)
