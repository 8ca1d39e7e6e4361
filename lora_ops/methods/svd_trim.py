"""``svd_trim``: plain LoRA, then each module's update trimmed post hoc by SVD energy (peer baseline).

This is what a PEFT user gets from ``convert_to_lora(model, rank=<float>)`` / ``save_as_lora`` after
training: every module's ``ΔW = s B A`` is replaced by its truncated SVD at the smallest rank that
keeps ``energy`` of its singular-value energy, without further training. It is the post-hoc
counterpart of the methods that decide ranks *before* or *while* training (LoRA-drop, EVA, DoRA-DR).

Training is LoRA's, bit for bit (same plan, same seeds, same recipe). When training ends (after
the best epoch's state is restored) the controller trims every pair in place: rows ``k..r`` of
``A`` and columns ``k..r`` of ``B`` become exact zeros, so the saved adapter keeps LoRA's shapes
and loads anywhere LoRA's does, while accounting and export use the trimmed rank ``k`` (a module
trimmed to rank 0 is left out of the PEFT export).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.lora import LoRALinear
from lora_ops.compress.trim import decompose_svd
from lora_ops.methods.base import Method, MethodContext, register
from lora_ops.methods.lora import own_lora
from lora_ops.methods.recipe import MethodParams
from lora_ops.targets import Target, inject
from lora_ops.training.controller import Controller


class SvdTrimParams(MethodParams):
    # PEFT convert_to_lora: a float rank in (0, 1] is this energy threshold; 0.9 keeps 90 % of Σ S²
    energy: float = Field(0.9, gt=0.0, le=1.0, description="share of each update's singular-value energy kept")


class TrimmableLoRALinear(LoRALinear):
    """A LoRA layer whose pair may have been trimmed to its first ``trimmed_rank`` components."""

    method = "svd_trim"

    def trimmed_rank(self) -> int:
        """Leading components in use: rows of ``A`` up to the last non-zero one (all of them before a trim)."""
        nonzero = (self.lora.A.detach() != 0).any(dim=1) | (self.lora.B.detach() != 0).any(dim=0)
        idx = torch.nonzero(nonzero).flatten()
        return int(idx[-1]) + 1 if idx.numel() else 0

    def trim(self, energy: float) -> int:
        """Replace the pair by the truncated SVD of this layer's update, zero-padded to its shape.

        The decomposition is the compress stage's ``rank: svd`` (factor space, float64) and the rule its
        ``budget: energy``: ``svd_trim`` is LoRA followed by that setting, computed by the same code."""
        with torch.no_grad():
            d = decompose_svd(self.lora.A, self.lora.B, self.scale)
            k = d.rank_at_energy(energy)
            a, b = d.factors(k, scaling=self.scale)  # scale · B' A' is the rank-k truncation
            self.lora.A.zero_()
            self.lora.B.zero_()
            if k:
                self.lora.A[:k] = a.to(self.lora.A.dtype)
                self.lora.B[:, :k] = b.to(self.lora.B.dtype)
        return k

    def num_active(self) -> int:
        return self.trimmed_rank() * (self.in_features + self.out_features)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        k = self.trimmed_rank()
        return self.lora.A.detach()[:k], self.lora.B.detach()[:, :k], self.scale


class TrimController(Controller):
    """Trims every layer when training ends (called again after the best state is restored: that
    state is LoRA's untrimmed one, so each trim starts from a trained update, never from a trimmed one)."""

    def __init__(self, layers: dict[str, TrimmableLoRALinear], energy: float) -> None:
        self.layers, self.energy = layers, energy
        self.ranks: dict[str, int] = {}

    def on_train_end(self) -> None:
        self.ranks = {name: layer.trim(self.energy) for name, layer in self.layers.items()}

    def summary(self) -> dict[str, Any]:
        ranks = self.ranks or {n: layer.trimmed_rank() for n, layer in self.layers.items()}
        return {"energy": self.energy, "ranks": ranks, "dropped": sorted(n for n, k in ranks.items() if k == 0),
                "mean_rank": sum(ranks.values()) / max(len(ranks), 1)}


@register
class SvdTrim(Method[SvdTrimParams]):
    name = "svd_trim"
    description = "plain LoRA trimmed after training to the rank keeping `energy` of each update's SVD energy"
    params_model = SvdTrimParams
    study_peer = True
    stage_settings = {"decide": (), "finetune": ("energy", "recipe")}

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[SvdTrimParams]
              ) -> dict[str, AdapterLayer]:
        planned = plan["modules"]
        return inject(model, targets,
                      lambda t, lin: own_lora(lin, ctx, TrimmableLoRALinear) if t.name in planned else None)

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[SvdTrimParams]) -> Controller:
        params = ctx.params
        layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, TrimmableLoRALinear)}
        return TrimController(layers, params.energy)

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        counts = super().parameter_counts(model)
        return {**counts, "stored": counts["active"]}  # trainable: LoRA's; stored: the trimmed ranks
