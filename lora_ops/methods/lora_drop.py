"""``lora_drop``: LoRA-drop (arXiv 2402.07721).

1. calibrate: a short LoRA probe on a stratified sample, then the LoRA output energy
   ``sum ||ΔW x||^2`` of every module over the sample's non-padding tokens;
2. score: energies normalised within each group (same role and shape);
3. decide: per group, keep a dedicated LoRA for the shortest prefix of the ranking that
   reaches ``threshold`` of the group's energy; all other modules of the group share one pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lora_ops.adapters.base import AdapterLayer
from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_scale
from lora_ops.data import BatchSource
from lora_ops.importance.output_energy import OutputEnergyRecorder
from lora_ops.methods.base import Method, MethodContext, PaperTarget, check_rank_fits, register
from lora_ops.methods.lora import own_lora
from lora_ops.methods.recipe import MethodParams
from lora_ops.selection import cumulative_threshold, normalize
from lora_ops.targets import Target, inject, unload
from lora_ops.training.loop import train


class LoRADropParams(MethodParams):
    threshold: float = Field(0.9, gt=0.0, le=1.0, description="cumulative importance kept per group, in (0, 1]")
    probe_epochs: int = Field(1, ge=1, description="epochs of LoRA probe training on the calibration sample")
    probe_lr: float | None = Field(None, gt=0.0, description="probe learning rate (default: train.lr)")


@register
class LoRADrop(Method[LoRADropParams]):
    name = "lora_drop"
    description = "LoRA-drop: output-energy importance, dedicated LoRA for the top modules, one shared LoRA per group"
    params_model = LoRADropParams
    needs_calibration = True
    # the probe reads probe_*, the plan reads threshold; training and merging follow the plan
    stage_settings = {"calibrate": ("probe_epochs", "probe_lr", "recipe"), "decide": ("threshold",),
                      "finetune": ("recipe",)}

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[LoRADropParams]) -> None:
        check_rank_fits(ctx.adapter.rank, targets)

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        me = rows[self.name]
        share = float(me["stored_mean"]) / float(reference["stored_mean"])
        return [PaperTarget(f"{task}: {me['method']} <= 60 % of LoRA's stored params, within 1 pt", -1.0,
                            condition=f"{100 * share:.1f} % of LoRA's stored params (<= 60 %)",
                            condition_met=bool(share <= 0.6))]

    def calibrate(self, model: nn.Module, targets: list[Target], sample: BatchSource,
                  ctx: MethodContext[LoRADropParams]) -> list[dict[str, Any]]:
        params = ctx.params
        torch.manual_seed(ctx.seed)
        # the probe trains whatever the caller left trainable (the task head); restore it afterwards
        trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        layers = inject(model, targets, lambda t, lin: own_lora(lin, ctx))
        try:
            # the run's own config (precision, checkpointing, recipe included) at the probe's budget; the
            # run's max_steps bounds fine-tuning, not the probe, which has probe_epochs of its own
            cfg = dataclasses.replace(ctx.train, epochs=params.probe_epochs, lr=params.probe_lr or ctx.train.lr,
                                      max_steps=None, progress_label="calibrate: probe LoRA")
            train(model, sample, cfg, device=ctx.device)
            recorder = OutputEnergyRecorder(layers)  # type: ignore[arg-type]
            model.eval()
            with torch.no_grad():
                for batch in sample.batches(0):
                    batch = {k: v.to(ctx.device) for k, v in batch.items()}
                    recorder.set_token_mask(batch.get("attention_mask"))
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            recorder.remove()
        finally:
            unload(model, merge=False)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.requires_grad_(trainable_before.get(n, False))
                    if n in saved:
                        p.copy_(saved[n])
        by_name = {t.name: t for t in targets}
        return [
            {"module": n, "group": by_name[n].group, "role": by_name[n].role, "layer": by_name[n].layer,
             "energy": recorder.energy[n], "tokens": recorder.tokens[n]}
            for n in layers
        ]

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[LoRADropParams]) -> list[dict[str, Any]]:
        if not rows:
            raise ValueError("lora_drop needs calibration rows (energy per module); run the calibrate stage")
        out = []
        for group in sorted({r["group"] for r in rows}):
            members = [r for r in rows if r["group"] == group]
            shares = normalize({r["module"]: r["energy"] for r in members})
            for r in members:
                out.append({**r, "importance": shares[r["module"]]})
        return out

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[LoRADropParams]) -> dict[str, Any]:
        params = ctx.params
        plan = super().decide(scores, targets, ctx)
        plan["threshold"] = params.threshold
        groups: dict[str, Any] = {}
        importance = {s["module"]: s["importance"] for s in scores}
        for group in sorted({t.group for t in targets}):
            members = {t.name: importance.get(t.name, 0.0) for t in targets if t.group == group}
            kept = cumulative_threshold(members, params.threshold)
            shared = sorted(set(members) - set(kept))
            if len(shared) == 1:
                # a "shared" pair used by one module is just that module's own adapter: no saving, so
                # the plan says so (mode own) and the counts treat it as retained
                kept, shared = [*kept, *shared], []
            groups[group] = {"retained": kept, "shared": shared,
                             "retained_importance": sum(members[k] for k in kept)}
            for name in shared:
                plan["modules"][name]["mode"] = "shared"
        plan["groups"] = groups
        return plan

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[LoRADropParams]
              ) -> dict[str, AdapterLayer]:
        a = ctx.adapter
        shared_pairs: dict[str, LoRAPair] = {}
        modules = plan["modules"]

        def make(t: Target, lin: nn.Linear) -> LoRALinear | None:
            entry = modules.get(t.name)
            if entry is None:
                return None
            if entry["mode"] == "own":
                return own_lora(lin, ctx)
            pair = shared_pairs.get(t.group)
            if pair is None:
                pair = shared_pairs[t.group] = LoRAPair(lin.in_features, lin.out_features, a.rank)
            return LoRALinear(lin, pair, lora_scale(a.alpha, a.rank, a.rslora), a.dropout)

        return inject(model, targets, make)
