"""AdaLoRA (Zhang et al. 2023; spec §6) adapter layer: ``ΔW = (α/r0) P diag(E) Q``.

``Q`` is stored as ``A`` (r0 x in), ``P`` as ``B`` (out x r0) and ``Λ = diag(E)`` as the gate.
Initialisation as in the official code and PEFT: ``P, Q ~ N(0, 0.02^2)``, ``E = 0``.
"""

from __future__ import annotations

from torch import nn

from lora_ops.adapters.gated import GatedLoRALinear


class AdaLoRALinear(GatedLoRALinear):
    """One module of AdaLoRA: SVD-shaped triplets ``(P_{:,k}, λ_k, Q_{k,:})``."""

    method = "adalora"

    def reset_parameters(self) -> None:
        nn.init.normal_(self.A, mean=0.0, std=0.02)
        nn.init.normal_(self.B, mean=0.0, std=0.02)
        nn.init.zeros_(self.gate)

    @property
    def E(self) -> nn.Parameter:  # noqa: N802 - the paper's name
        return self.gate
