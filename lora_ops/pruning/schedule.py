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


@dataclass(frozen=True)
class PruneSchedule:
    total: int
    warmup: float = 0.1
    cooldown: float = 0.1
    every: int = 10
    exact_final: bool = True

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError("schedule needs at least one step")
        if self.every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.every}")
        if self.warmup < 0 or self.cooldown < 0 or self.warmup + self.cooldown >= 1:
            raise ValueError(f"warmup ({self.warmup}) + cooldown ({self.cooldown}) must be in [0, 1)")

    @property
    def t_init(self) -> int:
        return int(self.warmup * self.total)

    @property
    def t_final(self) -> int:
        return int(self.cooldown * self.total)

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
