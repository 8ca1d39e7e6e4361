import json
import math
import warnings

import pytest
import torch
from pydantic import ValidationError
from support.tiny_training import InterruptAtStep, fresh_copy, random_batch, reload_with_peft
from torch import nn

from lora_ops.adapters.base import adapter_layers
from lora_ops.adapters.blora import (
    BLoRALinear,
    blora_layers,
    bops_report,
    dequantize_export,
    float_export_gap,
    float_lora_mode,
)
from lora_ops.data import BatchSource
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.methods.blora import AdapterCollapsed, BLoRAController, BLoRAParams
from lora_ops.quant import (
    BayesianBitsQuantizer,
    RankGates,
    deterministic_gate,
    gate_values,
    hard_concrete_sample,
    on_log_alpha_threshold,
    prob_active,
    residual_quantize,
)
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training import TrainConfig, train

ON, OFF = 6.0, -6.0


def _ctx(rank=4, **params):
    m = get_method("blora")
    return m, MethodContext(adapter=AdapterConfig(rank=rank, alpha=2 * rank), params=m.params_model(**params))


def _set_bits(q: BayesianBitsQuantizer, bits: int) -> None:
    """Open the gates up to ``bits`` and close the rest."""
    n_on = q.bits.index(bits)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([ON] * n_on + [OFF] * (len(q.bits) - 1 - n_on)))


# --------------------------------------------------------------------------- quantizer
X = torch.tensor([0.37, -1.26, 0.05, 1.33])
# range [-1.5, 1.5]: s2 = 3/3 = 1, s4 = 1/5 = 0.2, s8 = 0.2/17
EXPECTED = {
    2: [0.0, -1.0, 0.0, 1.0],
    4: [0.4, -1.2, 0.0, 1.4],
    8: [0.4 - 3 * 0.2 / 17, -1.2 - 5 * 0.2 / 17, 4 * 0.2 / 17, 1.4 - 6 * 0.2 / 17],
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_residual_quantizer_on_known_tensor(bits):
    n_on = [2, 4, 8, 16, 32].index(bits)
    gates = torch.tensor([1.0] * n_on + [0.0] * (4 - n_on))
    out = residual_quantize(X, torch.tensor(1.5), True, gates)
    torch.testing.assert_close(out, torch.tensor(EXPECTED[bits]), rtol=0, atol=1e-6)
    # the module form with the same gates (deterministic) and a calibrated range gives the same
    q = BayesianBitsQuantizer().eval()
    q.set_range(-1.5, 1.2)  # symmetric signed grid: the larger side sets the range
    _set_bits(q, bits)
    assert q.bit_width() == bits
    torch.testing.assert_close(q(X), torch.tensor(EXPECTED[bits]), rtol=0, atol=1e-6)


def test_quantizer_high_bits_nesting_and_soft_gates():
    full = residual_quantize(X, torch.tensor(1.5), True, torch.ones(4))
    torch.testing.assert_close(full, X, rtol=0, atol=1e-6)  # 32 bits: essentially the input
    # gates are nested: a closed 4-bit gate removes every finer residual
    nested = residual_quantize(X, torch.tensor(1.5), True, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(nested, torch.tensor(EXPECTED[2]))
    half = residual_quantize(X, torch.tensor(1.5), True, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(half, (torch.tensor(EXPECTED[2]) + torch.tensor(EXPECTED[4])) / 2)
    # unsigned range [0, 3] has the same 2-bit step of 1
    pos = torch.tensor([0.37, 2.6, 1.33])
    torch.testing.assert_close(residual_quantize(pos, torch.tensor(3.0), False, torch.zeros(4)),
                               torch.tensor([0.0, 3.0, 1.0]))


def test_quantizer_first_tensor_range_and_straight_through_gradient():
    q = BayesianBitsQuantizer().train()
    x = torch.tensor([-0.5, 0.25, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert bool(q.initialized) and bool(q.signed) and q.x_max.item() == 2.0
    torch.testing.assert_close(x.grad, torch.ones(3))  # STE: identity gradient through rounding
    assert q.log_alpha.grad is not None and q.x_max.grad is not None
    q2 = BayesianBitsQuantizer()
    q2(torch.tensor([0.0, 0.5, 1.0]))
    assert not bool(q2.signed) and q2.x_max.item() == 1.0  # x_min clamped to 0: unsigned grid


# -------------------------------------------------------------------------------- gates
def test_gate_probabilities_and_test_time_rule():
    p = prob_active(torch.tensor([2.0, 6.0, 0.0]))
    assert p.tolist() == pytest.approx([0.973, 0.9995, 0.832], abs=5e-4)
    assert on_log_alpha_threshold() == pytest.approx(-0.935, abs=1e-3)
    assert deterministic_gate(torch.tensor([-0.93, -0.94, 2.0, -3.0])).tolist() == [1.0, 0.0, 1.0, 0.0]
    # training samples are in [0, 1] and non-zero with probability P(z != 0)
    torch.manual_seed(0)
    z = hard_concrete_sample(torch.zeros(20000))
    assert z.min() >= 0 and z.max() <= 1
    assert (z > 0).float().mean().item() == pytest.approx(0.832, abs=0.015)


def test_closing_rule_shuts_gate_and_all_higher_even_in_training():
    torch.manual_seed(0)
    log_alpha = torch.tensor([ON, -2.0, ON, ON])
    for _ in range(20):
        z = gate_values(log_alpha, training=True)
        assert z[1:].eq(0).all()
    q = BayesianBitsQuantizer()
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([ON, ON, -2.5, ON]))
    assert q.bit_width() == 8


def test_rank_mask_is_cumulative_product_first_always_on():
    g = RankGates(5).eval()
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([ON, OFF, ON, ON]))
    assert g.mask().tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert g.effective_rank() == 2
    torch.testing.assert_close(g.mask(), torch.cat([torch.ones(1), torch.cumprod(deterministic_gate(g.log_alpha), 0)]))
    with torch.no_grad():
        g.log_alpha.fill_(OFF)
    assert g.mask().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # first component can never close
    # training: hard 0/1 values, non-increasing, and gradient reaches the gates (straight-through)
    g.train()
    with torch.no_grad():
        g.log_alpha.fill_(0.0)
    torch.manual_seed(1)
    for _ in range(10):
        m = g.mask()
        assert set(m.tolist()) <= {0.0, 1.0} and m[0] == 1.0
        assert (m[1:] <= m[:-1]).all()
    g.mask().sum().backward()
    assert g.log_alpha.grad is not None


# ------------------------------------------------------------------------ layer and BOPs
def _layer(in_f=4, out_f=3, rank=2, quantize_base=False, seed=0):
    torch.manual_seed(seed)
    return BLoRALinear(nn.Linear(in_f, out_f), rank, 1.0, quantize_base=quantize_base)


def test_bops_of_tiny_model_by_hand():
    model = nn.Sequential(_layer(4, 3, 2), _layer(3, 5, 2, quantize_base=True)).eval()
    l1, l2 = model[0], model[1]
    for name, b in {"A": 8, "B": 4, "E": 2, "a": 16, "e": 8, "ab": 32}.items():
        _set_bits(l1.quantizers[name], b)
        _set_bits(l2.quantizers[name], b)
    _set_bits(l2.quantizers["W"], 4)
    with torch.no_grad():
        l2.rank_gates.log_alpha.fill_(OFF)  # rank 1
    assert l1.effective_rank() == 2 and l2.effective_rank() == 1
    # layer 1 (in 4, out 3, r 2), unquantised base at 16 bits, inputs assumed 16-bit:
    #   base 3*4*16*16 = 3072; A 2*4*8*16 = 1024; E 2*2*16 = 64; B 3*2*4*8 = 192
    # layer 2 (in 3, out 5, r 1), base at 4 bits: base 5*3*4*16 = 960; A 1*3*8*16 = 384; E 1*2*16 = 32; B 5*1*4*8 = 160
    # baseline (16-bit LoRA at r = 2): 3072 + (2*4 + 3*2)*256 = 6656 and 15*256 + (2*3 + 5*2)*256 = 7936
    rep = bops_report(model, activation_bits=16, weight_bits=16, baseline_bits=16)
    assert rep["base"] == 3072 + 960
    assert rep["adapter"] == (1024 + 64 + 192) + (384 + 32 + 160)
    assert rep["total"] == 4032 + 1856
    assert rep["baseline_total"] == 6656 + 7936
    assert rep["ratio_total"] == pytest.approx(5888 / 14592)
    assert rep["activation_bits_assumed"] == 16
    # a different assumed input width scales the x-side terms only
    rep8 = bops_report(model, activation_bits=8)
    assert rep8["base"] == 3072 // 2 + 960 // 2


def test_layer_gradients_reach_adapter_not_base_and_quantize_base_runs():
    for qb in (False, True):
        layer = _layer(6, 5, 3, quantize_base=qb).train()
        x = torch.randn(4, 6, requires_grad=True)
        (layer(x).sum() + layer.regularizer()).backward()
        assert layer.base.weight.grad is None and layer.base.bias.grad is None
        assert not layer.base.weight.requires_grad
        for name in ("A", "B", "E", "rank_gates.log_alpha", "quantizers.A.log_alpha", "quantizers.ab.x_max"):
            assert layer.get_parameter(name).grad is not None, name
        assert x.grad is not None
        assert ("W" in layer.quantizers) == qb
        assert layer.no_decay_parameter_names() >= {"rank_gates.log_alpha", "quantizers.A.log_alpha",
                                                     "quantizers.A.x_max"}
        assert not {"A", "B", "E"} & layer.no_decay_parameter_names()


def test_backbone_gets_no_gradient_and_training_runs(tiny_bert):
    method, ctx = _ctx(rank=4)
    targets = find_targets(tiny_bert, ["q", "v", "down"])
    method.build(tiny_bert, targets, method.decide([], targets, ctx), ctx)
    freeze_all_but(tiny_bert, ["classifier"])
    ctl = method.controller(tiny_bert, {}, ctx)
    b = random_batch()
    (tiny_bert(**b).loss + ctl.regularizer(0)).backward()
    for n, p in tiny_bert.named_parameters():
        adapter = any(n.endswith(s) for s in (".A", ".B", ".E")) or "log_alpha" in n or "x_max" in n
        if adapter or n.startswith("classifier."):
            assert p.grad is not None, n
        else:
            assert p.grad is None and not p.requires_grad, n
    tiny_bert.zero_grad(set_to_none=True)
    frozen = {n: p.clone() for n, p in tiny_bert.named_parameters() if not p.requires_grad}
    data = BatchSource(random_batch(n=8, seed=5), batch_size=4, seed=1)
    res = train(tiny_bert, data, TrainConfig(epochs=2, lr=1e-2, progress=False), controller=ctl)
    assert all("regularizer" in h and h["regularizer"] > 0 for h in res.history)
    for n, p in tiny_bert.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    summary = ctl.summary()
    json.dumps(summary)
    assert len(summary["modules"]) == len(targets)
    row = summary["modules"][0]
    assert {"module", "rank", "bits_A", "bits_B", "bits_E", "bits_a", "bops_total"} <= set(row)
    assert summary["bops"]["activation_bits_assumed"] == 16


def test_regularizer_value_and_lambda_scaling():
    layer = _layer(4, 3, 3)
    q4 = prob_active(torch.tensor(2.0)).item()
    per_q = 1 + q4 + q4**2 + q4**3 + q4**4  # every bit gate at log alpha 2
    q_rank = prob_active(torch.tensor(6.0)).item()
    expected = 5 * per_q + q_rank * per_q  # A B a e ab + E weighted by the mean rank-gate probability
    assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)
    ctl = BLoRAController(nn.Sequential(layer), BLoRAParams(lmbda=0.01))
    assert ctl.regularizer(0).item() == pytest.approx(0.01 * expected, rel=1e-5)


def test_controller_state_round_trip_and_mismatch(tiny_bert):
    method, ctx = _ctx(lmbda=2e-3)
    targets = find_targets(tiny_bert, ["q", "v"])
    method.build(tiny_bert, targets, method.decide([], targets, ctx), ctx)
    ctl = method.controller(tiny_bert, {}, ctx)
    ctl.ended = True
    state = ctl.state_dict()
    json.dumps(state)
    other = method.controller(tiny_bert, {}, ctx)
    other.load_state_dict(state)
    assert other.state_dict() == state
    wrong = BLoRAController(tiny_bert, BLoRAParams(lmbda=1e-3))
    with pytest.raises(ValueError, match="lmbda"):
        wrong.load_state_dict(state)


# ---------------------------------------------------------------- calibration and export
def test_calibration_leaves_model_untouched_and_ranges_reach_build(tiny_bert):
    method, ctx = _ctx(rank=4)
    targets = find_targets(tiny_bert, ["q", "v"])
    freeze_all_but(tiny_bert, ["classifier"])
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_bert.named_parameters()}
    rows = method.calibrate(tiny_bert, targets, BatchSource(random_batch(n=8, seed=3), 4, seed=0), ctx)
    assert not adapter_layers(tiny_bert)
    assert all(torch.equal(before[k], v) for k, v in tiny_bert.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in tiny_bert.named_parameters()}
    assert len(rows) == len(targets) and set(rows[0]["ranges"]) == {"A", "B", "E", "a", "e", "ab"}
    plan = method.decide(method.score(rows, targets, ctx), targets, ctx)
    json.dumps(plan)
    assert plan["range_source"] == "calibration"
    layers = method.build(tiny_bert, targets, plan, ctx)
    name = targets[0].name
    layer = layers[name]
    assert all(bool(q.initialized) for q in layer.quantizers.values())
    # same seeded initialisation in calibrate and build: the factor ranges match the built factors
    lo, hi = rows[0]["ranges"]["A"]
    assert layer.quantizers["A"].x_max.item() == pytest.approx(max(-lo, hi))
    assert layer.A.abs().max().item() == pytest.approx(max(-lo, hi))
    # without calibration the ranges come from the first tensor seen
    _, ctx2 = _ctx(rank=4)
    plan2 = method.decide([], targets, ctx2)
    assert plan2["range_source"] == "first tensor seen"


def _trained_like(tiny_bert, rank=4):
    """A built blora model with heterogeneous gates, as after training."""
    method, ctx = _ctx(rank=rank)
    targets = find_targets(tiny_bert, "all")
    plan = method.decide([], targets, ctx)
    layers = method.build(tiny_bert, targets, plan, ctx)
    tiny_bert.eval()
    with torch.no_grad():
        tiny_bert(**{k: v for k, v in random_batch().items() if k != "labels"})  # fix first-tensor ranges
    for i, layer in enumerate(layers.values()):
        for j, q in enumerate(layer.quantizers.values()):
            _set_bits(q, [4, 8, 16][(i + j) % 3])
        with torch.no_grad():
            k = i % rank  # ranks 1..rank
            layer.rank_gates.log_alpha.copy_(torch.tensor([ON] * k + [OFF] * (rank - 1 - k)))
    return method, ctx, plan, layers


def test_quantized_export_drops_masked_ranks_and_dequantizes_exactly(tiny_bert):
    method, ctx, plan, layers = _trained_like(tiny_bert)
    tensors, meta = method.export_quantized(tiny_bert)
    json.dumps(meta)
    deq = dequantize_export(tensors, meta)
    for name, layer in layers.items():
        r = layer.effective_rank()
        m = meta["modules"][name]
        assert m["rank"] == r and m["bits"] == layer.bit_widths()
        assert tensors[f"{name}.A"].shape == (r, layer.in_features)
        assert tensors[f"{name}.B"].shape == (layer.out_features, r)
        assert not tensors[f"{name}.A"].is_floating_point()
        if m["bits"]["A"] <= 8:
            assert tensors[f"{name}.A"].dtype in (torch.int8, torch.int16)
        a, b, e = layer.deterministic_factors()
        da, db, de = deq[name]
        torch.testing.assert_close(da.float(), a[:r], rtol=0, atol=1e-6)
        torch.testing.assert_close(db.float(), b[:, :r], rtol=0, atol=1e-6)
        torch.testing.assert_close(de.float(), e[:r], rtol=0, atol=1e-6)
    counts = method.parameter_counts(tiny_bert)
    assert counts["active"] == sum(lay.effective_rank() * (lay.in_features + lay.out_features + 1)
                                   for lay in layers.values())
    assert counts["trainable"] > counts["active"]


def test_peft_float_export_loads_and_gap_is_measured(tiny_bert, tmp_path):
    pytest.importorskip("peft")

    base_state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    method, ctx, plan, layers = _trained_like(tiny_bert)
    batch = {k: v for k, v in random_batch().items() if k != "labels"}
    export = method.export_peft(tiny_bert, plan, ctx)
    assert export.config["rank_pattern"]  # learned ranks differ between modules
    ranks = {n: lay.effective_rank() for n, lay in layers.items()}
    for n, r in ranks.items():
        assert export.tensors[f"base_model.model.{n}.lora_A.weight"].shape[0] == r
    loaded = reload_with_peft(export, fresh_copy(tiny_bert, base_state), tmp_path)
    with torch.no_grad():
        theirs = loaded(**batch).logits
        with float_lora_mode(tiny_bert):
            ours_float = tiny_bert(**batch).logits
        quantized = tiny_bert(**batch).logits
    torch.testing.assert_close(theirs, ours_float, rtol=1e-5, atol=1e-5)
    gap = float_export_gap(tiny_bert, [batch])
    assert gap["max_abs_diff"] == pytest.approx((ours_float - quantized).abs().max().item(), rel=1e-5)
    assert gap["max_abs_diff"] > 0 and math.isfinite(gap["rel_diff"])  # activation quantizers are dropped


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValidationError, match="lmbda must be > 0"):
        BLoRAParams(lmbda=0.0)
    with pytest.raises(ValidationError, match="lmbda must be > 0"):
        BLoRAParams(lmbda=-1e-3)
    for bits in ([2, 4, 16], [4, 8], [2, 3], [], [2, 4, 8, 16, 32, 64]):
        with pytest.raises(ValidationError, match="nested doublings"):
            BLoRAParams(bits=bits)
    assert BLoRAParams(bits=[2, 4, 8]).bits == [2, 4, 8]
    with pytest.raises(ValueError, match="unknown quantizers"):
        _layer().set_ranges({"W": [-1.0, 1.0]})


def test_adapter_collapse_errors_or_warns():
    model = nn.Sequential(_layer(), _layer(seed=1)).eval()
    for layer in model:
        # E range [-1, 1] at 2 bits: step 2/3, so |E| < 1/3 rounds to zero and the update vanishes
        layer.quantizers["E"].set_range(-1.0, 1.0)
        _set_bits(layer.quantizers["E"], 2)
        with torch.no_grad():
            layer.E.fill_(0.1)
        assert layer.collapsed()
        assert torch.equal(layer.delta_weight(), torch.zeros_like(layer.base.weight))
    ctl = BLoRAController(model, BLoRAParams())
    assert not ctl.allows_best(1)
    with pytest.raises(AdapterCollapsed, match="lower blora.lmbda"):
        ctl.on_train_end()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BLoRAController(model, BLoRAParams(on_collapse="warn")).on_train_end()
    assert any("collapsed" in str(w.message) for w in caught)
    assert blora_layers(model) == {"0": model[0], "1": model[1]}


def test_resume_reproduces_gates_ranges_and_controller(tiny_bert):
    import copy

    from lora_ops.training import TrainingInterrupted, trainable_state

    def build(model):
        method, ctx = _ctx(rank=2)
        targets = find_targets(model, ["q"])
        method.build(model, targets, method.decide([], targets, ctx), ctx)
        freeze_all_but(model, ["classifier"])
        return model, method.controller(model, {}, ctx)

    def data():
        return BatchSource(random_batch(n=8, seed=5), batch_size=4, seed=1)

    cfg = TrainConfig(epochs=2, lr=5e-2, checkpoint_every=1, progress=False)
    torch.manual_seed(7)
    model_a, ctl_a = build(copy.deepcopy(tiny_bert))
    train(model_a, data(), cfg, controller=ctl_a)
    kill = InterruptAtStep(2)
    torch.manual_seed(7)
    model_b, ctl_b = build(copy.deepcopy(tiny_bert))
    with pytest.raises(TrainingInterrupted):
        train(model_b, data(), cfg, controller=ctl_b, on_checkpoint=kill)
    model_c, ctl_c = build(copy.deepcopy(tiny_bert))  # fresh: ranges unset until the checkpoint loads
    train(model_c, data(), cfg, controller=ctl_c, resume=kill.state)
    sa, sc = trainable_state(model_a), trainable_state(model_c)
    assert any("initialized" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=0)
