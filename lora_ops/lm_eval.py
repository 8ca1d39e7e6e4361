"""Causal-LM evaluation helpers (pure torch): perplexity at a pinned context."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 256, windows: int | None = None,
               batch_size: int = 4, device: str | torch.device | None = None) -> dict[str, Any]:
    """Perplexity over non-overlapping windows of ``window`` tokens from the start of ``tokens``.

    ``tokens`` is a 1-D tensor of the concatenated test text. Each window is scored
    independently (no carried context), every token but the first of a window is predicted,
    and the NLL is averaged over all predicted tokens. The protocol (window, count, tokens) is
    returned with the value so it can be logged with the metrics.
    """
    if tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D tensor of token ids")
    available = tokens.numel() // window
    count = available if windows is None else windows
    if count < 1 or count > available:
        raise ValueError(f"need {count} windows of {window} tokens, the text has {tokens.numel()} tokens")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = tokens[: count * window].view(count, window)
    nll, n = 0.0, 0
    window_nll: list[float] = []  # each window's mean NLL: the unit a bootstrap over windows resamples
    for i in range(0, count, batch_size):
        ids = chunks[i: i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        per_token = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").double().view(ids.shape[0], -1)
        nll += per_token.sum().item()
        n += per_token.numel()
        window_nll += per_token.mean(1).tolist()
    model.train(was_training)
    return {"ppl": math.exp(nll / n), "nll": nll / n, "window": window, "windows": count, "tokens": n,
            "window_nll": window_nll}
