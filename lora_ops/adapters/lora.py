"""Plain LoRA with a fused autograd kernel, and LoRA pairs that several layers can share.

``y = W x + b + s * B A drop(x)`` with ``A`` (r x in) random and ``B`` (out x r) zero.

Speed: the whole layer (frozen GEMM + both LoRA GEMMs + dropout) is one autograd node.
Compared with composing ``nn.Linear``/``nn.Dropout`` modules this removes four graph
nodes per layer, adds the LoRA product in place into the base output (``addmm_``) and
folds the input-gradient of the LoRA path into the frozen path's input-gradient GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_ops.adapters.amp import autocast_off, kernel_dtype
from lora_ops.adapters.base import AdapterLayer


class _FusedLoRALinear(torch.autograd.Function):
    """Forward and backward of a frozen linear layer plus a LoRA branch in one node.

    Two execution plans, chosen per call by cost:

    * *merged* (no dropout, many tokens): ``W' = W + s B A`` is formed on the fly (an ``out x in``
      rank-r product, independent of the token count) and the layer runs ONE dense GEMM forward and
      ONE for the input gradient -- exactly the frozen layer's work. ``W'`` is rebuilt in backward
      instead of being kept, so no weight-sized tensor stays alive between forward and backward.
      Extra work is 4 skinny token GEMMs (for the factor gradients) instead of 6.
    * *branched* (dropout, or few tokens): the classic ``W x + s B A drop(x)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, plan: str,  # type: ignore[override]
                weight_lp=None, bias_lp=None):
        dt = kernel_dtype(x)  # read before autocast_off: inside it autocast is off and x's dtype would win
        with autocast_off(x):
            return _FusedLoRALinear._forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, plan, dt,
                                             weight_lp, bias_lp)

    @staticmethod
    def _forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, plan, dt, weight_lp, bias_lp):  # type: ignore[no-untyped-def]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)
        # a low-precision copy of the frozen weight made once by the layer (see AdapterLayer.frozen_lowp)
        cached = weight_lp is not None and weight_lp.dtype == dt
        if cached:
            bias = bias_lp
        else:
            bias = bias.to(dt) if bias is not None else None
        if plan == "auto":
            tokens, d_in, d_out = x2.shape[0], weight.shape[1], weight.shape[0]
            # with a cached copy the branched plan does no weight-sized work per call at all
            merged_pays = not cached and tokens * (d_in + d_out) > d_in * d_out
            plan = "merged" if dropout_p == 0.0 and merged_pays else "branched"
        keep = None
        # the factors are saved as given (parameters: no copy) and cast again in backward
        if plan == "merged":
            # W + sBA in the weight's own (fp32) precision, rounded to the compute dtype once: a bf16
            # addmm would first round W and then lose the small update against it a second time
            wdt = torch.promote_types(weight.dtype, dt)
            merged = torch.addmm(weight.to(wdt), lora_b.to(wdt), lora_a.to(wdt), alpha=scale).to(dt)
            y = F.linear(x2, merged, bias)
            x_drop = x2
            xa = None
        else:
            if cached:
                weight = weight_lp  # saved for backward too: the input-gradient GEMM reuses the copy
            y = F.linear(x2, weight.to(dt), bias)
            if dropout_p > 0.0:
                x_drop, keep = torch.native_dropout(x2, dropout_p, True)
            else:
                x_drop = x2
            xa = x_drop @ lora_a.to(dt).t()
            y.addmm_(xa, lora_b.to(dt).t(), alpha=scale)
        ctx.save_for_backward(weight, lora_a, lora_b, x_drop, xa, keep)
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.plan = plan
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_off(grad_out):
            return _FusedLoRALinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        weight, lora_a, lora_b, x_drop, xa, keep = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x_drop.dtype)
        a32, b32 = lora_a, lora_b
        lora_a, lora_b = lora_a.to(g.dtype), lora_b.to(g.dtype)
        # skinny products are computed in the orientation CPU BLAS handles well: the long token
        # dimension as the GEMM's inner/column dimension (measured 3-9x faster than g @ B, g^T @ xa)
        g_b_t = lora_b.t() @ g.t()  # (r, N)
        g_b = g_b_t.t()
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.plan == "merged":
                wdt = torch.promote_types(weight.dtype, g.dtype)  # the same W' as in forward
                merged = torch.addmm(weight.to(wdt), b32.to(wdt), a32.to(wdt), alpha=scale)
                grad_x = g @ merged.to(g.dtype)
            else:
                grad_x = g @ weight.to(g.dtype)
                if keep is None:
                    grad_x.addmm_(g_b, lora_a, alpha=scale)
                else:
                    grad_x.add_((g_b @ lora_a) * keep, alpha=scale / (1.0 - p))
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            grad_a = (g_b_t @ x_drop).mul_(scale)
        if ctx.needs_input_grad[4]:
            if xa is None:
                xa = x_drop @ lora_a.t()
            grad_b = (xa.t() @ g).t().mul_(scale).contiguous()
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    plan: str = "auto",
    lowp: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Functional fused LoRA linear: ``x W^T + b + scale * drop(x) A^T B^T``.

    ``plan`` is ``auto`` (pick by cost), ``merged`` or ``branched`` (see :class:`_FusedLoRALinear`).
    ``lowp`` is the frozen ``(weight, bias)`` already cast to the compute dtype (a layer's cached copy,
    :meth:`AdapterLayer.frozen_lowp`); it is used when autocast computes in that dtype, so the
    frozen GEMMs of the branched plan (forward and input gradient) run on it without a per-call cast.
    """
    if plan not in ("auto", "merged", "branched"):
        raise ValueError(f"plan must be auto, merged or branched, got {plan!r}")
    if plan == "merged" and dropout_p > 0:
        raise ValueError("the merged plan cannot apply dropout to the LoRA branch only")
    w_lp, b_lp = lowp if lowp is not None else (None, None)
    return _FusedLoRALinear.apply(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), plan, w_lp, b_lp)


class LoRAPair(nn.Module):
    """The trainable factors ``A`` (r x in) and ``B`` (out x r). One pair may serve many layers."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def reset_parameters(self) -> None:
        # same initialisation as PEFT / the LoRA paper: Kaiming-uniform A, zero B
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(AdapterLayer):
    """``W x + b + s B A drop(x)``; ``pair`` may be shared with other layers (LoRA-drop)."""

    method = "lora"

    def __init__(self, base: nn.Linear, pair: LoRAPair, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        if pair.A.shape[1] != base.in_features or pair.B.shape[0] != base.out_features:
            raise ValueError(
                f"LoRA pair shape (out={pair.B.shape[0]}, in={pair.A.shape[1]}) does not fit "
                f"layer (out={base.out_features}, in={base.in_features})"
            )
        self.lora = pair
        self.scale = float(scale)
        self.dropout = float(dropout)
        pair.to(device=base.weight.device)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.base.weight, self.base.bias, self.lora.A, self.lora.B, self.scale, p,
                           lowp=self.frozen_lowp(x))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora.B @ self.lora.A)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) of an equivalent plain LoRA, for PEFT export."""
        return self.lora.A.detach(), self.lora.B.detach(), self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora.rank}, scale={self.scale:g}, dropout={self.dropout:g}"
