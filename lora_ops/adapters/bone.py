"""Bone and Bat block-affine adapters (arXiv 2409.15371; PEFT's MiSS ``init_weights=True`` / ``"bat"``).

Both train a zero-initialised tensor with ``b * d_out`` entries, ``b`` being the block size.

**Bone** shares one block ``D`` (b x out) across all input shards of width ``b``::

    y = W x + bias + D^T sum_j drop(x)^(j)

``x^(j)`` are consecutive chunks of ``x``; a short last chunk is zero-padded (as PEFT does).
This is LoRA with ``B = D^T`` trainable and ``A = [I I ... I]`` fixed, so ``ΔW`` is never
built: the chunk sum is a cheap reduction and the update one (N x b) @ (b x out) GEMM.

**Bat** ("weight guide") has one b x b block ``D_i`` per output row-block ``i``::

    W'_ij = W_ij (I + D_i) + D_i,        y = W' x + bias

The update depends on ``W`` through every block, so the output needs the full ``W'``.
PEFT materialises ``W'`` with autograd and keeps it (plus a clone of ``W``) alive until the
backward pass, in every layer at once. Our fused kernel builds ``W'`` as a temporary in
forward, saves only the input, and rebuilds ``W'`` in backward (a batched b x b product,
``b / N`` of the cost of the layer's GEMM): same arithmetic, no full-size saved tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_ops.adapters.amp import autocast_off, kernel_dtype
from lora_ops.adapters.base import AdapterLayer

# ----------------------------------------------------------------------------- Bone


def _shard_sum(x2: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of the width-``block`` chunks of each row of ``x2`` (N, in) -> (N, block).

    A short last chunk counts as zero-padded; we add it into the leading columns instead of
    padding, which would copy the whole input."""
    n_in = x2.shape[-1]
    aligned = (n_in // block) * block
    if aligned == n_in:
        return x2.reshape(x2.shape[0], n_in // block, block).sum(dim=1)
    s = x2[:, :aligned].reshape(x2.shape[0], aligned // block, block).sum(dim=1)
    s[:, : n_in - aligned] += x2[:, aligned:]
    return s


def _tile_add_(grad_x: torch.Tensor, g_s: torch.Tensor, block: int) -> None:
    """``grad_x += [g_s g_s ... g_s]`` (truncated), in place: the transpose of :func:`_shard_sum`."""
    n_in = grad_x.shape[-1]
    aligned = (n_in // block) * block
    if aligned:
        grad_x[:, :aligned].view(grad_x.shape[0], aligned // block, block).add_(g_s.unsqueeze(1))
    if aligned != n_in:
        grad_x[:, aligned:] += g_s[:, : n_in - aligned]


class _FusedBoneLinear(torch.autograd.Function):
    """Frozen linear + Bone branch as one autograd node; saves only the (N, b) shard sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, dropout_p: float, weight_lp=None, bias_lp=None):  # type: ignore[override]
        dt = kernel_dtype(x)  # read before autocast_off: inside it autocast is off and x's dtype would win
        with autocast_off(x):
            return _FusedBoneLinear._forward(ctx, x, weight, bias, block, dropout_p, dt, weight_lp, bias_lp)

    @staticmethod
    def _forward(ctx, x, weight, bias, block, dropout_p, dt, weight_lp, bias_lp):  # type: ignore[no-untyped-def]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)
        block = block.to(dt)
        b = block.shape[0]
        if weight_lp is not None and weight_lp.dtype == dt:  # the layer's cached copy: no per-call cast
            weight, bias = weight_lp, bias_lp
        y = F.linear(x2, weight.to(dt), bias.to(dt) if bias is not None else None)
        if dropout_p > 0.0:
            x_drop, keep = torch.native_dropout(x2, dropout_p, True)
        else:
            x_drop, keep = x2, None
        s = _shard_sum(x_drop, b)
        y.addmm_(s, block)
        ctx.save_for_backward(weight, block, s, keep)
        ctx.dropout_p = dropout_p
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_off(grad_out):
            return _FusedBoneLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        weight, block, s, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(s.dtype)
        grad_x = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            g_s = g @ block.t()  # (N, b): gradient w.r.t. the shard sum
            if keep is None:
                _tile_add_(grad_x, g_s, block.shape[0])
            else:
                # the dropout mask sits between x and the shard sum: build the masked tile separately
                tile = torch.zeros_like(grad_x)
                _tile_add_(tile, g_s, block.shape[0])
                grad_x.add_(tile * keep, alpha=1.0 / (1.0 - ctx.dropout_p))
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            grad_block = s.t() @ g
        return grad_x, None, None, grad_block, None, None, None


def bone_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block: torch.Tensor,
    dropout_p: float = 0.0,
    lowp: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Functional fused Bone linear: ``x W^T + bias + shard_sum(drop(x)) @ block`` (block: b x out).

    ``lowp``: the frozen ``(weight, bias)`` already in the compute dtype (see :func:`lora_linear`)."""
    w_lp, b_lp = lowp if lowp is not None else (None, None)
    return _FusedBoneLinear.apply(x, weight, bias, block, float(dropout_p), w_lp, b_lp)


class BoneLinear(AdapterLayer):
    """Bone: one shared ``b x out`` block added to every input shard's slice of ``W`` (PEFT MiSS default)."""

    method = "bone"

    def __init__(self, base: nn.Linear, block_size: int, dropout: float = 0.0) -> None:
        super().__init__(base)
        if not 1 <= block_size <= base.in_features:
            raise ValueError(
                f"Bone block size must be in [1, in_features={base.in_features}], got {block_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.block_size = int(block_size)
        self.dropout = float(dropout)
        # zero init: ΔW = 0 at step 0, the model starts exactly as the base model
        self.block = nn.Parameter(
            torch.zeros(block_size, base.out_features, device=base.weight.device, dtype=base.weight.dtype)
        )

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return bone_linear(x, self.base.weight, self.base.bias, self.block, p, lowp=self.frozen_lowp(x))

    def lora_a(self) -> torch.Tensor:
        """The fixed ``A = [I I ... I]`` (b x in, last identity truncated) of the equivalent LoRA."""
        b, n_in = self.block_size, self.in_features
        eye = torch.eye(b, device=self.block.device, dtype=self.block.dtype)
        return eye.repeat(1, -(-n_in // b))[:, :n_in]

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) of the equivalent plain LoRA: ``A = [I..I]``, ``B = block^T``, scale 1."""
        return self.lora_a(), self.block.detach().t(), 1.0

    def delta_weight(self) -> torch.Tensor:
        # only for merge/export; the forward pass never builds it
        return self.block.t() @ self.lora_a()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block_size}, dropout={self.dropout:g}"


# ------------------------------------------------------------------------------ Bat


def _bat_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``W'`` with blocks ``W_ij (I + D_i) + D_i`` (weight: out x in, block: out/b x b x b)."""
    n_out, b, _ = block.shape
    n_in = weight.shape[1] // b
    # rows of wv[i] run over (row a in block i, column-block j), columns over c: a free view of W
    wv = weight.reshape(n_out, b * n_in, b)
    w_new = torch.baddbmm(wv, wv, block)  # W_ij + W_ij D_i for all (i, j) in one batched GEMM
    w_new.view(n_out, b, n_in, b).add_(block.unsqueeze(2))  # + D_i on every column block j
    return w_new.view_as(weight)


def _bat_block_grad(weight: torch.Tensor, grad_w: torch.Tensor, b: int) -> torch.Tensor:
    """dL/dD_i = sum_j (W_ij + I)^T G_ij, from the gradient ``G`` w.r.t. the merged weight."""
    n_out, n_in = weight.shape[0] // b, weight.shape[1] // b
    wv = weight.reshape(n_out, b * n_in, b)
    gv = grad_w.reshape(n_out, b * n_in, b)
    out = torch.bmm(wv.transpose(1, 2), gv)  # sum_j W_ij^T G_ij
    out += grad_w.view(n_out, b, n_in, b).sum(dim=2)  # sum_j I^T G_ij
    return out


def _bat_weight_as(weight: torch.Tensor, block: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``W'`` built in the weight's precision (fp32 under autocast) and rounded to ``dt`` once:
    built in bf16, ``W D`` would be lost against ``W``'s rounding while ``D`` is still small."""
    wdt = torch.promote_types(weight.dtype, dt)
    return _bat_weight(weight.to(wdt), block.to(wdt)).to(dt)


class _FusedBatLinear(torch.autograd.Function):
    """``x W'^T + bias`` as one node; ``W'`` is recomputed in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, block):  # type: ignore[override]
        dt = kernel_dtype(x)  # read before autocast_off: inside it autocast is off and x's dtype would win
        with autocast_off(x):
            return _FusedBatLinear._forward(ctx, x, weight, bias, block, dt)

    @staticmethod
    def _forward(ctx, x, weight, bias, block, dt):  # type: ignore[no-untyped-def]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)
        y = F.linear(x2, _bat_weight_as(weight, block, dt), bias.to(dt) if bias is not None else None)
        # the temporary W' is freed here: the saved tensors are the input and the small block only
        ctx.save_for_backward(x2, weight, block)
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_off(grad_out):
            return _FusedBatLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x2, weight, block = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        w = weight.to(g.dtype)
        grad_x = grad_block = None
        if ctx.needs_input_grad[0]:
            w_new = _bat_weight_as(weight, block, g.dtype)
            grad_x = (g @ w_new).reshape(ctx.in_shape)
            del w_new
        if ctx.needs_input_grad[3]:
            grad_w = g.t() @ x2  # (out, in): the full weight gradient is inherent to Bat
            grad_block = _bat_block_grad(w, grad_w, block.shape[-1]).to(block.dtype)
        return grad_x, None, None, grad_block


def bat_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: torch.Tensor
               ) -> torch.Tensor:
    """Functional fused Bat linear: ``x W'^T + bias`` with ``W'_ij = W_ij (I + D_i) + D_i``."""
    return _FusedBatLinear.apply(x, weight, bias, block)


class BatLinear(AdapterLayer):
    """Bat: per output row-block ``i`` a ``b x b`` block, ``W'_ij = W_ij (I + D_i) + D_i`` (PEFT MiSS "bat")."""

    method = "bat"
    #: unmerge refuses blocks whose error amplification ``(1 + |D_i|_2) / sigma_min(I + D_i)`` exceeds
    #: this; the recovered W then carries a relative error of about amplification x dtype epsilon
    max_unmerge_amplification: float = 1e3

    def __init__(self, base: nn.Linear, block_size: int) -> None:
        super().__init__(base)
        b = int(block_size)
        if b < 1 or base.in_features % b or base.out_features % b:
            raise ValueError(
                f"Bat needs a block size that divides both in_features={base.in_features} and "
                f"out_features={base.out_features} (W is cut into b x b blocks); got block size {block_size}. "
                "Pick a common divisor, or use Bone, which pads."
            )
        self.block_size = b
        # zero init: W' = W at step 0
        self.block = nn.Parameter(
            torch.zeros(base.out_features // b, b, b, device=base.weight.device, dtype=base.weight.dtype)
        )

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return bat_linear(x, self.base.weight, self.base.bias, self.block)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return _bat_weight(weight.float(), self.block.detach().float()).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_ij = (W'_ij - D_i)(I + D_i)^{-1}``, solved in fp32; refuses near-singular ``I + D_i``."""
        b = self.block_size
        d = self.block.detach().float()
        a = d + torch.eye(b, device=d.device, dtype=d.dtype)
        # cond(I + D_i) alone misses the cancellation in W'_ij - D_i when |D_i| is large (e.g. D_i ~ -I):
        # bound the error growth by the norm of D_i times the norm of the inverse instead
        amp = (1.0 + torch.linalg.matrix_norm(d, ord=2)) / torch.linalg.svdvals(a)[:, -1]
        bad = ~torch.isfinite(amp) | (amp > self.max_unmerge_amplification)
        if bool(bad.any()):
            worst = int(torch.nan_to_num(amp, nan=float("inf")).argmax())
            raise ValueError(
                f"cannot unmerge Bat exactly: I + D_i is ill-conditioned (error amplification "
                f"{amp[worst].item():.3g} for row block {worst}, limit {self.max_unmerge_amplification:g}); "
                f"{int(bad.sum())} of {len(amp)} blocks are affected. Keep an unmerged copy of the base weights."
            )
        n_out, n_in = self.out_features // b, self.in_features // b
        wv = weight.float().reshape(n_out, b, n_in, b) - d.unsqueeze(2)  # W'_ij - D_i
        # X (I + D_i) = W'_ij - D_i for every j at once: right-division by the shared block
        w_old = torch.linalg.solve(a, wv.reshape(n_out, b * n_in, b), left=False)
        return w_old.reshape(weight.shape).to(weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self.base.weight.detach()
        if self.merged:
            raise RuntimeError("delta_weight of a merged Bat layer is not defined (it depends on the original W)")
        return self.merged_weight(w) - w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block_size}"
