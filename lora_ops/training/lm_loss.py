"""Causal-LM loss without the full logits tensor: output projection and cross-entropy in chunks of rows.

SmolLM2-135M ties a 576 x 49,152 output projection to its embeddings: for a batch of 8 x 256 tokens its
fp32 logits take 400 MB, the softmax gradient as much again, and with right padding to a fixed length many
of those rows belong to padding the loss ignores anyway. :func:`causal_lm_loss` runs the decoder, keeps only
the positions whose next token is a target, and :func:`linear_cross_entropy` computes the loss and, in the
same pass, its gradient with respect to the hidden states (and to the projection when it trains) ``chunk``
rows at a time. At most ``chunk`` rows of logits exist at once and none is recomputed in backward: the
gradient of a mean cross-entropy with respect to its logits is ``(softmax - onehot) / count``, known as soon
as the chunk's logits are.

Exact: the same mean over non-ignored next-token targets as transformers' causal-LM loss (labels shifted by
one, ``-100`` ignored), to float rounding (the sum runs chunk by chunk). Under autocast the projection runs
in the autocast dtype and the softmax in float32, as transformers upcasts its logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                targets: torch.Tensor, chunk: int, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad says True under no_grad too: the caller's grad mode decides whether any is made
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        count = targets.numel()
        # under autocast (which casts float32 / 16-bit weights, never float64): the projection cast once per
        # call (not per chunk), its GEMMs in the autocast dtype; softmax, loss and gradient sums in float32 at
        # least (float64 stays float64)
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device) and weight.dtype in (torch.float32, torch.float16,
                                                                          torch.bfloat16)
        compute = torch.get_autocast_dtype(device) if autocast else weight.dtype
        acc = torch.promote_types(torch.promote_types(compute, hidden.dtype), torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        w = weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        with torch.autocast(device, enabled=False):
            for start in range(0, count, chunk):
                h, t = hidden[start:start + chunk], targets[start:start + chunk]
                logits = F.linear(h.to(compute), w, b).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = torch.exp(logits - lse[:, None])  # the softmax, from the logsumexp already made
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                # 1 / count is applied after the products: (softmax - onehot) / count would underflow in fp16
                # (~1e-8 for a 49k vocabulary over 2k tokens) before the loss scaler could lift it
                if need_h:
                    grad_h[start:start + chunk] = (g.to(compute) @ w).to(acc) / count
                if need_w:
                    grad_w += g.t() @ h.to(acc)
                if need_b:
                    grad_b += g.sum(0)
        if need_w:
            grad_w /= count
        if need_b:
            grad_b /= count
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out if need else None for need in ctx.which]
        grads = [g.to(d) if g is not None else None for g, d in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` (mean) with at most ``chunk`` rows
    of logits alive at a time. ``hidden``: (N, H) rows, every one a target (drop ignored rows first)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 row, got {chunk}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.numel() == 0:
        raise ValueError("no target to take the loss over: every label is ignored (-100)")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, torch.is_grad_enabled())


def chunked_loss_unsupported(model: nn.Module) -> str:
    """Why :func:`causal_lm_loss` cannot stand in for ``model``'s own loss ("" when it can): it needs a causal
    LM whose logits are exactly its output projection of the decoder's last hidden state."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    # transformers returns the model itself when it finds no decoder attribute: not a decoder to run apart
    if decoder is None or decoder is model or type(head) is not nn.Linear:
        return f"{type(model).__name__} has no plain decoder + nn.Linear output projection (an adapted lm_head?)"
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder (its decoder needs the encoder's outputs)"
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} transforms its logits ({key})"
    return ""


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """The next-token loss of a transformers causal LM on ``batch`` (``input_ids``, ``attention_mask``,
    ``labels`` with -100 where no loss is taken), as its own ``.loss``, computed by :func:`linear_cross_entropy`
    on the positions that have a target only."""
    why = chunked_loss_unsupported(model)
    if why:
        raise ValueError(f"chunked LM loss: {why}")
    head = model.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model.get_decoder()(**inputs)
    hidden = out[0]
    targets = batch["labels"][:, 1:].reshape(-1).to(hidden.device)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    return linear_cross_entropy(rows[keep], head.weight, targets[keep], head.bias, chunk)
