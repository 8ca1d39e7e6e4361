"""FLOP estimates of a LoRA training step on a BERT-style encoder, and the machine's measured GEMM rate.

The estimate counts the matrix products only (what oneDNN/BLAS runs), per token of a batch padded to
``seq`` tokens:

* frozen linear layers: forward ``2·in·out`` plus the input-gradient GEMM in backward (same again);
  no weight gradient (the base is frozen);
* LoRA factors (rank r on each adapted linear): forward ``2r(in+out)``, backward input gradient
  ``2r(in+out)`` and the factor gradients ``2r(in+out)``;
* attention: ``QKᵀ`` and ``PV`` forward ``4·seq·hidden``, backward twice that.

The peak is not a datasheet number: :func:`gemm_rate` times ``F.linear`` at the model's own shapes
(hidden→hidden, hidden→ffn, ffn→hidden) on ``tokens`` rows in the given dtype with the current
thread count, so "share of peak" means share of what this machine's GEMM library reaches here.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def step_flops_per_token(hidden: int, ffn: int, layers: int, seq: int, rank: int, lora_linears: int = 6) -> float:
    """Estimated FLOPs per (padded) token of one training step (see the module docstring)."""
    shapes = [(hidden, hidden)] * 4 + [(hidden, ffn), (ffn, hidden)]
    frozen = sum(2 * 2 * i * o for i, o in shapes)
    lora = sum(3 * 2 * rank * (i + o) for i, o in shapes[:lora_linears]) if rank else 0
    attention = 3 * 4 * seq * hidden
    return float(layers * (frozen + lora + attention))


def batch_flops(widths_and_rows: list[tuple[int, int]], hidden: int, ffn: int, layers: int, rank: int) -> float:
    """Total estimated FLOPs of batches given as (padded width, rows)."""
    return sum(w * n * step_flops_per_token(hidden, ffn, layers, w, rank) for w, n in widths_and_rows)


def gemm_rate(hidden: int, ffn: int, dtype: torch.dtype, tokens: int = 2048, reps: int = 20) -> float:
    """Measured ``F.linear`` GFLOP/s at the model's shapes (median of ``reps``, weighted as in a layer)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(hidden, ffn), (ffn, hidden)]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    xs = {i: torch.randn(tokens, i, generator=g).to(dtype) for i in {hidden, ffn}}
    ws = [torch.randn(o, i, generator=g).to(dtype) for i, o in shapes]
    with torch.no_grad():
        for _ in range(3):
            for (i, _o), w in zip(shapes, ws):
                F.linear(xs[i], w)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for (i, _o), w in zip(shapes, ws):
                F.linear(xs[i], w)
            times.append(time.perf_counter() - start)
    times.sort()
    return flops / times[len(times) // 2] / 1e9
