"""The LoRAPrune sparsity schedule: cubic between warm-up and cool-down, masks every N steps.

Official behaviour (``exact_final=False``): a mask update happens when ``step % every == 0`` and
``0 < p(t) < p_T`` (strict), with ``floor(size * p(t))`` units pruned. The strict bound and the
floor under-prune: 15 of 32 heads at target 0.5. Default (``exact_final=True``): the schedule
targets the grid-rounded ratio and the first step of the cool-down (``p(t) == p_T``) prunes
exactly to it, whatever ``every`` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_ops.schedules import cubic_decay


def _steps(value: float, total: int) -> int:
    """A share of the run (< 1) or a step count (>= 1) as steps."""
    return int(value) if value >= 1 else int(value * total)


@dataclass(frozen=True)
class PruneSchedule:
    total: int
    warmup: float = 0.1  # < 1: share of the steps; >= 1: steps (so a short run can ask for "10 steps")
    cooldown: float = 0.1
    every: int = 10
    exact_final: bool = True
    #: no mask before this many steps, whatever ``warmup`` says: scores need updates before they rank
    #: anything (on a 16-step run a 0.1 warm-up is one step, and one update of Ĝ is mostly noise)
    min_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError("schedule needs at least one step")
        if self.every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.every}")
        if self.warmup < 0 or self.cooldown < 0:
            raise ValueError(f"warmup ({self.warmup}) and cooldown ({self.cooldown}) must be >= 0")
        if self.t_init + self.t_final >= self.total:
            raise ValueError(
                f"the pruning schedule has no room: {self.t_init} warm-up steps (warmup {self.warmup}, at least "
                f"{self.min_warmup_steps} score updates) + {self.t_final} cool-down steps >= {self.total} steps; "
                "train longer or lower loraprune.warmup / cooldown / min_score_updates")

    @property
    def t_init(self) -> int:
        return max(_steps(self.warmup, self.total), self.min_warmup_steps)

    @property
    def t_final(self) -> int:
        return _steps(self.cooldown, self.total)

    def sparsity(self, step: int, end: float) -> float:
        """p(t): 0 through warm-up, cubic rise, ``end`` through cool-down."""
        return cubic_decay(step, self.t_init, self.t_final, self.total, 0.0, end)

    def count(self, step: int, size: int, final_count: int, ratio: float, current: int) -> int:
        """Units of a block of ``size`` that should be pruned after ``step`` (never fewer than ``current``).

        ``final_count`` is the grid-rounded target; ``ratio`` the requested one (official mode).
        """
        if self.exact_final:
            end = final_count / size
            p = self.sparsity(step, end)
            if p >= end:
                new = final_count
            elif step % self.every == 0 and p > 0:
                new = min(final_count, math.floor(size * p + 1e-9))
            else:
                new = current
        else:
            p = self.sparsity(step, ratio)
            new = math.floor(size * p) if step % self.every == 0 and 0 < p < ratio else current
        return max(current, new)

    def last_change_step(self, size: int, final_count: int, ratio: float) -> int:
        """The last step at which :meth:`count` may change (masks are final afterwards)."""
        last, current = 0, 0
        for step in range(1, self.total + 1):
            new = self.count(step, size, final_count, ratio, current)
            if new != current:
                last, current = step, new
            if self.exact_final and current == final_count:
                break
        return last
