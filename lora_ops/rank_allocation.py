"""Shared machinery of the in-loop rank allocators (DoRA-DR, AdaLoRA).

Pure schedule functions (unit-tested at given steps), the global threshold, step
resolution (fractions of the run or absolute steps), rank validation, and a controller
base that owns the frozen keep-mask, the prune log and the checkpointable state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel

from lora_ops.adapters.gated import GatedLoRALinear
from lora_ops.schedules import cubic_decay, cubic_rise
from lora_ops.training.controller import Controller

#: a point or length in training time: a float in [0, 1] is a fraction of the optimizer
#: steps, an int is a number of steps (YAML ``0.15`` vs ``100``)
StepSpec = int | float

_EPS = 1e-9  # guards floor/ceil against binary rounding (0.29 * 100 = 28.999...)


def check_step_spec(value: StepSpec, name: str) -> StepSpec:
    """Validate a :data:`StepSpec` (used by the params models' field validators)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}: a float is a fraction of the training steps and must be in [0, 1]; "
                         "give an int for a number of steps")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


def resolve_step(value: StepSpec, total: int) -> int:
    """A :data:`StepSpec` as an absolute number of steps for a run of ``total`` steps."""
    if isinstance(value, float):
        return int(math.floor(value * total + _EPS))
    return int(value)


def allocation_ranks(target_rank: int, initial_rank_factor: float, initial_rank: int | None) -> tuple[int, int]:
    """``(r0, r_target)`` with clear errors for budgets that cannot work (checked before training)."""
    if target_rank < 1:
        raise ValueError(f"target rank {target_rank} leaves no adapter at all: adapter.rank must be >= 1")
    r0 = initial_rank if initial_rank is not None else math.ceil(initial_rank_factor * target_rank - _EPS)
    if target_rank > r0:
        raise ValueError(f"target rank {target_rank} (adapter.rank) is above the initial rank {r0}: "
                         "allocation only prunes; raise initial_rank_factor / initial_rank")
    if target_rank == r0:
        raise ValueError(f"initial rank equals the target rank ({r0}): nothing to allocate; "
                         "use initial_rank_factor > 1 (or method lora)")
    return r0, target_rank


# ------------------------------------------------------------------ schedules
def dora_pruned_count(t: int, t_start: int, t_end: int, modules: int, r0: int, r_target: int,
                      force_first: bool = True) -> int:
    """Components DoRA-DR prunes at prune step ``t``: ``k = floor(N rho(t))`` (spec §5d).

    ``rho(t) = (r0 - rT)/r0 * ((t - t_s)/(t_e - t_s))^3``, ``N = M r0``, so ``N rho`` is
    computed as ``M (r0 - rT) progress^3`` (exact at ``t_e``). ``force_first`` reproduces the
    official ``max(k, 1)``: at least one component goes at every prune step, the first included.
    """
    frac = cubic_rise(t, t_start, t_end, 1.0)
    k = int(math.floor(modules * (r0 - r_target) * frac + _EPS))
    return max(k, 1) if force_first else k


def dora_budget(t: int, t_start: int, t_end: int, modules: int, r0: int, r_target: int) -> float:
    """Remaining components ``N (1 - rho(t))`` (before the floor and the forced prune)."""
    return modules * (r0 - (r0 - r_target) * cubic_rise(t, t_start, t_end, 1.0))


def adalora_budget(t: int, t_init: int, t_final: int, total: int, b0: int, b_target: int) -> int:
    """AdaLoRA's total rank budget ``b(t)`` (spec §6.3), floored like the reference code."""
    return int(math.floor(cubic_decay(t, t_init, t_final, total, float(b0), float(b_target)) + _EPS))


def global_prune(scores: torch.Tensor, k: int, ties: bool = True) -> torch.Tensor:
    """Boolean mask of the components to prune: the ``k`` lowest ``scores`` over all modules.

    ``ties=True`` is the reference behaviour: everything ``<=`` the k-th smallest value goes,
    which over-prunes when scores tie (exact zeros). ``ties=False`` prunes exactly ``k``.
    """
    flat = scores.reshape(-1)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    k = min(int(k), flat.numel())
    if k <= 0:
        return pruned.view_as(scores)
    if ties:
        tau = torch.kthvalue(flat.float(), k).values
        pruned = flat.float() <= tau
    else:
        pruned[torch.argsort(flat, stable=True)[:k]] = True
    return pruned.view_as(scores)


def shape_groups(layers: list[GatedLoRALinear]) -> list[list[int]]:
    """Indices of layers with equal (in, out, r0): their factors can be stacked and scored in one op."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault((layer.in_features, layer.out_features, layer.rank), []).append(i)
    return list(groups.values())


# ----------------------------------------------------------------- controller
class RankAllocationController(Controller):
    """Base of the allocators: module order, frozen keep-mask, prune log, ranks summary."""

    method = "rank_allocation"

    def __init__(self, layers: Mapping[str, GatedLoRALinear], target_rank: int, params: BaseModel) -> None:
        if not layers:
            raise ValueError(f"{self.method}: the model carries no {self.method} adapter layers (build first)")
        ranks = {layer.rank for layer in layers.values()}
        if len(ranks) != 1:
            raise ValueError(f"all modules must start at one initial rank, got {sorted(ranks)}")
        self.names = list(layers)
        self.layers = [layers[n] for n in self.names]
        self.r0 = ranks.pop()
        self.r_target = int(target_rank)
        self.params = params
        self.groups = shape_groups(self.layers)
        self.device = self.layers[0].A.device
        self.keep: torch.Tensor | None = None  # (M, r0) bool once the structure is frozen
        self.frozen_at: int | None = None
        self.prune_log: list[dict[str, Any]] = []
        self.total_steps = 0

    @property
    def num_modules(self) -> int:
        return len(self.layers)

    @property
    def target_budget(self) -> int:
        return self.num_modules * self.r_target

    # ------------------------------------------------------------- masks
    def gates(self) -> torch.Tensor:
        """(M, r0) detached copy of all gates."""
        return torch.stack([layer.gate.detach() for layer in self.layers])

    def apply_keep(self, keep: torch.Tensor) -> None:
        for layer, row in zip(self.layers, keep):
            layer.apply_keep(row)

    def prune(self, step: int, scores: torch.Tensor, k: int, ties: bool, budget: float) -> torch.Tensor:
        """Global threshold over ``scores`` (M, r0): zero the gates of the pruned components."""
        pruned = global_prune(scores, k, ties)
        self.apply_keep(~pruned)
        self.prune_log.append({"step": step, "k": int(k), "budget": float(budget),
                               "pruned": int(pruned.sum()), "active": int((self.gates() != 0).sum())})
        return pruned

    def freeze(self, step: int, keep: torch.Tensor) -> None:
        self.keep = keep.clone()
        self.frozen_at = step

    def allows_best(self, step: int) -> bool:
        return self.keep is not None

    # ---------------------------------------------------------- read-outs
    def final_ranks(self) -> dict[str, int]:
        if self.keep is not None:
            return {n: int(row.sum()) for n, row in zip(self.names, self.keep)}
        return {n: layer.active_rank() for n, layer in zip(self.names, self.layers)}

    def summary(self) -> dict[str, Any]:
        ranks = self.final_ranks()
        return {
            "method": self.method,
            "initial_rank": self.r0,
            "target_rank": self.r_target,
            "target_budget": self.target_budget,
            "active_components": sum(ranks.values()),
            "frozen_at_step": self.frozen_at,
            "ranks": ranks,
            "prune_log": list(self.prune_log),
        }

    # ---------------------------------------------------------- checkpoint
    def _base_state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "modules": list(self.names),
            "keep": None if self.keep is None else self.keep.detach().cpu().clone(),
            "frozen_at": self.frozen_at,
            "prune_log": [dict(e) for e in self.prune_log],
        }

    def _load_base_state(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"checkpoint controller state is for {state.get('method')!r}, not {self.method!r}")
        if state["modules"] != self.names:
            raise ValueError("checkpoint controller state was written for different modules (another plan?)")
        keep = state["keep"]
        self.keep = None if keep is None else keep.to(self.device).clone()
        self.frozen_at = state["frozen_at"]
        self.prune_log = [dict(e) for e in state["prune_log"]]
