"""``loraprune``: LoRA-guided structured pruning of heads and MLP channels (arXiv 2305.18403).

1. calibrate: read the prunable structure from the model (head counts, widths, exempt layers);
   no data is needed, the sample is ignored;
2. score: passes the structure rows through;
3. decide: the plan with the achievable ratio grid, checked *before* training (errors for a
   ratio the architecture cannot honour, missing LoRA targets);
4. build: masked LoRA on the prunable layers' modules, plain LoRA elsewhere;
5. controller: criterion after backward, EMA, cubic schedule, masks;
6. export: :meth:`LoRAPrune.export_model` slices the pruned model and writes a plain HF folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.lora import LoRAPair, lora_scale
from lora_ops.data import BatchSource
from lora_ops.export import export_lora_family
from lora_ops.methods.base import Method, MethodContext, PeftExport, ShapeMismatch, check_rank_fits, register
from lora_ops.methods.lora import own_lora
from lora_ops.methods.recipe import MethodParams
from lora_ops.pruning.controller import LoRAPruneController, mask_directions
from lora_ops.pruning.export import prune_model, save_pruned
from lora_ops.pruning.importance import get_importance
from lora_ops.pruning.masked import MaskedLoRALinear
from lora_ops.pruning.structure import (
    LayerStructure,
    PruneStructure,
    discover_structure,
    pruning_grid,
)
from lora_ops.targets import Target, inject


class LoRAPruneParams(MethodParams):
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of heads and of MLP channels pruned per prunable layer")
    criterion: Literal["loraprune", "magnitude", "grad"] = Field(
        "loraprune", description="loraprune: |Ĝ⊙(W+sBA)| from LoRA grads; magnitude: |W+sBA|; grad: true dL/dW")
    prune_every: int = Field(10, ge=1, description="optimizer steps between mask updates")
    warmup: float = Field(0.1, ge=0.0, description="steps before pruning starts: a share of the run (< 1) or a "
                                                   "step count (>= 1)")
    cooldown: float = Field(0.1, ge=0.0, description="final steps at the target sparsity: share (< 1) or steps")
    # the scores' EMA (ema 0.9) remembers about 1 / (1 - 0.9) = 10 updates: no mask before it has seen them
    min_score_updates: int = Field(10, ge=0, description="score updates before the first mask, whatever warmup says")
    exempt_first_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="first floor(f*L) layers are not pruned")
    exempt_last: bool = Field(True, description="the last layer is not pruned")
    exempt_layers: list[int] | None = Field(None, description="explicit exempt layer indices (overrides the two above)")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="moving-average factor of the scores")
    gqa_mode: Literal["kv_group", "query_in_group"] = Field(
        "kv_group", description="kv_group: prune whole KV groups; query_in_group: same number of query heads per group")
    exact_final: bool = Field(True, description="final sparsity exactly the grid target (False: official under-pruning)")
    grid_rounding: Literal["nearest", "down", "up", "strict"] = Field(
        "nearest", description="how an off-grid ratio is rounded (nearest: ties prune less; strict: error)")
    prune_heads: bool = Field(True, description="prune attention heads / KV groups")
    prune_mlp: bool = Field(True, description="prune MLP channels")

    @field_validator("warmup", "cooldown")
    @classmethod
    def _share_or_steps(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"must be a share of the steps (< 1) or a whole number of steps, got {v}")
        return v


def structure_for(model: nn.Module, params: LoRAPruneParams) -> PruneStructure:
    return discover_structure(model, params.gqa_mode, params.exempt_first_fraction, params.exempt_last,
                              params.prune_heads, params.prune_mlp, params.exempt_layers)


def structure_from_plan(plan: dict[str, Any]) -> PruneStructure:
    s = plan["structure"]
    layers = [LayerStructure(**ls) for ls in s["layers"]]
    return PruneStructure(s["family"], s["kind"], s["gqa_mode"], s["prune_heads"], s["prune_mlp"], layers)


@register
class LoRAPrune(Method[LoRAPruneParams]):
    name = "loraprune"
    description = "LoRAPrune: LoRA-gradient-guided structured pruning of heads/KV groups and MLP channels"
    params_model = LoRAPruneParams
    needs_calibration = True  # reads the structure from the model; the sample itself is not used
    no_peft_export_reason = ("the base model itself is pruned: use the merged folder (data/merge/model); "
                             "export_peft() gives the LoRA at pruned shapes for an unmerged pruned base")
    compress_skip_reason = ("its product is the pruned base model; its LoRA only lives at the pruned shapes "
                            "and is merged into it")

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[LoRAPruneParams]) -> None:
        check_rank_fits(ctx.adapter.rank, targets)
        try:
            self.plan_model(model, targets, ctx)  # the structure and its ratio grid
        except ValueError as exc:
            raise ShapeMismatch("loraprune", " ".join(str(exc).split())) from None

    def calibrate(self, model: nn.Module, targets: list[Target], sample: BatchSource | None,
                  ctx: MethodContext[LoRAPruneParams]) -> list[dict[str, Any]]:
        structure = structure_for(model, ctx.params)
        return [{"family": structure.family, "kind": structure.kind, "layer": ls.layer, "n_heads": ls.n_heads,
                 "n_kv_heads": ls.n_kv_heads, "head_dim": ls.head_dim, "intermediate": ls.intermediate,
                 "exempt": ls.exempt} for ls in structure.layers]

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[LoRAPruneParams]) -> list[dict[str, Any]]:
        return list(rows)  # scores are computed in the loop; the structure rows go on to decide

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[LoRAPruneParams]) -> dict[str, Any]:
        params = ctx.params
        if not scores:
            raise ValueError("loraprune needs the structure rows from calibrate(model, ...) to plan the grid")
        by_layer: dict[int, dict[str, str]] = {}
        for t in targets:
            by_layer.setdefault(t.layer, {})[t.role] = t.name
        layers = [LayerStructure(r["layer"], by_layer.get(r["layer"], {}), r["n_heads"], r["n_kv_heads"],
                                 r["head_dim"], r["intermediate"], bool(r["exempt"])) for r in scores]
        structure = PruneStructure(scores[0]["family"], scores[0]["kind"], params.gqa_mode, params.prune_heads,
                                   params.prune_mlp, layers)
        missing = sorted({f"{r}" for ls in structure.prunable for r in structure.required_roles()
                          if r not in ls.modules})
        if missing:
            raise ValueError(
                f"loraprune needs LoRA on every module of the pruned groups; adapter targets lack {missing}. "
                f"Set adapter.targets to 'all' (or include {missing}), or switch off prune_heads/prune_mlp")
        grid = pruning_grid(structure, params.ratio, params.grid_rounding)
        plan = super().decide(scores, targets, ctx)
        plan.update({"params": params.model_dump(), "grid": grid, "structure": structure.to_dict()})
        return plan

    def plan_model(self, model: nn.Module, targets: list[Target], ctx: MethodContext[LoRAPruneParams]) -> dict[str, Any]:
        """calibrate + score + decide in one call (no data needed)."""
        rows = self.calibrate(model, targets, None, ctx)
        return self.decide(self.score(rows, targets, ctx), targets, ctx)

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]
              ) -> dict[str, AdapterLayer]:
        structure = structure_from_plan(plan)
        live = structure_for(model, ctx.params)
        if [(ls.n_heads, ls.n_kv_heads, ls.intermediate) for ls in live.layers] != \
                [(ls.n_heads, ls.n_kv_heads, ls.intermediate) for ls in structure.layers]:
            raise ValueError("the model's widths differ from the plan's: re-run decide on this model")
        directions = mask_directions(structure)
        masked_at: dict[str, str] = {}
        for ls in structure.prunable:
            for role, d in directions.items():
                masked_at[ls.modules[role]] = d
        a = ctx.adapter
        planned = plan["modules"]

        def make(t: Target, lin: nn.Linear) -> AdapterLayer | None:
            if t.name not in planned:
                return None
            d = masked_at.get(t.name)
            if d is None:
                return own_lora(lin, ctx)
            pair = LoRAPair(lin.in_features, lin.out_features, a.rank)
            return MaskedLoRALinear(lin, pair, lora_scale(a.alpha, a.rank, a.rslora), a.dropout,
                                    out_mask=d == "out", in_mask=d == "in")

        return inject(model, targets, make)

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]) -> LoRAPruneController:
        params = ctx.params
        layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, MaskedLoRALinear)}
        return LoRAPruneController(layers, structure_from_plan(plan), plan["grid"], get_importance(params.criterion),
                                   warmup=params.warmup, cooldown=params.cooldown, every=params.prune_every,
                                   ema=params.ema, exact_final=params.exact_final,
                                   min_score_updates=params.min_score_updates)

    # ------------------------------------------------------------ accounting
    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """trainable: LoRA; active and stored: model parameters left after pruning + merge."""
        counts = super().parameter_counts(model)
        adapter_ids = {id(p) for layer in adapter_layers(model).values() for _, p in layer.adapter_parameters()}
        dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in adapter_ids)
        removed = 0
        for layer in adapter_layers(model).values():
            if isinstance(layer, MaskedLoRALinear):
                out = int(layer.out_mask.sum()) if layer.out_mask is not None else layer.out_features
                inp = int(layer.in_mask.sum()) if layer.in_mask is not None else layer.in_features
                removed += layer.out_features * layer.in_features - out * inp
                if layer.base.bias is not None:
                    removed += layer.out_features - out
        return {"trainable": counts["trainable"], "active": dense - removed, "stored": dense - removed}

    # ---------------------------------------------------------------- export
    def final_plan(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]) -> dict[str, Any]:
        """The pruning plan read from the masks the model carries (e.g. after loading an adapter state)."""
        ctl = self.controller(model, plan, ctx)
        ctl.masks_from_layers()
        return ctl.plan()

    def merged_model(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]) -> nn.Module:
        # the base class folds LoRA only; a LoRAPrune model without its masks applied is not the trained model
        return self.export_merged(model, plan, ctx)

    def export_merged(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]) -> nn.Module:
        """Heads and channels physically removed, LoRA merged; widths recorded in the config."""
        final = self.final_plan(model, plan, ctx)
        return prune_model(model, final, merge=True)

    def export_model(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams], out_dir: str | Path,
                     tokenizer: Any = None) -> dict[str, Any]:
        """Physically prune (in place), merge LoRA and save a plain HF folder. Returns the pruning info.

        Uniform widths load with stock ``from_pretrained``; others with
        :func:`lora_ops.pruning.load_pruned_model` (``info["stock_loadable"]`` says which).
        """
        final = self.final_plan(model, plan, ctx)
        prune_model(model, final, merge=True)
        return save_pruned(model, out_dir, tokenizer)

    def export_peft(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[LoRAPruneParams]) -> PeftExport:
        """LoRA re-keyed to the *pruned* shapes (apply it to an unmerged pruned base); model unchanged."""
        final = self.final_plan(model, plan, ctx)
        pruned = prune_model(copy.deepcopy(model), final, merge=False)
        return export_lora_family(pruned)
