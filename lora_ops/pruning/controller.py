"""In-loop LoRAPrune: score after backward, EMA, masks on the cubic schedule, plan for export."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_ops import distributed as dist
from lora_ops.pruning.importance import Importance, tied_unit_scores
from lora_ops.pruning.masked import MaskedLoRALinear
from lora_ops.pruning.schedule import PruneSchedule
from lora_ops.pruning.structure import LayerStructure, PruneStructure
from lora_ops.training.controller import Controller


def expand_unit_mask(structure: PruneStructure, ls: LayerStructure, kind: str, unit_mask: torch.Tensor
                     ) -> dict[str, tuple[str, torch.Tensor]]:
    """Row/column masks per role from a unit mask: ``{role: ("out"|"in", mask)}``."""
    m = unit_mask.float()
    if kind == "mlp":
        return {r: ("in" if r == "down" else "out", m) for r in structure.roles_for("mlp")}
    hd = ls.head_dim
    if structure.gqa_mode == "kv_group":
        q = m.repeat_interleave(ls.n_rep * hd)
        kv = m.repeat_interleave(hd)
        return {"q": ("out", q), "k": ("out", kv), "v": ("out", kv), "o": ("in", q)}
    q = m.repeat_interleave(hd)
    return {"q": ("out", q), "o": ("in", q)}


def mask_directions(structure: PruneStructure) -> dict[str, str]:
    """Which mask each role carries in a prunable layer (built once, before training)."""
    out: dict[str, str] = {}
    if structure.prune_heads:
        out.update({r: ("in" if r == "o" else "out") for r in structure.roles_for("heads")})
    if structure.prune_mlp:
        out.update({r: ("in" if r == "down" else "out") for r in structure.roles_for("mlp")})
    return out


class LoRAPruneController(Controller):
    """Scores in :meth:`on_after_backward`, masks in :meth:`on_step_end`.

    State (EMA scores, unit masks) round-trips through :meth:`state_dict` for resume.
    """

    def __init__(self, layers: dict[str, MaskedLoRALinear], structure: PruneStructure, grid: dict[str, Any],
                 importance: Importance, warmup: float = 0.1, cooldown: float = 0.1, every: int = 10,
                 ema: float = 0.9, exact_final: bool = True, min_score_updates: int = 0) -> None:
        self.layers = layers
        self.structure = structure
        self.grid = grid
        self.importance = importance
        self.warmup, self.cooldown, self.every = warmup, cooldown, every
        self.beta = ema
        self.exact_final = exact_final
        self.min_score_updates = min_score_updates
        self.score_updates = 0  # steps whose scores entered the EMA (fp16 overflow steps do not)
        self.ratio = float(grid["requested"])
        missing = [n for ls in structure.prunable for r in structure.required_roles()
                   for n in [ls.modules.get(r)] if n is None or n not in layers]
        if missing:
            raise ValueError(f"{len(missing)} prunable modules carry no masked LoRA layer, e.g. {missing[:3]}")
        self.units = {f"{ls.layer}.{k}": (ls, k, u) for ls in structure.prunable
                      for k, u in structure.units(ls).items()}
        self.ema: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {key: torch.ones(u.total) for key, (_, _, u) in self.units.items()}
        self.skipped_nan = 0
        self.schedule: PruneSchedule | None = None
        self.final_step = 0
        if importance.needs_weight_grad:
            for ls in structure.prunable:
                for role in structure.required_roles():
                    layers[ls.modules[role]].capture_weight_grad = True

    # ------------------------------------------------------------------ hooks
    def bind(self, total_steps: int) -> None:
        super().bind(total_steps)
        self.schedule = PruneSchedule(total_steps, self.warmup, self.cooldown, self.every, self.exact_final,
                                      min_warmup_steps=self.min_score_updates)
        self.final_step = max(
            (self.schedule.last_change_step(u.size, self._final_count(key), self.ratio)
             for key, (_, _, u) in self.units.items()), default=0)

    def _final_count(self, key: str) -> int:
        ls, kind, _ = self.units[key]
        return int(self.grid["layers"][str(ls.layer)][kind]["pruned_per_block"])

    def on_after_backward(self, step: int) -> None:
        scores = tied_unit_scores(self.layers, self.structure, self.importance)
        finite = True
        for key, u in scores.items():
            u = u.detach().float().cpu()
            if not torch.isfinite(u).all():  # fp16 overflow: skip this update, as the official code
                self.skipped_nan += 1
                finite = False
                continue
            prev = self.ema.get(key)
            self.ema[key] = (1 - self.beta) * u if prev is None else self.beta * prev + (1 - self.beta) * u
        self.score_updates += int(finite)

    def on_step_end(self, step: int) -> None:
        assert self.schedule is not None, "bind() was not called"
        if self.score_updates < self.min_score_updates:  # never remove more than has been scored
            return
        for key, (_, _, unit) in self.units.items():
            self._update(key, unit, lambda cur, unit=unit, key=key: self.schedule.count(  # type: ignore[union-attr]
                step, unit.size, self._final_count(key), self.ratio, cur))

    def allows_best(self, step: int) -> bool:
        return step >= self.final_step

    def on_train_end(self) -> None:
        # exact mode: make sure the target is met even if training stopped before the cool-down
        if not self.exact_final:
            return
        for key, (_, _, unit) in self.units.items():
            self._update(key, unit, lambda cur, key=key: self._final_count(key))

    # ------------------------------------------------------------------ masks
    def _update(self, key: str, unit: Any, want_fn: Any) -> None:
        mask = self.masks[key]
        blocks = mask.view(unit.blocks, unit.size)
        current = int((blocks[0] == 0).sum())
        want = want_fn(current)
        if want <= current:
            return
        score = self.ema.get(key, torch.zeros(unit.total)).clone()
        dist.all_reduce_mean(score)  # every rank decides the same
        score = score.view(unit.blocks, unit.size).masked_fill(blocks == 0, -math.inf)
        order = torch.argsort(score, dim=1, stable=True)  # pruned first, then least important
        new = torch.ones_like(blocks)
        new.scatter_(1, order[:, :want], 0.0)
        self.masks[key] = new.view(-1)
        self._apply(key)

    def _apply(self, key: str) -> None:
        ls, kind, _ = self.units[key]
        for role, (direction, m) in expand_unit_mask(self.structure, ls, kind, self.masks[key]).items():
            layer = self.layers[ls.modules[role]]
            layer.set_masks(out_mask=m if direction == "out" else None, in_mask=m if direction == "in" else None)

    @torch.no_grad()
    def masks_from_layers(self) -> None:
        """Read the unit masks back from the layers' buffers (e.g. after loading an adapter state)."""
        for key, (ls, kind, _) in self.units.items():
            if kind == "mlp":
                m = self.layers[ls.modules["down"]].in_mask
            else:
                m = self.layers[ls.modules["o"]].in_mask.view(ls.n_heads, ls.head_dim)[:, 0]
                if self.structure.gqa_mode == "kv_group":
                    m = m.view(ls.n_kv_heads, ls.n_rep)[:, 0]
            self.masks[key] = (m.detach().float().cpu() != 0).float()

    def sparsity(self) -> dict[str, float]:
        """Current pruned fraction of the prunable layers per kind."""
        out: dict[str, list[float]] = {}
        for key, (_, kind, _) in self.units.items():
            out.setdefault(kind, []).append(float((self.masks[key] == 0).float().mean()))
        return {k: sum(v) / len(v) for k, v in out.items()}

    # ------------------------------------------------------------------ records
    def plan(self) -> dict[str, Any]:
        """The pruning plan (JSON-able): which heads/channels go, per layer; consumed by export."""
        layers: dict[str, Any] = {}
        for ls in self.structure.layers:
            entry: dict[str, Any] = {"exempt": ls.exempt, "modules": ls.modules, "head_dim": ls.head_dim,
                                     "n_heads": ls.n_heads, "n_kv_heads": ls.n_kv_heads,
                                     "intermediate": ls.intermediate}
            for kind in ("heads", "mlp"):
                key = f"{ls.layer}.{kind}"
                if key not in self.masks:
                    continue
                pruned = torch.nonzero(self.masks[key] == 0).flatten().tolist()
                if kind == "mlp":
                    entry["mlp"] = {"pruned_channels": pruned, "kept": ls.intermediate - len(pruned)}
                    continue
                if self.structure.gqa_mode == "kv_group":
                    q_pruned = [g * ls.n_rep + j for g in pruned for j in range(ls.n_rep)]
                    kv_pruned = pruned
                else:
                    q_pruned, kv_pruned = pruned, []
                entry["heads"] = {
                    "pruned_units": pruned,
                    "pruned_q_heads": q_pruned,
                    "kept_q_heads": [h for h in range(ls.n_heads) if h not in set(q_pruned)],
                    "kept_kv_heads": [h for h in range(ls.n_kv_heads) if h not in set(kv_pruned)],
                }
            layers[str(ls.layer)] = entry
        return {"family": self.structure.family, "kind": self.structure.kind,
                "gqa_mode": self.structure.gqa_mode, "criterion": self.importance.name, "layers": layers}

    def summary(self) -> dict[str, Any]:
        return {"criterion": self.importance.name, "requested_ratio": self.ratio,
                "grid": {k: v for k, v in self.grid.items() if k != "layers"},
                "sparsity": self.sparsity(), "final_step": self.final_step, "exact_final": self.exact_final,
                "skipped_nan_updates": self.skipped_nan, "plan": self.plan()}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.clone() for k, v in self.ema.items()},
                "masks": {k: v.clone() for k, v in self.masks.items()}, "skipped_nan": self.skipped_nan,
                "score_updates": self.score_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state.get("masks", {})) != set(self.masks):
            raise ValueError("checkpoint masks do not match this model's prunable structure")
        self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.skipped_nan = int(state.get("skipped_nan", 0))
        self.score_updates = int(state.get("score_updates", 0))
        for key in self.masks:
            self._apply(key)
