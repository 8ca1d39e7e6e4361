"""DoRA-DR (dynamic rank distribution, Mao et al. 2024; spec §5) adapter layer.

Not PEFT's weight-decomposed DoRA. ``ΔW = (α/r0) B diag(c) A`` with ``c = 0`` at start and
*both* factors Kaiming-uniform, so every component starts with a non-trivial direction and
its gate decides how much of it is used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_ops.adapters.gated import GatedLoRALinear


class DoRADRLinear(GatedLoRALinear):
    """One module of DoRA-DR: r0 gated rank-1 components ``c_i b_i a_i^T``."""

    method = "dora_dr"

    def reset_parameters(self) -> None:
        # spec §5b: both factors Kaiming-uniform (as nn.Linear), c = 0 gives ΔW = 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.zeros_(self.gate)

    @property
    def c(self) -> nn.Parameter:
        return self.gate

    @torch.no_grad()
    def component_shares(self, eps: float = 1e-8) -> torch.Tensor:
        """Each component's share of the update norm, ``|c_i| ||b_i|| ||a_i|| / (||B diag(c) A||_F + eps)``.

        ``||B diag(c) A||_F^2 = sum_ij c_i c_j (B^T B)_ij (A A^T)_ij``: two r0 x r0 Gram matrices
        instead of the r0 x out x in tensor the reference code materialises.
        """
        return dora_shares(self.A.unsqueeze(0), self.B.unsqueeze(0), self.gate.unsqueeze(0), eps)[0]


def dora_shares(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Batched norm shares: ``a`` (G, r, in), ``b`` (G, out, r), ``c`` (G, r) -> (G, r)."""
    a, b, c = a.float(), b.float(), c.float()
    a_norm = a.norm(dim=2)
    b_norm = b.norm(dim=1)
    gram = (a @ a.transpose(1, 2)) * (b.transpose(1, 2) @ b)  # (G, r, r)
    total_sq = (c.unsqueeze(2) * gram * c.unsqueeze(1)).sum(dim=(1, 2))
    total = total_sq.clamp_min(0.0).sqrt()  # rounding can make a ~0 square slightly negative
    return (c.abs() * a_norm * b_norm) / (total.unsqueeze(1) + eps)
