"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Data-parallel adapter training only needs the (small) adapter gradients averaged, so the
loop all-reduces them itself instead of wrapping the model in DDP; every rank then holds
bit-identical adapters, and controllers reduce their statistics with :func:`all_reduce_mean`
before any mask or budget decision so all ranks decide the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (identity in one process)."""
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over ranks with one flat all-reduce (adapter gradients are small)."""
    if not (is_initialized() and world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _comm_device() -> torch.device:
    """Where a helper's own tensors must live: nccl reduces CUDA tensors only, gloo CPU ones."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_scalar(value: float) -> float:
    if not (is_initialized() and world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    return all_reduce_mean(t).item()


def sum_scalar(value: float) -> float:
    if not (is_initialized() and world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.item()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    """(min of ``lo``, max of ``hi``) over ranks, e.g. to fix a quantizer range on the global batch."""
    if not (is_initialized() and world_size() > 1):
        return float(lo), float(hi)
    t = torch.stack([-lo.float(), hi.float()]).to(_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(-t[0]), float(t[1])
