"""LoRA layer with structural masks: ``y = m_out * (W (m_in * x) + b + s B A drop(m_in * x))``.

The output mask is applied after the bias (as the official code does), so a pruned row
outputs exactly 0 and the physically pruned model reproduces the masked one. The input mask
(on o_proj / down_proj) zeroes the columns that export slices away; for a query head pruned
inside a KV group it is what makes masked == pruned, since masking q alone leaves the head's
attention output at the mean of V, not 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_linear


class MaskedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` with optional 0/1 output and input masks (buffers, checkpointed)."""

    method = "loraprune"

    def __init__(self, base: nn.Linear, pair: LoRAPair, scale: float, dropout: float = 0.0,
                 out_mask: bool = False, in_mask: bool = False) -> None:
        super().__init__(base, pair, scale, dropout)
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("out_mask", torch.ones(base.out_features, device=dev, dtype=dt) if out_mask else None)
        self.register_buffer("in_mask", torch.ones(base.in_features, device=dev, dtype=dt) if in_mask else None)
        #: set by the ``grad`` criterion: run an unfused path with a fresh leaf for W so that
        #: dL/dW is available without making W an (optimised) parameter
        self.capture_weight_grad = False
        self.weight_leaf: torch.Tensor | None = None

    @torch.no_grad()
    def set_masks(self, out_mask: torch.Tensor | None = None, in_mask: torch.Tensor | None = None) -> None:
        if out_mask is not None:
            if self.out_mask is None:
                raise ValueError("this layer has no output mask")
            self.out_mask.copy_(out_mask.to(self.out_mask))
        if in_mask is not None:
            if self.in_mask is None:
                raise ValueError("this layer has no input mask")
            self.in_mask.copy_(in_mask.to(self.in_mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_mask is not None:
            x = x * self.in_mask.to(x.dtype)
        if self.merged:
            y = self.base(x)
        elif self.capture_weight_grad and torch.is_grad_enabled():
            w = self.base.weight.detach().requires_grad_(True)
            self.weight_leaf = w
            xd = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
            y = F.linear(x, w, self.base.bias) + self.scale * F.linear(F.linear(xd, self.lora.A), self.lora.B)
        else:
            p = self.dropout if self.training else 0.0
            y = lora_linear(x, self.base.weight, self.base.bias, self.lora.A, self.lora.B, self.scale, p,
                            lowp=self.frozen_lowp(x))
        if self.out_mask is not None:
            y = y * self.out_mask.to(y.dtype)
        return y

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def num_active(self) -> int:
        # rows/columns that are masked carry no information after pruning
        out = int(self.out_mask.sum().item()) if self.out_mask is not None else self.out_features
        inp = int(self.in_mask.sum().item()) if self.in_mask is not None else self.in_features
        return self.lora.rank * (out + inp)

    def extra_repr(self) -> str:
        masks = [n for n in ("out_mask", "in_mask") if getattr(self, n) is not None]
        return f"{super().extra_repr()}, masks={masks}"
