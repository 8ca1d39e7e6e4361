"""PEFT ``convert_to_lora``'s rank rule: the smallest rank keeping a share of an update's SVD energy.

For ``ΔW = U S Vᵀ`` the kept rank is the smallest ``k`` whose leading singular values hold at
least ``energy`` of ``Σ S²`` (PEFT's float ``rank``). The decompositions it is applied to live in
``lora_ops.compress.trim`` (``svd_trim`` and the compress stage's ``budget: energy`` share them).
Unlike PEFT, an update that is exactly zero gets rank 0 (PEFT keeps a zero rank-1 pair): it carries
nothing, so it is dropped.
"""

from __future__ import annotations

import torch


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` with ``sum(S[:k]**2) >= energy * sum(S**2)``; ``S`` sorted descending; 0 if all zero."""
    if singular_values.dim() != 1:
        raise ValueError(f"singular values must be a vector, got shape {tuple(singular_values.shape)}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cumulative = torch.cumsum(singular_values.double() ** 2, dim=0)
    if cumulative.numel() == 0 or float(cumulative[-1]) == 0.0:
        return 0
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    return min(k, singular_values.numel())
