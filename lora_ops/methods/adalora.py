"""``adalora``: AdaLoRA (Zhang et al., ICLR 2023; spec §6) as the baseline allocator.

``ΔW = (α/r0) P diag(E) Q``. The controller keeps, for every entry ``w`` of P, E and Q,
EMAs of the sensitivity ``I = |w · ∂L/∂w|`` and of its uncertainty ``|I - Ī|`` (both 0.85),
scores each triplet as ``s(λ_k) + mean_i s(P_ik) + mean_j s(Q_kj)`` with ``s = Ī · Ū``,
keeps the global top-``b(t)`` triplets on the cubic budget every ``delta_t`` steps, freezes
the pattern at ``T - tfinal`` and adds the orthogonality regulariser (the reference code's
non-squared Frobenius norm, averaged over all P and Q, times ``orth_reg_weight``).

Unlike PEFT, the training loop calls the allocation itself: it cannot be forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lora_ops import distributed as dist
from lora_ops.adapters.adalora import AdaLoRALinear
from lora_ops.methods.allocation import AllocationParams, RankAllocationMethod
from lora_ops.methods.base import MethodContext, PaperTarget, register
from lora_ops.methods.recipe import Recipe
from lora_ops.rank_allocation import (
    RankAllocationController,
    StepSpec,
    adalora_budget,
    check_step_spec,
    resolve_step,
)


class AdaLoRAParams(AllocationParams):
    """``params[adalora]``. Steps: a float in [0, 1] is a fraction of the run, an int a step count."""

    initial_rank_factor: float = Field(1.5, gt=0.0, description="r0 = ceil(factor * adapter.rank) (PEFT 12 -> 8)")
    initial_rank: int | None = Field(None, ge=1, description="explicit r0 (overrides initial_rank_factor)")
    # official GLUE script for SST-2 (QingruZhang/AdaLoRA; DeBERTaV3-base, 24 epochs, ~50,500 steps): t_i 6000,
    # t_f 22000, deltaT 100, gamma 0.1, lr 8e-4. The phases scale as shares of the run (0.12, 0.44); deltaT
    # scales to 1 step (~225 reallocations there, one per step here, PEFT's default too)
    tinit: StepSpec = Field(0.12, description="warm-up without pruning (fraction of steps, or steps)")
    tfinal: StepSpec = Field(0.44, description="final fine-tuning phase with a fixed pattern (fraction or steps)")
    delta_t: StepSpec = Field(1, description="steps between budget allocations (deltaT)")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="EMA of the sensitivity")
    beta2: float = Field(0.85, ge=0.0, lt=1.0, description="EMA of the uncertainty")
    orth_reg_weight: float = Field(0.1, ge=0.0, description="gamma of the orthogonality regulariser (official "
                                                             "GLUE scripts 0.1; PEFT's default 0.5)")
    # E starts at zero between two N(0, 0.02^2) factors, so the update grows like the product of three small
    # moving tensors: at train.lr the model had not started learning after 189 steps (validation 55.8 %, the
    # majority class). E at 5e-2 (the official runs have ~100x more steps to get there): validation 90.3 %.
    recipe: Recipe = Field(default_factory=lambda: Recipe(group_lr={"gates": 5e-2}))
    prune_ties: bool = Field(True, description="reference behaviour: mask every score <= the threshold "
                                               "(ties over-prune); False masks exactly b0 - b(t)")

    @field_validator("tinit", "tfinal", "delta_t")
    @classmethod
    def _steps(cls, v: StepSpec, info: Any) -> StepSpec:
        return check_step_spec(v, info.field_name)

    @model_validator(mode="after")
    def _phases(self) -> AdaLoRAParams:
        if isinstance(self.tinit, float) and isinstance(self.tfinal, float) and self.tinit + self.tfinal >= 1.0:
            raise ValueError(f"adalora phases overlap: tinit={self.tinit} + tfinal={self.tfinal} leaves no "
                             "budget phase (need tinit + tfinal < 1)")
        if self.delta_t == 0:
            raise ValueError("delta_t must be > 0")
        return self


class AdaLoRAController(RankAllocationController):
    """Owns the sensitivity/uncertainty EMAs, the budget schedule, the mask and the orthogonality term."""

    method = "adalora"
    params: AdaLoRAParams

    def __init__(self, layers: dict[str, AdaLoRALinear], target_rank: int, params: AdaLoRAParams) -> None:
        super().__init__(layers, target_rank, params)
        # flat parameter list [A_1, B_1, E_1, A_2, ...] so the per-entry EMAs are _foreach ops
        self.tensors = [t for layer in self.layers for t in (layer.A, layer.B, layer.gate)]
        self.ipt: list[torch.Tensor] | None = [torch.zeros_like(t) for t in self.tensors]
        self.unc: list[torch.Tensor] | None = [torch.zeros_like(t) for t in self.tensors]
        self.t_init = self.t_final = self.t_fix = self.interval = 0

    @property
    def initial_budget(self) -> int:
        return self.num_modules * self.r0

    # ------------------------------------------------------------ schedule
    def bind(self, total_steps: int) -> None:
        super().bind(total_steps)
        p = self.params
        self.t_init = resolve_step(p.tinit, total_steps)
        self.t_final = resolve_step(p.tfinal, total_steps)
        self.t_fix = total_steps - self.t_final  # pattern frozen from here on
        self.interval = resolve_step(p.delta_t, total_steps)
        if self.interval < 1:
            raise ValueError(f"delta_t={p.delta_t} is below one step for {total_steps} steps")
        if not 0 <= self.t_init < self.t_fix <= total_steps:
            raise ValueError(f"adalora phases overlap: tinit={self.t_init} and tfinal={self.t_final} steps "
                             f"leave no budget phase in {total_steps} steps (need tinit + tfinal < steps)")

    def budget(self, t: int) -> int:
        return adalora_budget(t, self.t_init, self.t_final, self.total_steps, self.initial_budget,
                              self.target_budget)

    # -------------------------------------------------------------- scores
    @torch.no_grad()
    def update_sensitivity(self) -> None:
        """``I = |w g|``, ``Ī <- b1 Ī + (1-b1) I``, ``Ū <- b2 Ū + (1-b2) |I - Ī|`` for every entry."""
        assert self.ipt is not None and self.unc is not None
        weights = [t.detach() for t in self.tensors]
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.tensors]
        sens = torch._foreach_mul(weights, grads)
        torch._foreach_abs_(sens)
        torch._foreach_lerp_(self.ipt, sens, 1.0 - self.params.beta1)
        dev = torch._foreach_sub(sens, self.ipt)  # against the updated Ī, as the reference code
        torch._foreach_abs_(dev)
        torch._foreach_lerp_(self.unc, dev, 1.0 - self.params.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """(M, r0): ``s(λ_k) + mean_i s(P_ik) + mean_j s(Q_kj)`` with ``s = Ī Ū``."""
        assert self.ipt is not None and self.unc is not None
        s = torch._foreach_mul(self.ipt, self.unc)
        rows = []
        for m in range(self.num_modules):
            s_a, s_b, s_e = s[3 * m], s[3 * m + 1], s[3 * m + 2]
            rows.append(s_e + s_b.mean(dim=0) + s_a.mean(dim=1))
        return torch.stack(rows)

    # ---------------------------------------------------------------- hooks
    def regularizer(self, step: int) -> torch.Tensor | None:
        if self.params.orth_reg_weight == 0.0:
            return None
        return self.params.orth_reg_weight * self.orthogonality()

    def orthogonality(self) -> torch.Tensor:
        """Mean over all P and Q of ``||P^T P - I||_F`` / ``||Q Q^T - I||_F`` (not squared, as the code)."""
        total = self.layers[0].A.new_zeros(())
        eye = torch.eye(self.r0, device=self.device, dtype=total.dtype)
        for idx in self.groups:
            q = torch.stack([self.layers[i].A for i in idx])  # (G, r0, in)
            p = torch.stack([self.layers[i].B for i in idx])  # (G, out, r0)
            total = total + torch.linalg.matrix_norm(q @ q.transpose(1, 2) - eye).sum()
            total = total + torch.linalg.matrix_norm(p.transpose(1, 2) @ p - eye).sum()
        return total / (2 * self.num_modules)

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        if self.keep is not None:  # after T - tfinal: fixed pattern, re-applied every step
            self.apply_keep(self.keep)
            return
        self.update_sensitivity()  # gradients of this step are still there (zeroed at the next step)
        final = step == self.t_fix
        if not final and not (self.t_init < step < self.t_fix and step % self.interval == 0):
            return
        b = self.budget(step)
        scores = dist.all_reduce_mean(self.triplet_scores())
        pruned = self.prune(step, scores, self.initial_budget - b, self.params.prune_ties, b)
        if final:
            self.freeze(step, ~pruned)
            self.ipt = self.unc = None  # no longer needed (the reference resets them too)

    def on_train_end(self) -> None:
        if self.keep is None and self.total_steps and self.ipt is not None:
            # stopped before T - tfinal (never in a full run): allocate the target budget now [D]
            b = self.target_budget
            pruned = self.prune(self.t_fix, self.triplet_scores(), self.initial_budget - b,
                                self.params.prune_ties, b)
            self.freeze(self.t_fix, ~pruned)
        if self.keep is not None:
            self.apply_keep(self.keep)

    # ----------------------------------------------------------- checkpoint
    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "tinit": self.t_init, "t_fix": self.t_fix, "delta_t": self.interval}

    def state_dict(self) -> dict[str, Any]:
        state = {**self._base_state(), "schedule": [self.t_init, self.t_final, self.interval]}
        for key in ("ipt", "unc"):
            tensors = getattr(self, key)
            state[key] = None if tensors is None else [t.detach().cpu().clone() for t in tensors]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        if self.total_steps and list(state["schedule"]) != [self.t_init, self.t_final, self.interval]:
            raise ValueError(f"checkpoint schedule {state['schedule']} differs from this run's "
                             f"{[self.t_init, self.t_final, self.interval]}")
        for key in ("ipt", "unc"):
            saved = state[key]
            setattr(self, key, None if saved is None
                    else [s.to(t.device).clone() for s, t in zip(saved, self.tensors, strict=True)])


@register
class AdaLoRA(RankAllocationMethod[AdaLoRAParams]):
    name = "adalora"
    description = "AdaLoRA: SVD-shaped triplets, sensitivity x uncertainty scores, global cubic budget"
    params_model = AdaLoRAParams
    layer_cls = AdaLoRALinear

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        return [PaperTarget(f"{task}: adalora within 2 pt of lora", -2.0)]

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[AdaLoRAParams]) -> AdaLoRAController:
        _, rt = self.ranks(ctx)
        return AdaLoRAController(self.allocation_layers(model), rt, ctx.params)
