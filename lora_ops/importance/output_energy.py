"""LoRA-drop's criterion: the energy a LoRA injects into its layer's output.

``g_l = sum over non-padding tokens of ||s B A x||^2``. Computed in forward hooks as
``s^2 * (xA^T)(B^T B)(xA^T)^T`` per token, which costs one skinny ``x A^T`` GEMM and an
``r x r`` product instead of materialising the ``out``-wide LoRA output again.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_ops.adapters.lora import LoRALinear


class OutputEnergyRecorder:
    """Accumulates per-module LoRA output energy over every forward while attached."""

    def __init__(self, layers: dict[str, LoRALinear]) -> None:
        self.layers = layers
        self.energy = {name: 0.0 for name in layers}
        self.tokens = {name: 0 for name in layers}
        self._mask: torch.Tensor | None = None
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Which tokens count (1) and which are padding (0), shaped like the inputs' leading dims."""
        self._mask = None if mask is None else mask.reshape(-1).to(torch.float32)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            layer: LoRALinear = module  # type: ignore[assignment]
            with torch.no_grad():
                x = inputs[0].reshape(-1, layer.in_features)
                a = layer.lora.A.to(x.dtype)
                b = layer.lora.B.to(x.dtype)
                xa = x @ a.t()
                per_token = ((xa @ (b.t() @ b)) * xa).sum(dim=-1).float() * layer.scale**2
                if self._mask is not None:
                    mask = self._mask.to(per_token.device)
                    self.energy[name] += float((per_token * mask).sum())
                    self.tokens[name] += int(mask.sum())
                else:
                    self.energy[name] += float(per_token.sum())
                    self.tokens[name] += per_token.numel()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def direct_output_energy(layer: LoRALinear, x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Reference: materialise ``ΔW x`` and sum its squared norm (used by tests)."""
    with torch.no_grad():
        delta = (x.reshape(-1, layer.in_features) @ layer.delta_weight().t())
        per_token = delta.pow(2).sum(dim=-1)
        if mask is not None:
            per_token = per_token * mask.reshape(-1)
        return float(per_token.sum())
