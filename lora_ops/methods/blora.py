"""``blora``: Bayesian-LoRA (arXiv 2406.13046), learned rank and bit-width per matrix.

1. calibrate: temporarily inject blora layers (same seeded initialisation as ``build``), run the
   sample with every quantizer recording min/max, remove the layers. Rows carry the ranges.
2. score: none (the gate probabilities are trained by the loss, there is no explicit score).
3. decide: every target gets an adapter; the plan carries each module's calibrated ranges.
4. build: inject :class:`~lora_ops.adapters.blora.BLoRALinear`, apply the planned ranges (or,
   without calibration, fix each range from the first tensor seen).
5. controller: adds ``lambda * sum_Q R_Q`` to the loss; at the end reads ranks, bit-widths, BOPs
   and fails (or warns) when the adapter collapsed.

Spec: ``shared/spec/methods.md`` section 4. Departures from the official code, on purpose: the
gate initialisation is honoured, gates and ranges get no weight decay, the backbone stays
frozen, the base weight is only quantised with ``quantize_base``.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lora_ops.adapters.base import AdapterLayer
from lora_ops.adapters.blora import (
    BLoRALinear,
    blora_layers,
    bops_report,
    export_quantized,
    float_export_gap,
    readout_rows,
)
from lora_ops.adapters.lora import lora_scale
from lora_ops.data import BatchSource
from lora_ops.methods.base import Method, MethodContext, PaperTarget, check_rank_fits, register
from lora_ops.methods.recipe import MethodParams, Recipe
from lora_ops.quant import validate_bits
from lora_ops.targets import Target, inject, unload
from lora_ops.training.controller import Controller


class BLoRAParams(MethodParams):
    lmbda: float = Field(1e-3, description="weight of the gate prior lambda * sum_Q R_Q; must be > 0")
    bits: list[int] = Field(default_factory=lambda: [2, 4, 8, 16, 32],
                            description="nested bit-widths, doubling from 2 (e.g. [2, 4, 8, 16, 32])")
    gate_init: float = Field(2.0, description="initial log-alpha of the bit gates; 2.0 is what the official "
                                              "code effectively uses (P(on)=0.973), its config says 6.0")
    rank_gate_init: float = Field(6.0, description="initial log-alpha of the rank gates (P(on)=0.9995)")
    quantize_base: bool = Field(False, description="also fake-quantise the frozen base weight/bias, base output "
                                                   "and final sum (the paper's setting)")
    learn_ranges: bool = Field(True, description="quantizer ranges trainable (straight-through) after init")
    init_std: float = Field(0.02, gt=0.0, description="std of the A and B initialisation (E ~ N(0, 1))")
    activation_bits_assumed: int = Field(16, ge=1, description="bit-width assumed for unquantised layer inputs "
                                                               "in the BOPs count")
    weight_bits_assumed: int = Field(16, ge=1, description="bit-width of the frozen base weight in BOPs when "
                                                           "quantize_base is off")
    baseline_bits: int = Field(16, ge=1, description="bit-width of the full-rank LoRA baseline for BOPs ratios")
    on_collapse: Literal["error", "warn"] = Field(
        "error", description="what to do when every adapter's quantised update is zero at the end of training")
    # gates: a bit gate must fall from log-alpha 2.0 to the close rule's -2.0 (a rank gate from 6.0), and Adam
    # moves it by about lr per step: at 1e-3 and 500 steps of warm-up + linear decay at most ~0.25, so no gate
    # could ever close. The official config declares gates_lr 1e-2 (unused in its snapshot) for runs ~100x longer;
    # 5e-2 lets an unused gate close within ~150 steps here. Factors and quantiser ranges keep train.lr.
    recipe: Recipe = Field(default_factory=lambda: Recipe(group_lr={"gates": 5e-2}))

    @model_validator(mode="after")
    def _base_gates_lr(self) -> BLoRAParams:
        # base_gates (the frozen path's bit gates) exist only with quantize_base; unset, they train at the gates'
        # lr, so a recipe that names only `gates` behaves as it did before the group was split off
        group_lr = self.recipe.group_lr
        if "base_gates" in group_lr and not self.quantize_base:
            raise ValueError("recipe.group_lr sets base_gates, the frozen path's bit gates, which exist only "
                             "with blora.quantize_base: true; drop base_gates or set quantize_base")
        if self.quantize_base and "base_gates" not in group_lr and "gates" in group_lr:
            self.recipe = self.recipe.model_copy(update={"group_lr": {**group_lr, "base_gates": group_lr["gates"]}})
        return self

    @field_validator("lmbda")
    @classmethod
    def _positive_lambda(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"blora.lmbda must be > 0 (got {v}); the gate prior is what makes ranks and "
                             "bit-widths shrink. Use 1e-3 (the official default) or use method 'lora' instead")
        return v

    @field_validator("bits")
    @classmethod
    def _nested_bits(cls, v: list[int]) -> list[int]:
        return list(validate_bits(v))


class AdapterCollapsed(RuntimeError):
    """Every blora module's quantised update is zero: the fine-tuned adapter does nothing."""


def _module_generator(seed: int, name: str) -> torch.Generator:
    # stable across processes (crc32, not hash()), so calibrate and build draw identical factors
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def make_blora(target: Target, linear: nn.Linear, ctx: MethodContext[BLoRAParams]) -> BLoRALinear:
    p = ctx.params
    a = ctx.adapter
    return BLoRALinear(
        linear, a.rank, lora_scale(a.alpha, a.rank, a.rslora), a.dropout, bits=p.bits, gate_init=p.gate_init,
        rank_gate_init=p.rank_gate_init, quantize_base=p.quantize_base, learn_ranges=p.learn_ranges,
        init_std=p.init_std, generator=_module_generator(ctx.seed, target.name),
    )


def closed_gates(controller_summary: Mapping[str, Any] | None, bits: list[int]) -> dict[str, int] | None:
    """Rank gates closed and bit-width levels dropped, each summed over modules, and their total (None: no
    summary). Counted apart because they say different things: a closed rank gate removes a rank-1 component,
    a dropped bit level only shortens a code."""
    if not controller_summary or not bits:
        return None
    rank = bit = 0
    for row in controller_summary.get("modules", []):
        rank += int(row["max_rank"]) - int(row["rank"])
        bit += sum(len(bits) - 1 - bits.index(int(v)) for k, v in row.items() if k.startswith("bits_"))
    return {"rank_gates_closed": rank, "bit_levels_dropped": bit, "gates_closed": rank + bit}


def _known(value: Any) -> float | None:
    """A study figure as a float; None where a row lacks it (missing, or NaN in a CSV written before it existed)."""
    return None if value is None or math.isnan(float(value)) else float(value)


class BLoRAController(Controller):
    """Adds ``lambda * sum_Q R_Q``; reports ranks, bit-widths and BOPs; checks for collapse."""

    def __init__(self, model: nn.Module, params: BLoRAParams) -> None:
        self.model = model
        self.params = params
        self.layers = blora_layers(model)
        if not self.layers:
            raise ValueError("blora controller: the model has no blora layers (build() not run?)")
        self.ended = False

    def regularizer(self, step: int) -> torch.Tensor:
        return self.params.lmbda * sum(layer.regularizer() for layer in self.layers.values())

    def allows_best(self, step: int) -> bool:
        # a fully collapsed adapter (zero update everywhere) must never be kept as the best state
        return not all(layer.collapsed() for layer in self.layers.values())

    def on_train_end(self) -> None:
        """Checks the state at hand (the loop calls this for the final and again for the best state)."""
        self.ended = True
        collapsed = [n for n, layer in self.layers.items() if layer.collapsed()]
        closed = [n for n, layer in self.layers.items() if layer.all_gates_closed()]
        advice = (f"lower blora.lmbda (now {self.params.lmbda:g}), raise gate_init/rank_gate_init, or "
                  "train with a smaller learning rate")
        if len(collapsed) == len(self.layers):
            msg = f"blora adapter collapsed: all {len(collapsed)} modules have a zero quantised update; {advice}"
            if self.params.on_collapse == "error":
                raise AdapterCollapsed(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        elif collapsed:
            warnings.warn(f"blora: {len(collapsed)} of {len(self.layers)} modules collapsed to a zero update "
                          f"(e.g. {collapsed[0]}); {advice}", RuntimeWarning, stacklevel=2)
        if len(closed) == len(self.layers):
            warnings.warn(f"blora: every gate closed (rank 1, {self.params.bits[0]}-bit) in all modules; {advice}",
                          RuntimeWarning, stacklevel=2)

    def summary(self) -> dict[str, Any]:
        p = self.params
        rows = readout_rows(self.model, p.activation_bits_assumed, p.weight_bits_assumed, p.baseline_bits)
        return {
            "method": "blora",
            "lmbda": p.lmbda,
            "quantize_base": p.quantize_base,
            "modules": rows,
            "bops": bops_report(self.model, p.activation_bits_assumed, p.weight_bits_assumed, p.baseline_bits),
            "mean_rank": sum(r["rank"] for r in rows) / len(rows),
            "collapsed_modules": sum(r["collapsed"] for r in rows),
        }

    def state_dict(self) -> dict[str, Any]:
        # gates, ranges and factors live in the model (trainable state); only settings are kept here
        return {"lmbda": self.params.lmbda, "bits": list(self.params.bits), "ended": self.ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("lmbda") != self.params.lmbda or state.get("bits") != list(self.params.bits):
            raise ValueError(f"blora checkpoint was written with lmbda={state.get('lmbda')}, bits={state.get('bits')}; "
                             f"this run has lmbda={self.params.lmbda}, bits={self.params.bits}: delete it to start over")
        self.ended = bool(state.get("ended", False))


@register
class BLoRA(Method[BLoRAParams]):
    name = "blora"
    description = "Bayesian-LoRA: SVD-form LoRA with hard-concrete rank and bit-width gates, BOPs accounting"
    params_model = BLoRAParams
    # gates: the adapter's bit and rank log-alphas; base_gates: the frozen path's bit gates (quantize_base)
    parameter_groups = ("adapter", "gates", "base_gates", "ranges", "head")
    needs_calibration = True
    scored_unmerged_reason = ("its artifact is the integer export (data/finetune extras): the fake-quantised "
                              "layers are what it stores and what its BOPs count, while the float merge drops "
                              "the quantisers")
    figure_labels = {"bops_ratio_adapter": "adapter BOPs vs 16-bit LoRA",
                     "bops_ratio_total": "base + adapter BOPs vs 16-bit LoRA", "gates_closed": "gates closed",
                     "rank_gates_closed": "rank gates closed", "bit_levels_dropped": "bit levels dropped"}

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[BLoRAParams]) -> None:
        check_rank_fits(ctx.adapter.rank, targets)

    def calibrate(self, model: nn.Module, targets: list[Target], sample: BatchSource,
                  ctx: MethodContext[BLoRAParams]) -> list[dict[str, Any]]:
        """Min/max of every quantizer's input over the whole sample (not just the first batch)."""
        trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        layers = inject(model, targets, lambda t, lin: make_blora(t, lin, ctx))
        batches = 0
        try:
            for layer in layers.values():
                layer.set_observing(True)
            model.eval()
            with torch.no_grad():
                for batch in sample.batches(0):
                    model(**{k: v.to(ctx.device) for k, v in batch.items() if k != "labels"})
                    batches += 1
            ranges = {n: layer.observed_ranges() for n, layer in layers.items()}  # type: ignore[union-attr]
        finally:
            unload(model, merge=False)
            for n, p in model.named_parameters():
                p.requires_grad_(trainable_before.get(n, False))
            model.train(was_training)
        by_name = {t.name: t for t in targets}
        return [{"module": n, "group": by_name[n].group, "role": by_name[n].role, "layer": by_name[n].layer,
                 "ranges": ranges[n], "batches": batches} for n in layers]

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[BLoRAParams]) -> dict[str, Any]:
        plan = super().decide(scores, targets, ctx)
        plan["params"] = ctx.params.model_dump()
        plan["seed"] = ctx.seed
        ranges = {r["module"]: r["ranges"] for r in scores if "ranges" in r}
        for name, entry in plan["modules"].items():
            if name in ranges:
                entry["ranges"] = ranges[name]
        plan["range_source"] = "calibration" if ranges else "first tensor seen"
        return plan

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[BLoRAParams]) -> list[dict[str, Any]]:
        # no importance score: the calibration rows (ranges) pass through to decide()
        return list(rows)

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[BLoRAParams]
              ) -> dict[str, AdapterLayer]:
        modules = plan["modules"]

        def make(t: Target, lin: nn.Linear) -> BLoRALinear | None:
            entry = modules.get(t.name)
            if entry is None:
                return None
            layer = make_blora(t, lin, ctx)
            if entry.get("ranges"):
                layer.set_ranges(entry["ranges"])
            return layer

        return inject(model, targets, make)

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[BLoRAParams]) -> Controller:
        return BLoRAController(model, ctx.params)

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        counts = super().parameter_counts(model)
        counts["stored"] = counts["active"]  # r_eff (in + out + 1) per module; scales and ranges not counted
        return counts

    def extra_exports(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[BLoRAParams]
                      ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        return {"quantized": self.export_quantized(model)}

    def evaluation_extras(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[BLoRAParams],
                          batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        p = ctx.params
        gap = self.float_export_gap(model, batches, ctx.device)
        bops = bops_report(model, p.activation_bits_assumed, p.weight_bits_assumed, p.baseline_bits)
        out = {f"float_export_{k}": float(v) for k, v in gap.items() if isinstance(v, (int, float))}
        out.update({f"bops_{k}": float(v) for k, v in bops.items() if isinstance(v, (int, float))})
        return out

    # ----------------------------------------------------------------- study
    def report_figures(self, controller_summary: Mapping[str, Any] | None, params: BLoRAParams
                       ) -> dict[str, float | None]:
        closed = closed_gates(controller_summary, list(params.bits))
        return dict(closed) if closed is not None else {"gates_closed": None}

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        me = rows[self.name]
        ratio, closed = float(me["bops_ratio_adapter"]), float(me["gates_closed"])
        rank, bit, total = (_known(me.get(k)) for k in ("rank_gates_closed", "bit_levels_dropped", "bops_ratio_total"))
        apart = f": {rank:.0f} rank, {bit:.0f} bit" if rank is not None and bit is not None else ""
        with_base = f", {total:.3f}x with the base" if total is not None else ""
        return [PaperTarget(f"{task}: blora within 1 pt at <= 0.5x a 16-bit LoRA's adapter BOPs, gates closed",
                            -1.0, condition=f"{ratio:.3f}x adapter BOPs (<= 0.5x){with_base}, {closed:.0f} gates "
                                            f"closed (> 0){apart}",
                            condition_met=bool(ratio <= 0.5 and closed > 0))]

    # ----------------------------------------------------- blora-only verbs
    def export_quantized(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Deployable integer form: see :func:`lora_ops.adapters.blora.export_quantized`."""
        return export_quantized(model)

    def float_export_gap(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                         device: str | None = None) -> dict[str, float]:
        """Logit difference between the float PEFT export and the quantised model."""
        return float_export_gap(model, batches, device)
