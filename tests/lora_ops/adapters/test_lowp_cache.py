"""The low-precision copy of a frozen base weight (AdapterLayer.frozen_lowp) under bf16 autocast.

The copy is made once and reused by every call (forward and the input-gradient GEMM of backward);
outputs and adapter gradients stay within bf16 rounding of the fp32 path; state_dict, merge and
export never see it; an in-place change of the base weight rebuilds it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lora_ops.adapters.base import AdapterLayer, drop_lowp_copies
from lora_ops.adapters.bone import BoneLinear
from lora_ops.adapters.dora_dr import DoRADRLinear
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.pruning.masked import MaskedLoRALinear

BF16_TOL = 2e-2  # relative Frobenius error; bf16 keeps 8 significant bits (~4e-3 per rounding)


def _layer(kind: str, d_in: int = 48, d_out: int = 40, dropout: float = 0.0) -> AdapterLayer:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    if kind == "lora":
        layer: AdapterLayer = LoRALinear(base, LoRAPair(d_in, d_out, 4), 2.0, dropout)
    elif kind == "masked":
        layer = MaskedLoRALinear(base, LoRAPair(d_in, d_out, 4), 2.0, dropout, out_mask=True, in_mask=True)
    elif kind == "dora_dr":
        layer = DoRADRLinear(base, 4, 2.0, dropout)
    else:
        layer = BoneLinear(base, 8, dropout)
    with torch.no_grad():  # a non-trivial update, so the adapter path contributes to every output
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _run(layer: AdapterLayer, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.adapter_parameters()}
    return y.detach(), grads, x.grad.detach()


KINDS = ["lora", "masked", "dora_dr", "bone"]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_output_and_gradients_match_fp32_within_bf16_rounding(kind):
    layer = _layer(kind)
    x = torch.randn(3, 70, 48)  # 210 tokens: fp32 picks the merged plan here, bf16 the cached branched one
    y32, g32, gx32 = _run(layer, x, bf16=False)
    y16, g16, gx16 = _run(layer, x, bf16=True)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert _rel(y16, y32) < BF16_TOL
    assert _rel(gx16, gx32) < BF16_TOL
    for name in g32:
        assert g16[name].dtype == torch.float32, name  # adapters (and so the optimiser) stay fp32
        assert _rel(g16[name], g32[name]) < BF16_TOL, name
    assert layer.base.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_the_copy_is_made_once_and_reused(kind):
    layer = _layer(kind)
    x = torch.randn(2, 9, 48)
    assert layer.frozen_lowp(x) is None and layer._lowp is None  # fp32: nothing cached
    _run(layer, x, bf16=True)
    first = layer._lowp
    assert first is not None and first[1].dtype == torch.bfloat16
    assert torch.equal(first[1], layer.base.weight.detach().to(torch.bfloat16))
    _run(layer, x, bf16=True)
    assert layer._lowp is first  # the same tensors, not a new cast


class _CastCounter(TorchDispatchMode):
    """Counts dtype conversions whose result has a given shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.casts = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and \
                isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.casts += 1
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_no_weight_sized_cast_per_call(kind):
    layer = _layer(kind, d_in=48, d_out=40)
    x = torch.randn(2, 9, 48)
    _run(layer, x, bf16=True)  # builds the copy
    with _CastCounter(layer.base.weight.shape) as counter:
        for _ in range(3):
            _run(layer, x, bf16=True)
    assert counter.casts == 0


def test_state_dict_merge_and_export_never_see_the_copy():
    layer = _layer("lora")
    keys = list(layer.state_dict())
    plain = {k: v.clone() for k, v in layer.state_dict().items()}
    _run(layer, torch.randn(2, 9, 48), bf16=True)
    assert layer._lowp is not None
    state = layer.state_dict()
    assert list(state) == keys and all(torch.equal(state[k], plain[k]) for k in keys)
    assert all(v.dtype == torch.float32 for v in state.values())
    a, b, s = layer.as_lora()
    assert a.dtype == b.dtype == torch.float32
    want = layer.base.weight.detach() + s * (b @ a)
    layer.merge()
    assert layer._lowp is None and layer.base.weight.dtype == torch.float32
    torch.testing.assert_close(layer.base.weight.detach(), want)
    layer.unmerge()
    drop_lowp_copies(nn.Sequential(layer))
    assert layer._lowp is None


def test_an_in_place_change_of_the_base_weight_rebuilds_the_copy():
    layer = _layer("lora")
    x = torch.randn(2, 9, 48)
    _run(layer, x, bf16=True)
    with torch.no_grad():
        layer.base.weight.mul_(2.0)
    y, _, _ = _run(layer, x, bf16=True)
    assert torch.equal(layer._lowp[1], layer.base.weight.detach().to(torch.bfloat16))
    fresh = copy.deepcopy(layer)
    fresh.drop_lowp()
    y2, _, _ = _run(fresh, x, bf16=True)
    assert torch.equal(y, y2)


def test_bf16_with_the_copy_is_deterministic_with_dropout():
    layer = _layer("lora", dropout=0.1)
    x = torch.randn(2, 30, 48)
    torch.manual_seed(3)
    a = _run(layer, x, bf16=True)
    torch.manual_seed(3)
    b = _run(copy.deepcopy(layer), x, bf16=True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
