"""Importance criteria behind one interface (Torch-Pruning style strategies) and the reduction
of element importances to pruning units.

Criteria (all element-wise, in the base weight's (out, in) layout, on the merged weight
``W' = W + s B A``):

* ``loraprune``: ``|Ĝ ⊙ W'|`` with ``Ĝ = G_B A + B G_A − G_B G_A`` from LoRA gradients only.
  ``Ĝ`` is the update direction of one SGD step on ``BA`` divided by ``-η`` (η dropped, as in the
  official code; ``s`` is not applied to Ĝ). Never touches a gradient of the frozen ``W``.
* ``magnitude``: ``|W'|``.
* ``grad``: ``|G_W ⊙ W'|`` with the true gradient of ``W`` (memory-heavy reference: one
  full-size gradient per module is alive at the end of backward).

Reduction per module (see :mod:`lora_ops.pruning.structure` for the units): rows of q/k/v and
gate/up, columns of o and down, summed per head / KV group / channel; then L2-normalised per
module so each module has an equal say, then summed over the modules of the group (tying).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lora_ops.pruning.masked import MaskedLoRALinear
from lora_ops.pruning.structure import LayerStructure, PruneStructure


class Importance:
    """Strategy: element importance of one masked LoRA layer, or ``None`` if not available yet."""

    name: ClassVar[str]
    #: whether the layer must expose dL/dW (the ``grad`` reference)
    needs_weight_grad: ClassVar[bool] = False
    #: whether scores depend on gradients (else they are computed from weights only)
    needs_grads: ClassVar[bool] = True

    def element_importance(self, layer: MaskedLoRALinear) -> torch.Tensor | None:
        raise NotImplementedError


def merged_weight(layer: MaskedLoRALinear) -> torch.Tensor:
    w = layer.base.weight.detach().float()
    return w + layer.scale * (layer.lora.B.detach().float() @ layer.lora.A.detach().float())


def lora_gradient_estimate(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
                           ) -> torch.Tensor:
    """``Ĝ = G_B A + B G_A − G_B G_A`` (out x in)."""
    g_hat = grad_b @ a
    g_hat.addmm_(b, grad_a)
    g_hat.addmm_(grad_b, grad_a, alpha=-1.0)
    return g_hat


class LoRAPruneImportance(Importance):
    name = "loraprune"

    def element_importance(self, layer: MaskedLoRALinear) -> torch.Tensor | None:
        a, b = layer.lora.A, layer.lora.B
        if a.grad is None or b.grad is None:
            return None
        g_hat = lora_gradient_estimate(a.detach().float(), b.detach().float(), a.grad.float(), b.grad.float())
        return g_hat.mul_(merged_weight(layer)).abs_()


class MagnitudeImportance(Importance):
    name = "magnitude"
    needs_grads = False

    def element_importance(self, layer: MaskedLoRALinear) -> torch.Tensor | None:
        return merged_weight(layer).abs_()


class GradImportance(Importance):
    name = "grad"
    needs_weight_grad = True

    def element_importance(self, layer: MaskedLoRALinear) -> torch.Tensor | None:
        leaf = layer.weight_leaf
        if leaf is None or leaf.grad is None:
            return None
        scores = leaf.grad.float().mul(merged_weight(layer)).abs_()
        layer.weight_leaf = None  # free the full-size gradient right away
        return scores


IMPORTANCES: dict[str, type[Importance]] = {
    cls.name: cls for cls in (LoRAPruneImportance, MagnitudeImportance, GradImportance)
}


def get_importance(name: str) -> Importance:
    if name not in IMPORTANCES:
        raise ValueError(f"unknown pruning criterion {name!r}: choose one of {', '.join(sorted(IMPORTANCES))}")
    return IMPORTANCES[name]()


# ------------------------------------------------------------------ reduction to units
def reduce_to_units(scores: torch.Tensor, role: str, kind: str, structure: PruneStructure,
                    ls: LayerStructure) -> torch.Tensor:
    """Sum an (out, in) element-importance matrix into one score per pruning unit of ``kind``."""
    if kind == "mlp":
        return scores.sum(0) if role == "down" else scores.sum(1)
    hd = ls.head_dim
    if role == "o":
        per_head = scores.sum(0).view(-1, hd).sum(1)
    else:
        per_head = scores.sum(1).view(-1, hd).sum(1)
    if role in ("k", "v"):
        return per_head  # one per KV head == one per unit in kv_group mode
    if structure.gqa_mode == "kv_group":
        return per_head.view(ls.n_kv_heads, ls.n_rep).sum(1)
    return per_head  # query_in_group: one unit per query head, block-major by KV group


def normalize(u: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-module L2 normalisation so every module of a group has an equal say."""
    return u / (u.norm(p=2) + eps)


def tied_unit_scores(
    layers: dict[str, MaskedLoRALinear], structure: PruneStructure, importance: Importance
) -> dict[str, torch.Tensor]:
    """One tied score vector per ``"<layer>.<kind>"`` of the prunable layers (missing grads: absent).

    Each module's element importance is materialised, reduced and freed before the next one,
    so the extra memory is one (out x in) matrix at a time.
    """
    out: dict[str, torch.Tensor] = {}
    for ls in structure.prunable:
        for kind in structure.units(ls):
            total: torch.Tensor | None = None
            for role in structure.roles_for(kind):
                layer = layers[ls.modules[role]]
                with torch.no_grad():
                    elem = importance.element_importance(layer)
                    if elem is None:
                        total = None
                        break
                    u = normalize(reduce_to_units(elem, role, kind, structure, ls))
                    del elem
                total = u if total is None else total + u
            if total is not None:
                out[f"{ls.layer}.{kind}"] = total
    return out
