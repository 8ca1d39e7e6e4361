"""``eva``: PEFT's EVA (Explained Variance Adaptation, Paischer et al., arXiv 2410.07170) as a peer baseline.

EVA is the nearest data-driven peer of LoRA-drop and DoRA-DR that PEFT ships, so it runs through
the same stages and is measured the same way:

1. calibrate: PEFT's own ``get_eva_state_dict`` on the stratified calibration sample LoRA-drop
   uses. It fits an incremental SVD of every target's *input* activations (non-padding tokens
   only) until the top right-singular vectors stop moving (cosine similarity >= ``tau``), then
   redistributes the total rank budget (``rank`` x modules) by explained-variance ratio, at most
   ``round(rank * rho)`` per module. A module can end at rank 0: it gets no adapter.
2. decide: the per-module ranks and the components (rows of ``A``) go into the plan.
3. build: our fused LoRA layers with ``A`` = EVA's components and ``B`` = 0, trained by our loop
   with the same recipe machinery as every LoRA-family method, exported as LoRA + ``rank_pattern``.

Scaling follows PEFT's default ``adjust_scaling_factors=True``: a module whose rank changed from
``r`` to ``r_i`` gets ``alpha_i = alpha * r_i / r``, so every module keeps LoRA's ``alpha / r``.

PEFT is an optional dependency of this method only (``pip install 'lora-sieve[eva]'``).
"""

from __future__ import annotations

import base64
import importlib.util
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lora_ops.adapters.base import AdapterLayer
from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_scale
from lora_ops.data import BatchSource
from lora_ops.methods.base import Method, MethodContext, MissingDependency, register
from lora_ops.methods.recipe import MethodParams
from lora_ops.targets import Target, inject

PEFT_MISSING = "method eva runs PEFT's EVA and PEFT is not installed: pip install 'lora-sieve[eva]' (peft>=0.21,<0.22)"


class EvaParams(MethodParams):
    # EVA paper / PEFT EvaConfig defaults: rho 2 (a module may take up to 2r), tau 0.99
    rho: float = Field(2.0, ge=1.0, description="rank redistribution factor: at most round(rank * rho) per module")
    tau: float = Field(0.99, gt=0.0, le=1.0, description="cosine similarity at which the incremental SVD stops")


def encode_tensor(t: torch.Tensor) -> str:
    """Exact, JSON-safe text form of a float32 tensor's values (base64 of its little-endian bytes)."""
    return base64.b64encode(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).decode("ascii")


def decode_tensor(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    raw = bytearray(base64.b64decode(text.encode("ascii")))
    t = torch.frombuffer(raw, dtype=torch.float32) if raw else torch.zeros(0)
    if t.numel() != int(torch.Size(shape).numel()):
        raise ValueError(f"encoded tensor has {t.numel()} values, shape {shape} needs {torch.Size(shape).numel()}")
    return t.reshape(shape).clone()


def token_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 2) indices of the tokens EVA may see: non-padding, and for causal LMs not label-masked
    (PEFT's ``use_label_mask``); classification labels are per example, so only the mask applies."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels")
    if labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask.nonzero()


def peft_eva_components(model: nn.Module, targets: list[Target], batches: list[dict[str, torch.Tensor]],
                        rank: int, alpha: float, rho: float, tau: float) -> dict[str, torch.Tensor]:
    """PEFT's EVA state dict (module -> components, ``rank_i x in_features``) for ``targets``."""
    try:
        from peft import EvaConfig, LoraConfig
        from peft.tuners.lora.eva import get_eva_state_dict, prepare_layer_inputs_fn_language_modeling
    except ImportError as exc:
        raise MissingDependency(PEFT_MISSING) from exc
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[t.name for t in targets],
                        init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))
    return get_eva_state_dict(
        model, batches, peft_config=config,
        forward_fn=lambda m, inputs: m(**{k: v for k, v in inputs.items() if k != "labels"}),
        prepare_model_inputs_fn=lambda inputs, _config: token_positions(inputs),
        prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
        gather_distributed_inputs=False, show_progress_bar=False)


@register
class EVA(Method[EvaParams]):
    name = "eva"
    description = "PEFT's EVA (peer baseline): ranks and A from SVDs of input activations, rank-0 modules dropped"
    params_model = EvaParams
    needs_calibration = True
    study_peer = True
    stage_settings = {"calibrate": ("rho", "tau"), "decide": (), "finetune": ("recipe",)}

    def check_environment(self) -> None:
        if importlib.util.find_spec("peft") is None:
            raise MissingDependency(PEFT_MISSING)

    def calibrate(self, model: nn.Module, targets: list[Target], sample: BatchSource,
                  ctx: MethodContext[EvaParams]) -> list[dict[str, Any]]:
        params = ctx.params
        batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in sample.batches(0)]
        was_training = model.training
        components = peft_eva_components(model, targets, batches, ctx.adapter.rank, ctx.adapter.alpha,
                                          params.rho, params.tau)
        model.train(was_training)
        rows = []
        for t in targets:
            comp = components.get(t.name)
            if comp is None:
                raise ValueError(f"EVA returned no components for {t.name}")
            rows.append({"module": t.name, "group": t.group, "role": t.role, "layer": t.layer,
                         "rank": int(comp.shape[0]), "in_features": int(comp.shape[1]),
                         "components": encode_tensor(comp)})
        return rows

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[EvaParams]) -> list[dict[str, Any]]:
        if not rows:
            raise ValueError("eva needs calibration rows (EVA components per module); run the calibrate stage")
        total = sum(int(r["rank"]) for r in rows) or 1
        # importance = the module's share of the redistributed rank budget
        return [{**r, "importance": int(r["rank"]) / total} for r in rows]

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[EvaParams]) -> dict[str, Any]:
        plan = super().decide(scores, targets, ctx)
        by_name = {s["module"]: s for s in scores}
        missing = sorted(t.name for t in targets if t.name not in by_name)
        if missing:
            raise ValueError(f"eva: no calibration row for {len(missing)} targets (first: {missing[0]}); rerun calibrate")
        dropped = []
        for t in targets:
            row = by_name[t.name]
            if int(row["rank"]) == 0:  # EVA gave it no component: no adapter at all (PEFT removes the layer)
                del plan["modules"][t.name]
                dropped.append(t.name)
                continue
            plan["modules"][t.name].update(rank=int(row["rank"]), init_A=row["components"])
        plan["ranks"] = {t.name: int(by_name[t.name]["rank"]) for t in targets}
        plan["dropped"] = dropped
        return plan

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[EvaParams]
              ) -> dict[str, AdapterLayer]:
        a = ctx.adapter
        modules = plan["modules"]

        def make(t: Target, lin: nn.Linear) -> LoRALinear | None:
            entry = modules.get(t.name)
            if entry is None:
                return None
            r_i = int(entry["rank"])
            pair = LoRAPair(lin.in_features, lin.out_features, r_i)
            with torch.no_grad():
                pair.A.copy_(decode_tensor(entry["init_A"], (r_i, lin.in_features)))
            # PEFT's adjust_scaling_factors: alpha_i = alpha * r_i / r
            return LoRALinear(lin, pair, lora_scale(a.alpha * r_i / a.rank, r_i, a.rslora), a.dropout)

        return inject(model, targets, make)
