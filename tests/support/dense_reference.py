"""Dense float64 references the factor-space code is checked against (tests only)."""

from __future__ import annotations

import torch

from lora_ops.lowrank import energy_rank


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
