"""``lora``: plain LoRA on every target (the baseline)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_ops.adapters.base import AdapterLayer
from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_scale
from lora_ops.methods.base import Method, MethodContext, NoParams, check_rank_fits, register
from lora_ops.targets import Target, inject


def own_lora(linear: nn.Linear, ctx: MethodContext[Any], layer_cls: type[LoRALinear] = LoRALinear) -> LoRALinear:
    """``linear`` with its own rank-``adapter.rank`` LoRA pair (``layer_cls``: a LoRALinear subclass)."""
    a = ctx.adapter
    pair = LoRAPair(linear.in_features, linear.out_features, a.rank)
    return layer_cls(linear, pair, lora_scale(a.alpha, a.rank, a.rslora), a.dropout)


@register
class LoRA(Method[NoParams]):
    name = "lora"
    description = "plain LoRA on every target module"
    reference = True  # the study measures every other method against plain LoRA

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[NoParams]) -> None:
        check_rank_fits(ctx.adapter.rank, targets)

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[NoParams]
              ) -> dict[str, AdapterLayer]:
        planned = plan["modules"]
        return inject(model, targets, lambda t, lin: own_lora(lin, ctx) if t.name in planned else None)
