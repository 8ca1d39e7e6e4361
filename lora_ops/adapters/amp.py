"""Autocast support for the fused adapter kernels (custom ``autograd.Function`` s).

Autocast does not reach inside a custom Function consistently: ops in ``forward`` are re-cast one
by one (mixing dtypes in the in-place ``addmm_`` calls) and ``backward`` runs without autocast at
all. The kernels therefore pick one compute dtype up front -- the autocast dtype when autocast is
on for the input's device, else the input's dtype -- cast their operands to it explicitly, and run
with autocast off. Gradients come back in that dtype; autograd casts them to each fp32
parameter's dtype on accumulation, so adapters and optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib

import torch


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fused kernel computes in for input ``x``."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``x``'s device: the kernel's casts are explicit.

    A no-op when autocast is already off, so the fp32 path pays nothing for it."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
