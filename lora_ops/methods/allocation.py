"""Shared verbs of the rank allocators (DoRA-DR, AdaLoRA): ranks, plan, injection, accounting."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import Field
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.lora import lora_scale
from lora_ops.methods.base import Method, MethodContext, ShapeMismatch, narrowest_targets, shape_examples
from lora_ops.methods.recipe import MethodParams
from lora_ops.rank_allocation import allocation_ranks
from lora_ops.targets import Target, inject


class AllocationParams(MethodParams):
    """What every allocator's params section has: the initial rank r0 (subclasses redeclare both fields,
    first, with their own descriptions)."""

    initial_rank_factor: float = Field(1.5, gt=0.0, description="r0 = ceil(factor * adapter.rank)")
    initial_rank: int | None = Field(None, ge=1, description="explicit r0 (overrides initial_rank_factor)")


A = TypeVar("A", bound=AllocationParams)


class RankAllocationMethod(Method[A]):
    """A method that starts every module at rank r0 and prunes components to a global budget in training.

    ``adapter.rank`` is the target rank; ``r0 = ceil(initial_rank_factor * rank)`` unless the
    method's params give ``initial_rank``. Subclasses name the layer class and the controller.
    """

    layer_cls: ClassVar[type[AdapterLayer]]
    parameter_groups = ("adapter", "gates", "head")  # gates: DoRA-DR's c, AdaLoRA's E (start at zero)

    def ranks(self, ctx: MethodContext[A]) -> tuple[int, int]:
        """``(r0, r_target)``; raises before training for impossible budgets."""
        p = ctx.params
        return allocation_ranks(ctx.adapter.rank, p.initial_rank_factor, p.initial_rank)

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[A]) -> None:
        """The initial rank r0 must fit every target (and exceed the target rank)."""
        try:
            r0, _ = self.ranks(ctx)
        except ValueError as exc:
            raise ShapeMismatch(f"adapter.rank / {self.name}", str(exc)) from None
        narrowest, tight = narrowest_targets(targets)
        if r0 > narrowest:
            raise ShapeMismatch(f"adapter.rank / {self.name}.initial_rank",
                                f"the initial rank r0 = {r0} is above min(in, out) = {narrowest} of e.g. "
                                f"{shape_examples(tight)}: lower adapter.rank or {self.name}.initial_rank_factor "
                                f"so that r0 <= {narrowest}")

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[A]) -> dict[str, Any]:
        r0, rt = self.ranks(ctx)
        plan = super().decide(scores, targets, ctx)
        for entry in plan["modules"].values():
            entry["initial_rank"] = r0
        # final ranks are only known after training: the controller's summary() carries them
        plan.update({"initial_rank": r0, "target_rank": rt, "target_budget": rt * len(plan["modules"]),
                     "schedule": ctx.params.model_dump()})
        return plan

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[A]
              ) -> dict[str, AdapterLayer]:
        r0, _ = self.ranks(ctx)
        a = ctx.adapter
        scale = lora_scale(a.alpha, r0, a.rslora)  # alpha / r0 from the initial rank, fixed
        planned = plan["modules"]
        return inject(model, targets,
                      lambda t, lin: self.layer_cls(lin, r0, scale, a.dropout) if t.name in planned else None)

    def allocation_layers(self, model: nn.Module) -> dict[str, AdapterLayer]:
        return {n: m for n, m in adapter_layers(model).items() if isinstance(m, self.layer_cls)}

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """trainable M r0 (in+out+1); active = stored = kept components x (in+out) (gate folded into B)."""
        layers = adapter_layers(model).values()
        trainable = sum(p.numel() for layer in layers for _, p in layer.adapter_parameters())
        active = sum(layer.num_active() for layer in layers)
        return {"trainable": trainable, "active": active, "stored": active}
