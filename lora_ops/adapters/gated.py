"""Gated rank-1 LoRA: ``ΔW = s · B diag(g) A``, the shared shape of DoRA-DR and AdaLoRA.

``A`` (r0 x in), ``B`` (out x r0) and the gate vector ``g`` (r0) are all trainable. A
component ``i`` is pruned by setting ``g_i = 0``; the tensors keep their size during
training, and the export drops pruned components and folds ``g`` into ``B`` so the
result is a plain LoRA of the kept rank.

Speed: the gate is folded into the rows of ``A`` (``B diag(g) A = B (g ⊙ A)``) and the
whole layer runs through the fused LoRA kernel; the extra cost is one ``r0 x in``
multiply per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_ops.adapters.base import AdapterLayer
from lora_ops.adapters.lora import lora_linear


class GatedLoRALinear(AdapterLayer):
    """``W x + b + s · B (g ⊙ A drop(x))`` with ``s`` fixed at construction (uses the initial rank)."""

    method = "gated_lora"

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"initial rank must be >= 1, got {rank}")
        dev = base.weight.device
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.B = nn.Parameter(torch.empty(base.out_features, rank, device=dev))
        self.gate = nn.Parameter(torch.zeros(rank, device=dev))
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:  # pragma: no cover - subclasses choose their init
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """Initial (allocated) rank r0; the active rank is :meth:`active_rank`."""
        return self.A.shape[0]

    # ---------------------------------------------------------------- forward
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        gated_a = self.gate.unsqueeze(1) * self.A  # B diag(g) A == B (g ⊙ A): one fused LoRA call
        return lora_linear(x, self.base.weight, self.base.bias, gated_a, self.B, self.scale, p, lowp=self.frozen_lowp(x))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * ((self.B * self.gate) @ self.A)

    # ---------------------------------------------------------- components
    def active_components(self) -> torch.Tensor:
        """Boolean vector: components whose gate is non-zero (pruning writes exact zeros)."""
        return self.gate.detach() != 0

    def active_rank(self) -> int:
        return int(self.active_components().sum())

    @torch.no_grad()
    def apply_keep(self, keep: torch.Tensor) -> None:
        """Zero the gates of the components not in ``keep`` (bool, r0)."""
        self.gate.masked_fill_(~keep.to(self.gate.device), 0.0)

    def parameter_group(self, name: str) -> str:
        # DoRA-DR's c and AdaLoRA's E start at zero: a recipe may give them their own learning rate
        return "gates" if name == "gate" else "adapter"

    def num_active(self) -> int:
        # what survives the export: kept components, gate folded into B (spec §5f.7)
        return self.active_rank() * (self.in_features + self.out_features)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) of the equivalent plain LoRA: inactive components dropped, gate folded into B."""
        keep = self.active_components()
        a = self.A.detach()[keep]
        b = self.B.detach()[:, keep] * self.gate.detach()[keep]
        return a, b, self.scale

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r0={self.rank}, active={self.active_rank()}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}")
