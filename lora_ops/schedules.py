"""Schedules as pure functions of the step (unit-tested at given steps)."""

from __future__ import annotations


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then linear decay to 0 at ``total_steps``."""
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


def cubic_decay(t: int, t_init: int, t_final: int, total: int, start: float, end: float) -> float:
    """AdaLoRA / LoRAPrune cubic schedule from ``start`` to ``end``.

    ``start`` until ``t_init``; ``end`` after ``total - t_final``; in between
    ``end + (start - end) * (1 - progress)**3``.
    """
    if t <= t_init:
        return start
    if t > total - t_final:
        return end
    span = max(1, total - t_init - t_final)
    progress = (t - t_init) / span
    return end + (start - end) * (1.0 - progress) ** 3


def cubic_rise(t: int, t_start: int, t_end: int, peak: float) -> float:
    """DoRA-DR prune fraction: 0 before ``t_start``, ``peak * ((t - t_start)/(t_end - t_start))**3`` up to ``t_end``."""
    if t <= t_start:
        return 0.0
    if t >= t_end:
        return peak
    return peak * ((t - t_start) / (t_end - t_start)) ** 3
