"""The base-bits ablation runs B-LoRA's own quantize_base path: parity with BLoRALinear and LoRALinear."""

import pytest
import torch
from torch import nn

from benchmarks.blora_base_bits import QuantizedBasePath, fixed_quantizer, quantized_base
from lora_ops.adapters.blora import BLoRALinear
from lora_ops.adapters.lora import LoRALinear, LoRAPair

BITS = (2, 4, 8, 16, 32)


def _lora(seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 16)
    pair = LoRAPair(24, 16, 4)
    nn.init.normal_(pair.B)
    return LoRALinear(base, pair, 2.0).eval()


@pytest.mark.parametrize("width", BITS)
def test_pinned_quantizer_reads_out_its_width(width):
    assert fixed_quantizer(BITS, width).bit_width() == width


def test_width_off_the_grid_is_refused():
    with pytest.raises(SystemExit, match="not on B-LoRA's grid"):
        fixed_quantizer(BITS, 6)


def test_without_quantizers_it_is_the_lora_layer():
    layer = _lora()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(QuantizedBasePath(layer, {})(x), layer(x))


@pytest.mark.parametrize("width", [2, 4, 8])
def test_base_path_is_blora_quantize_base_path(width):
    """W and h quantised as BLoRALinear(quantize_base=True) does, bit for bit (adapter branch zeroed)."""
    layer = _lora()
    nn.init.zeros_(layer.lora.B)
    x = torch.randn(3, 5, 24)
    h_range = (-3.0, 4.0)
    ours = {"W": fixed_quantizer(BITS, width), "h": fixed_quantizer(BITS, width)}
    ours["h"].set_range(*h_range)
    blora = BLoRALinear(layer.base, rank=2, scale=1.0, bits=BITS, quantize_base=True, learn_ranges=False).eval()
    for name in ("W", "h"):
        blora.quantizers[name].log_alpha.data.copy_(ours[name].log_alpha)
    blora.quantizers["h"].set_range(*h_range)
    expected = blora._base_out(x)
    got = QuantizedBasePath(layer, ours)(x)
    assert torch.equal(got, expected)
    assert not torch.equal(got, layer.base(x))  # the quantisers did act


def test_context_calibrates_on_the_float_path_and_restores_the_layers():
    model = nn.Sequential()
    model.add_module("lin", _lora())
    x = torch.randn(8, 24)
    before = model(x)

    class Wrapper(nn.Module):  # the ablation calls the model with keyword batches, as HF models take them
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs):
            return self.inner(inputs)

    wrapped = Wrapper()
    with quantized_base(wrapped, ("W", "h", "o"), BITS, 4, [{"inputs": x}]):
        swapped = wrapped.inner.lin
        assert isinstance(swapped, QuantizedBasePath)
        float_h = swapped.base(x)  # what Q_h saw in calibration: the unquantised weight's output
        lo, hi = float(float_h.min()), float(float_h.max())
        assert float(swapped.quantizers["h"].x_max) == max(-lo, hi)
        quantized = wrapped(x)
    assert not torch.equal(quantized, before)
    assert isinstance(model.lin, LoRALinear)
    assert torch.equal(model(x), before)
