"""Bone / Bat: exact maths, parity with PEFT's MiSS (``init_weights=True`` / ``"bat"``), export, merge."""

import copy

import pytest
import torch
from pydantic import ValidationError
from support.tiny_training import fresh_copy, random_batch, reload_with_peft
from torch import nn

from lora_ops.adapters.base import adapter_layers
from lora_ops.adapters.bone import BatLinear, BoneLinear, bat_linear, bone_linear
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, unload

PEFT_MODE = {"bone": True, "bat": "bat"}


def _ctx(method: str, **params):
    m = get_method(method)
    return m, MethodContext(adapter=AdapterConfig(targets="all"), params=m.params_model(**params))


def _build(model, method: str, **params):
    m, ctx = _ctx(method, **params)
    targets = find_targets(model, "all")
    plan = m.decide(m.score(m.calibrate(model, targets, None, ctx), targets, ctx), targets, ctx)
    m.build(model, targets, plan, ctx)
    return m, ctx, plan


def _randomize(model, std=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.block.copy_(torch.randn(layer.block.shape, generator=gen) * std)


def _peft_twin(model, ours, method: str, block: int):
    """PEFT MiSS on a copy of ``model`` with our blocks copied in."""
    peft = pytest.importorskip("peft")
    from peft.tuners.miss import MissConfig

    names = sorted(adapter_layers(ours))
    cfg = MissConfig(r=block, init_weights=PEFT_MODE[method], target_modules=names)
    twin = peft.get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            twin.base_model.model.get_submodule(name).miss_block["default"].copy_(layer.block)
    return twin.eval()


def _inputs(model):
    if model.config.model_type == "bert":
        b = random_batch()
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    return {"input_ids": torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))}


# ------------------------------------------------------------------------ layer maths


def test_fused_bone_and_bat_gradcheck_in_double():
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    x = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    blk = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)  # 20 % 6 != 0: padded shard
    assert torch.autograd.gradcheck(lambda x, d: bone_linear(x, w, b, d), (x, blk))
    d = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: bat_linear(x, w, b, d), (x, d))


def test_bone_equals_lora_with_identity_stack():
    torch.manual_seed(0)
    for n_in, blk in [(24, 8), (30, 8)]:  # divisible and padded
        layer = BoneLinear(nn.Linear(n_in, 16), blk)
        nn.init.normal_(layer.block)
        a = layer.lora_a()
        assert torch.equal(a[:, :blk], torch.eye(blk)) and torch.equal(a[:, blk:2 * blk], torch.eye(blk))
        pair = LoRAPair(n_in, 16, blk)
        with torch.no_grad():
            pair.A.copy_(a)
            pair.B.copy_(layer.block.t())
        lora = LoRALinear(layer.base, pair, 1.0)
        x = torch.randn(5, n_in)
        torch.testing.assert_close(layer(x), lora(x))
        torch.testing.assert_close(layer.delta_weight(), lora.delta_weight())


def test_bone_padding_matches_explicit_zero_pad():
    torch.manual_seed(0)
    layer = BoneLinear(nn.Linear(13, 7), 5)  # 13 = 2 * 5 + 3: last shard padded with two zeros
    nn.init.normal_(layer.block)
    x = torch.randn(4, 13)
    xp = torch.nn.functional.pad(x, (0, 2))
    ref = layer.base(x) + xp.view(4, 3, 5).sum(1) @ layer.block
    torch.testing.assert_close(layer(x), ref)
    w = layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w, rtol=0, atol=1e-6)


def test_bone_dropout_gradients_match_reference_with_same_mask():
    torch.manual_seed(0)
    layer = BoneLinear(nn.Linear(14, 6), 4, dropout=0.3).train()  # padded and with dropout
    nn.init.normal_(layer.block)
    x = torch.randn(5, 14, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.pow(2).sum().backward()
    got = (x.grad.clone(), layer.block.grad.clone())
    x.grad = None
    layer.block.grad = None
    torch.manual_seed(7)  # same RNG stream -> same mask
    xd, _ = torch.native_dropout(x, 0.3, True)
    ref = layer.base(x) + torch.nn.functional.pad(xd, (0, 2)).view(5, 4, 4).sum(1) @ layer.block
    torch.testing.assert_close(y, ref)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], layer.block.grad)


def test_bat_block_formula_and_inverse_unmerge():
    torch.manual_seed(0)
    layer = BatLinear(nn.Linear(8, 12), 4)
    with torch.no_grad():
        layer.block.normal_(std=0.2)
    w = layer.base.weight.detach().clone()
    merged = layer.merged_weight(w)
    for i in range(3):
        for j in range(2):
            blk = w[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            d = layer.block[i].detach()
            torch.testing.assert_close(merged[4 * i:4 * i + 4, 4 * j:4 * j + 4], blk @ (torch.eye(4) + d) + d)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ merged.t() + layer.base.bias, rtol=1e-5, atol=1e-6)
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w, rtol=1e-5, atol=1e-6)


def test_bat_divisibility_error():
    with pytest.raises(ValueError, match="divide"):
        BatLinear(nn.Linear(40, 32), 16)
    with pytest.raises(ValueError, match="divide"):
        BatLinear(nn.Linear(32, 40), 16)


def test_bat_plan_rejects_non_dividing_block(tiny_llama):
    m, ctx = _ctx("bat", block_size=12)  # k/v project 48 -> 16 under GQA
    with pytest.raises(ValueError, match="k_proj"):
        m.decide([], find_targets(tiny_llama, "all"), ctx)


def test_bat_has_no_dropout_param():
    with pytest.raises(ValidationError):
        get_method("bat").params_model(dropout=0.1)


@pytest.mark.parametrize("shrink", [1.0, 1.0 - 1e-5])  # I + D_1 singular; I + D_1 = 1e-5 I (cancellation)
def test_bat_unmerge_refuses_ill_conditioned_block(shrink):
    torch.manual_seed(0)
    layer = BatLinear(nn.Linear(8, 8), 4)
    with torch.no_grad():
        layer.block[1].copy_(-shrink * torch.eye(4))
    layer.merge()
    merged = layer.base.weight.clone()
    with pytest.raises(ValueError, match="ill-conditioned"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base.weight, merged)  # left merged, not half-unmerged


def test_bf16_inputs_run_and_stay_close():
    torch.manual_seed(0)
    for layer in (BoneLinear(nn.Linear(32, 16), 8), BatLinear(nn.Linear(32, 16), 8)):
        with torch.no_grad():
            layer.block.normal_(std=0.1)
        x = torch.randn(4, 32)
        ref = layer(x)
        layer_bf = copy.deepcopy(layer).to(torch.bfloat16)
        got = layer_bf(x.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------ models


@pytest.mark.parametrize("method", ["bone", "bat"])
def test_zero_init_leaves_outputs_unchanged(tiny_bert, method):
    inputs = _inputs(tiny_bert)
    with torch.no_grad():
        before = tiny_bert(**inputs).logits
    _build(tiny_bert, method, block_size=16)
    with torch.no_grad():
        after = tiny_bert(**inputs).logits
    assert len(adapter_layers(tiny_bert)) == 18
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("method,block", [("bone", 16), ("bone", 10), ("bat", 16)])
def test_parity_with_peft_miss(request, model_name, method, block):
    model = request.getfixturevalue(model_name)
    base = copy.deepcopy(model)
    _build(model, method, block_size=block)
    _randomize(model)
    twin = _peft_twin(base, model, method, block)
    inputs = _inputs(model)

    # forward
    ours, theirs = model(**inputs).logits, twin(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (ours - base(**inputs).logits).abs().max() > 1e-3  # the blocks really act

    # gradients of every block
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    for name, layer in adapter_layers(model).items():
        ref = twin.base_model.model.get_submodule(name).miss_block["default"].grad
        assert layer.block.grad.abs().max() > 0
        torch.testing.assert_close(layer.block.grad, ref, rtol=1e-4, atol=1e-6, msg=name)

    # merge and unmerge: identical base weights
    for layer in adapter_layers(model).values():
        layer.merge()
    twin.merge_adapter()
    for name, layer in adapter_layers(model).items():
        ref = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base.weight, ref, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, twin(**inputs).logits, rtol=1e-5, atol=1e-5)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    twin.unmerge_adapter()
    for name, layer in adapter_layers(model).items():
        ref = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base.weight, ref, rtol=1e-5, atol=1e-6, msg=name)
        orig = base.get_submodule(name).weight
        torch.testing.assert_close(layer.base.weight, orig, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["bone", "bat"])
def test_parameter_counts_match_block_shapes(tiny_bert, method):
    m, _, _ = _build(tiny_bert, method, block_size=16)
    expected = sum(16 * t.out_features for t in find_targets(tiny_bert, "all"))
    assert m.parameter_counts(tiny_bert) == {"trainable": expected, "active": expected, "stored": expected}


@pytest.mark.parametrize("model_name,method,block", [("tiny_bert", "bone", 10), ("tiny_bert", "bat", 16),
                                                     ("tiny_llama", "bone", 16), ("tiny_llama", "bat", 16)])
def test_peft_export_reloads_with_identical_outputs(request, tmp_path, model_name, method, block):
    pytest.importorskip("peft")

    model = request.getfixturevalue(model_name)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    m, ctx, plan = _build(model, method, block_size=block)
    _randomize(model)
    inputs = _inputs(model)
    with torch.no_grad():
        ours = model(**inputs).logits
    export = m.export_peft(model, plan, ctx)
    assert export.config["peft_type"] == "MISS" and export.config["init_weights"] == PEFT_MODE[method]
    assert export.config["r"] == block
    assert all(k.startswith("base_model.model.") and k.endswith(".miss_block") for k in export.tensors)
    loaded = reload_with_peft(export, fresh_copy(model, base_state), tmp_path)
    for name, layer in adapter_layers(model).items():  # every tensor really landed
        got = loaded.base_model.model.get_submodule(name).miss_block["default"]
        assert torch.equal(got, layer.block.detach())
    with torch.no_grad():
        theirs = loaded(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["bone", "bat"])
def test_unload_merge_matches_adapted_outputs(tiny_llama, method):
    _build(tiny_llama, method, block_size=16)
    _randomize(tiny_llama)
    inputs = _inputs(tiny_llama)
    with torch.no_grad():
        adapted = tiny_llama(**inputs).logits
        unload(tiny_llama, merge=True)
        merged = tiny_llama(**inputs).logits
    assert not adapter_layers(tiny_llama)
    assert all(type(m) is not BoneLinear and type(m) is not BatLinear for m in tiny_llama.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_bone_plan_rejects_block_wider_than_input(tiny_bert):
    m, ctx = _ctx("bone", block_size=33)  # tiny BERT's attention inputs are 32 wide
    with pytest.raises(ValueError, match="exceeds the input width"):
        m.decide([], find_targets(tiny_bert, "all"), ctx)
