"""The base-bits ablation runs B-LoRA's own quantize_base path: parity with BLoRALinear and LoRALinear."""

import pytest
import torch
from torch import nn

from benchmarks.blora_base_bits import (
    QuantizedBasePath,
    fixed_quantizer,
    quantized_base,
    report,
    variant_keys,
)
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


def test_width_off_the_grid_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fixed_quantizer(BITS, 6)
    assert exit_info.value.code == 2
    assert "not on B-LoRA's grid" in capsys.readouterr().err


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


def test_output_quantizer_acts_on_the_layer_sum():
    """Q_o quantises base + adapter together, after the adapter is added (as BLoRALinear's y = Q_o(y))."""
    layer = _lora()
    x = torch.randn(3, 5, 24)
    q = fixed_quantizer(BITS, 4)
    q.set_range(-5.0, 5.0)
    assert torch.equal(QuantizedBasePath(layer, {"o": q})(x), q(layer(x), deterministic=True))


def test_report_pairs_each_variant_with_its_own_seeds_float_model():
    labels = [0, 1] * 50
    good = {"validation": labels, "dev": labels}
    worse = {"validation": labels, "dev": [0] * 100}  # majority class on dev: matthews 0
    runs = [{"seed": s, "steps": 3, "labels": good, "float": good, "variants": {"W@4": worse, "W@8": good}}
            for s in (1, 2)]
    text = report(runs, "matthews")
    rows = {line.split("|")[1].strip() + "@" + line.split("|")[2].strip(): line for line in text.splitlines()
            if line.startswith("| W ")}
    assert "-100.00 [-100.00, -100.00]" in rows["W@4"]  # variant − float, in points: float scores 100
    assert "+0.00 [+0.00, +0.00]" in rows["W@8"]


def test_variant_keys_follow_parts_then_widths():
    assert variant_keys([8, 4]) == ["W@8", "W@4", "h+o@8", "h+o@4", "W+h+o@8", "W+h+o@4"]


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
        float_y = float_h + swapped.scale * (x @ swapped.A.t() @ swapped.B.t())
        lo, hi = float(float_y.min()), float(float_y.max())
        assert float(swapped.quantizers["o"].x_max) == max(-lo, hi)
        quantized = wrapped(x)
    assert not torch.equal(quantized, before)
    assert isinstance(model.lin, LoRALinear)
    assert torch.equal(model(x), before)
