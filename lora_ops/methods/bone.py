"""``bone`` and ``bat``: block-affine adapters (arXiv 2409.15371), PEFT's MiSS ``True`` / ``"bat"``.

Fixed structure: calibrate and score have nothing to do (base defaults return no rows);
decide records that, the block size, and for Bat checks divisibility of every target before
any training starts. Export writes PEFT's MiSS format (``miss_block`` per module).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import Field
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.bone import BatLinear, BoneLinear
from lora_ops.export import PREFIX
from lora_ops.methods.base import (
    Method,
    MethodContext,
    PaperTarget,
    PeftExport,
    ShapeMismatch,
    register,
)
from lora_ops.methods.recipe import MethodParams, Recipe
from lora_ops.targets import Target, inject


class BoneParams(MethodParams):
    # 16 gives the same trainable parameter count as LoRA r=8 on MiniLM (all six linear types)
    block_size: int = Field(16, ge=1, description="block size b (PEFT MiSS `r`); trainable params = b * d_out")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on x before the shard sum (PEFT miss_dropout)")
    # one Bone step moves the weight 6-12x more than a LoRA step at the same lr (the block's gradient sums
    # every input shard); the authors and PEFT's MiSS benchmark train at 1e-4 or below. 2e-4: LoRA's 1e-3
    # over ~6, scaled up a little for our short budget (the study sweeps it)
    recipe: Recipe = Field(default_factory=lambda: Recipe(lr=2e-4))


class BatParams(MethodParams):
    block_size: int = Field(16, ge=1, description="block size b; must divide in and out features of every target")
    # PEFT's Bat forward ignores miss_dropout; accepting a non-zero value would silently do nothing
    dropout: float = Field(0.0, ge=0.0, le=0.0, description="must be 0: Bat has no dropout (PEFT ignores it)")
    recipe: Recipe = Field(default_factory=lambda: Recipe(lr=2e-4))  # as Bone (same step-size argument)


B = TypeVar("B", BoneParams, BatParams)


class _BlockMethod(Method[B]):
    """Shared plumbing of Bone and Bat: fixed plan, one block per target, MiSS export."""

    peft_init_weights: ClassVar[bool | str]
    # a Bone/Bat block is not a product of two low-rank factors: there are no components to trim
    compress_skip_reason: ClassVar[str] = "its block update has no low-rank LoRA form to trim or quantise"

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[B]) -> dict[str, Any]:
        plan = super().decide(scores, targets, ctx)
        plan["block_size"] = ctx.params.block_size
        plan["note"] = "fixed structure: nothing to calibrate, score or decide; every target gets a block"
        return plan

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[B]) -> None:
        try:
            self.decide([], targets, ctx)  # the block-size rules live in decide
        except ValueError as exc:
            raise ShapeMismatch(f"{self.name}.block_size", " ".join(str(exc).split())) from None

    def _make(self, linear: nn.Linear, ctx: MethodContext[B]) -> AdapterLayer:
        raise NotImplementedError

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[B]
              ) -> dict[str, AdapterLayer]:
        planned = plan["modules"]
        return inject(model, targets, lambda t, lin: self._make(lin, ctx) if t.name in planned else None)

    def export_peft(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[B]) -> PeftExport:
        layers = adapter_layers(model)
        if not layers:
            raise ValueError(f"no {self.name} adapters in this model: nothing to export")
        sizes = {layer.block_size for layer in layers.values()}  # type: ignore[attr-defined]
        if len(sizes) != 1:
            raise ValueError(f"PEFT's MiSS format has one block size per adapter, found {sorted(sizes)}")
        dropouts = {getattr(layer, "dropout", 0.0) for layer in layers.values()}
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            if layer.method != self.name:
                raise TypeError(f"{name} carries a {layer.method!r} adapter, not {self.name!r}")
            block: torch.Tensor = layer.block  # type: ignore[assignment]
            tensors[f"{PREFIX}{name}.miss_block"] = block.detach().float().cpu().clone().contiguous()
        config: dict[str, Any] = {
            "peft_type": "MISS",
            "r": sizes.pop(),
            "init_weights": self.peft_init_weights,
            "mini_r": 1,
            "miss_dropout": max(dropouts),
            "target_modules": sorted(layers),
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        }
        return PeftExport(config=config, tensors=tensors)


@register
class Bone(_BlockMethod[BoneParams]):
    name = "bone"
    description = "Bone: one zero-initialised b x d_out block shared by all input shards (PEFT MiSS)"
    params_model = BoneParams
    peft_init_weights = True

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[BoneParams]) -> dict[str, Any]:
        b = ctx.params.block_size
        narrow = [f"{t.name} (in={t.in_features})" for t in targets if t.in_features < b]
        if narrow:  # PEFT refuses r > in_features too; fail before training, not at build
            raise ValueError(f"Bone block size {b} exceeds the input width of {', '.join(narrow[:3])}")
        return super().decide(scores, targets, ctx)

    def _make(self, linear: nn.Linear, ctx: MethodContext[BoneParams]) -> AdapterLayer:
        p = ctx.params
        return BoneLinear(linear, p.block_size, p.dropout)

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        return [PaperTarget(f"{task}: bone within 1 pt of lora (equal params)", -1.0)]


@register
class Bat(_BlockMethod[BatParams]):
    name = "bat"
    description = "Bat: Bone with the weight guide, W'_ij = W_ij (I + D_i) + D_i (PEFT MiSS init_weights='bat')"
    params_model = BatParams
    peft_init_weights = "bat"

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[BatParams]) -> dict[str, Any]:
        b = ctx.params.block_size
        # fail at planning time, not after the base model is loaded for fine-tuning
        bad = [f"{t.name} ({t.out_features}x{t.in_features})" for t in targets
               if t.in_features % b or t.out_features % b]
        if bad:
            raise ValueError(
                f"Bat block size {b} must divide in and out features of every target; it does not for "
                f"{len(bad)} module(s), e.g. {', '.join(bad[:3])}. Choose a common divisor or fewer targets."
            )
        return super().decide(scores, targets, ctx)

    def _make(self, linear: nn.Linear, ctx: MethodContext[BatParams]) -> AdapterLayer:
        return BatLinear(linear, ctx.params.block_size)

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        if "bone" not in rows:
            return []
        return [PaperTarget(f"{task}: bat >= bone", 0.0, against="bone")]
