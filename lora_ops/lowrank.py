"""Truncated SVD of a low-rank update at an energy threshold (PEFT ``convert_to_lora`` semantics).

For ``ΔW = U S Vᵀ`` the kept rank is the smallest ``k`` whose leading singular values hold at
least ``energy`` of ``Σ S²`` (PEFT's float ``rank``). The factors ``B' = U_k S_k``, ``A' = V_kᵀ``
reproduce the best rank-``k`` approximation of ``ΔW``. Unlike PEFT, an update that is exactly zero
gets rank 0 (PEFT keeps a zero rank-1 pair): it carries nothing, so it is dropped.
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


def truncated_factors(delta: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A' ``k x in``, B' ``out x k``, k) with ``B' A'`` the rank-``k`` truncation of ``delta`` (float64 SVD).

    Signs are made canonical (each column of ``U`` has its largest-magnitude entry positive), so the
    factors depend on ``delta`` alone, not on the LAPACK path that produced them."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = energy_rank(s, energy)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if k:
        pivot = u.abs().argmax(dim=0)
        sign = torch.sign(u[pivot, torch.arange(k)])
        sign[sign == 0] = 1.0
        u, vh = u * sign, vh * sign[:, None]
    return vh, u * s, k
