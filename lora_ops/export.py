"""Export adapters in PEFT's on-disk format.

Every LoRA-shaped adapter (plain, shared, rank-allocated) is written as plain LoRA: one
``lora_A``/``lora_B`` pair per module (shared pairs cloned, since safetensors forbids
aliasing), with per-module ``rank_pattern``/``alpha_pattern`` where ranks or scales differ.
Modules at rank 0 are left out of ``target_modules`` rather than written empty.

:func:`serve_safe` rewrites such an export so that it needs neither pattern: serving engines
that read only the global ``r`` and ``lora_alpha`` (vLLM's PEFT loader, for one) apply one
scaling to every module and would silently serve a rank-heterogeneous adapter wrong.

This module owns the export format (:class:`PeftExport` lives here); the method interface
imports it, never the other way round.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_ops.adapters.base import adapter_layers

PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class PeftExport:
    """An adapter in PEFT's on-disk form (written by the merge stage)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def export_lora_family(model: nn.Module, extra_tensors: dict[str, torch.Tensor] | None = None) -> PeftExport:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in adapter_layers(model).items():
        as_lora = getattr(layer, "as_lora", None)
        if as_lora is None:
            raise TypeError(f"{type(layer).__name__} at {name} cannot be exported as plain LoRA")
        a, b, scale = as_lora()
        rank = a.shape[0]
        if rank == 0:
            continue
        tensors[f"{PREFIX}{name}{_A}"] = a.detach().float().cpu().clone().contiguous()
        tensors[f"{PREFIX}{name}{_B}"] = b.detach().float().cpu().clone().contiguous()
        ranks[name] = rank
        alphas[name] = float(scale) * rank
    if not ranks:
        raise ValueError("every adapter has rank 0: nothing to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): k for n, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "fan_in_fan_out": False,
    }
    if extra_tensors:
        tensors.update({f"{PREFIX}{k}": v.detach().cpu().clone().contiguous() for k, v in extra_tensors.items()})
    return PeftExport(config=config, tensors=tensors)


# --------------------------------------------------------------------------- serve-safe form

def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's reading of a ``rank_pattern``/``alpha_pattern`` key: a regex matched against the
    end of the module's qualified name, on a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module):
            return value
    return default


def module_scalings(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, float]:
    """The scaling PEFT applies to each module (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA),
    with the patterns honoured; ``ranks`` are the modules' real ranks (from the tensors)."""
    out: dict[str, float] = {}
    for module, rank in ranks.items():
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        if r != rank:
            raise ValueError(f"{module}: lora_A has {rank} rows but the config says rank {r}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        out[module] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return out


def serve_safe(export: PeftExport) -> tuple[PeftExport, dict[str, Any]]:
    """The same adapter with one global rank and one global scaling, exact for any loader.

    Every module is zero-padded to the largest rank ``R`` (extra rows of A and columns of B are
    zero, so ``B A`` is unchanged), and its own scaling ``s_i`` is folded into B as
    ``B * s_i / s`` where ``s = lora_alpha / R`` is the global scaling. ``s`` is the most common
    ``s_i`` so a homogeneous adapter keeps its factors bit for bit. Tensors other than LoRA
    factors (``modules_to_save`` heads) pass through. Returns the export and a size report
    (``padding_bytes``: what the zero padding adds to the file).
    """
    config = export.config
    if config.get("peft_type") != "LORA":
        raise ValueError(f"serve-safe export needs a LoRA adapter, got peft_type {config.get('peft_type')!r}")
    modules = [k[len(PREFIX):-len(_A)] for k in export.tensors if k.startswith(PREFIX) and k.endswith(_A)]
    if not modules:
        raise ValueError("the export has no lora_A/lora_B pairs")
    ranks = {m: export.tensors[f"{PREFIX}{m}{_A}"].shape[0] for m in modules}
    scalings = module_scalings(config, ranks)
    top = max(ranks.values())
    # most common scaling, ties to the largest: deterministic whatever the tensor order
    counts = Counter(scalings.values())
    scale = max(counts, key=lambda s: (counts[s], s))
    if scale == 0:
        raise ValueError("every module has scaling 0: nothing to serve")

    tensors = {k: v for k, v in export.tensors.items() if not (k.endswith(_A) or k.endswith(_B))}
    padded = 0
    padding_bytes = 0
    lora_bytes = 0
    for m in sorted(modules):
        a, b = export.tensors[f"{PREFIX}{m}{_A}"], export.tensors[f"{PREFIX}{m}{_B}"]
        r = ranks[m]
        if b.shape[1] != r:
            raise ValueError(f"{m}: lora_B has {b.shape[1]} columns but lora_A has {r} rows")
        factor = scalings[m] / scale
        # fold in float64 and cast once: one rounding of B instead of two
        b_scaled = b if factor == 1.0 else (b.double() * factor).to(b.dtype)
        a_pad = a.new_zeros(top, a.shape[1])
        a_pad[:r] = a
        b_pad = b.new_zeros(b.shape[0], top)
        b_pad[:, :r] = b_scaled
        tensors[f"{PREFIX}{m}{_A}"] = a_pad.contiguous()
        tensors[f"{PREFIX}{m}{_B}"] = b_pad.contiguous()
        extra = (top - r) * (a.shape[1] + b.shape[0])
        padded += extra
        padding_bytes += extra * a.element_size()
        lora_bytes += (a_pad.numel() + b_pad.numel()) * a.element_size()
    new_config = {**config, "r": top, "lora_alpha": scale * top, "target_modules": sorted(modules),
                  "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    report = {"r": top, "lora_alpha": scale * top, "scaling": scale, "modules": len(modules),
              "ranks_before": dict(Counter(ranks.values())), "modules_rescaled": sum(
                  1 for m in modules if scalings[m] != scale),
              "padded_params": padded, "padding_bytes": padding_bytes, "lora_bytes": lora_bytes,
              "lora_bytes_without_padding": lora_bytes - padding_bytes}
    return PeftExport(config=new_config, tensors=tensors), report
