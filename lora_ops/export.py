"""Export adapters in PEFT's on-disk format.

Every LoRA-shaped adapter (plain, shared, rank-allocated) is written as plain LoRA: one
``lora_A``/``lora_B`` pair per module (shared pairs cloned, since safetensors forbids
aliasing), with per-module ``rank_pattern``/``alpha_pattern`` where ranks or scales differ.
Modules at rank 0 are left out of ``target_modules`` rather than written empty.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from lora_ops.adapters.base import adapter_layers

PREFIX = "base_model.model."


def export_lora_family(model: nn.Module, extra_tensors: dict[str, torch.Tensor] | None = None
                       ) -> PeftExport:  # noqa: F821 (forward ref resolved below)
    from lora_ops.methods.base import PeftExport

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
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().clone().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().clone().contiguous()
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
