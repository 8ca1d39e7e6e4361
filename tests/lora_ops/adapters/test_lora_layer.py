import pytest
import torch
from torch import nn

from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_linear


def _layer(in_f=24, out_f=16, r=4, scale=2.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    pair = LoRAPair(in_f, out_f, r)
    nn.init.normal_(pair.B)  # non-zero B so the branch matters
    return LoRALinear(base, pair, scale, dropout)


def test_fused_forward_matches_composed_reference():
    layer = _layer()
    x = torch.randn(3, 5, 24)
    ref = layer.base(x) + layer.scale * (x @ layer.lora.A.t() @ layer.lora.B.t())
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("plan", ["merged", "branched", "auto"])
def test_fused_gradients_match_autograd_in_double(plan):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w, b, a, bb, 1.7, plan=plan), (x, a, bb))


def test_merged_and_branched_plans_agree_in_float32():
    layer = _layer()
    x = torch.randn(64, 24, requires_grad=True)
    outs = []
    for plan in ("merged", "branched"):
        y = lora_linear(x, layer.base.weight, layer.base.bias, layer.lora.A, layer.lora.B, layer.scale, plan=plan)
        grads = torch.autograd.grad(y.pow(2).sum(), (x, layer.lora.A, layer.lora.B))
        outs.append((y, *grads))
    for m, b in zip(*outs):
        torch.testing.assert_close(m, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, layer.base.weight, None, layer.lora.A, layer.lora.B, 1.0, dropout_p=0.1, plan="merged")


def test_fused_dropout_gradients_match_reference_with_same_mask():
    layer = _layer(dropout=0.3).train()
    x = torch.randn(4, 24, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    y.pow(2).sum().backward()
    got = (x.grad.clone(), layer.lora.A.grad.clone(), layer.lora.B.grad.clone())
    x.grad = None
    layer.lora.A.grad = None
    layer.lora.B.grad = None
    torch.manual_seed(123)  # same RNG stream -> same dropout mask
    xd, _ = torch.native_dropout(x, 0.3, True)
    ref = layer.base(x) + layer.scale * (xd @ layer.lora.A.t() @ layer.lora.B.t())
    torch.testing.assert_close(y, ref)
    ref.pow(2).sum().backward()
    for g, r in zip(got, (x.grad, layer.lora.A.grad, layer.lora.B.grad)):
        torch.testing.assert_close(g, r)


def test_forward_equals_merged_weight_and_unmerge_restores():
    layer = _layer()
    x = torch.randn(7, 24)
    before = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base.weight, before + layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before, rtol=0, atol=1e-6)


def test_shared_pair_receives_sum_of_user_gradients():
    torch.manual_seed(0)
    bases = [nn.Linear(8, 8) for _ in range(3)]
    shared = LoRAPair(8, 8, 2)
    nn.init.normal_(shared.B)
    layers = [LoRALinear(b, shared, 1.5) for b in bases]
    xs = [torch.randn(5, 8) for _ in range(3)]
    sum(layer(x).sum() for layer, x in zip(layers, xs)).backward()
    # same computation with independent copies of the pair
    copies = []
    for b, x in zip(bases, xs):
        p = LoRAPair(8, 8, 2)
        p.load_state_dict(shared.state_dict())
        LoRALinear(b, p, 1.5)(x).sum().backward()
        copies.append(p)
    torch.testing.assert_close(shared.A.grad, sum(p.A.grad for p in copies))
    torch.testing.assert_close(shared.B.grad, sum(p.B.grad for p in copies))
    assert sum(1 for _ in nn.ModuleList(layers).parameters() if _.requires_grad) == 2


def test_zero_init_leaves_model_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, LoRAPair(10, 6, 4), 2.0)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), base(x))
