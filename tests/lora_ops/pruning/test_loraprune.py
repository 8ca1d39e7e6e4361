"""LoRAPrune: criterion, grouping/tying, schedule, exact final sparsity, physical pruning, export."""

import pytest
import torch

from lora_ops.adapters.base import adapter_layers
from lora_ops.data import BatchSource
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.pruning import (
    LoRAPruneController,
    MaskedLoRALinear,
    PruneSchedule,
    get_importance,
    load_pruned_model,
    lora_gradient_estimate,
    prune_model,
    tied_unit_scores,
)
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training.loop import TrainConfig, train


def _setup(model, targets="all", **params):
    method = get_method("loraprune")
    params = {"min_score_updates": 0, **params}  # mechanics on runs of a few steps (the guard has its own test)
    ctx = MethodContext(adapter=AdapterConfig(rank=4, alpha=8, targets=targets), params=method.params_model(**params))
    tgts = find_targets(model, targets)
    plan = method.plan_model(model, tgts, ctx)
    method.build(model, tgts, plan, ctx)
    freeze_all_but(model)
    torch.manual_seed(1)
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora.B, std=0.05)
    return method, ctx, plan


def _lm_batch(n=4, seq=10, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _cls_batch(n=4, seq=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=gen)}


def _masked(model):
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, MaskedLoRALinear)}


def _train(model, method, ctx, plan, batch_fn, steps=12):
    data = {k: torch.cat([batch_fn(seed=s)[k] for s in range(steps)]) for k in batch_fn(seed=0)}
    ctl = method.controller(model, plan, ctx)
    train(model, BatchSource(data, batch_size=4, shuffle=False), TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.0,
                                                                             progress=False), controller=ctl)
    return ctl


# ------------------------------------------------------------------ criterion
def test_ghat_matches_hand_formula_and_true_gradient(tiny_llama):
    _, _, plan = _setup(tiny_llama, ratio=0.5)
    layer = _masked(tiny_llama)["model.layers.0.mlp.gate_proj"]
    layer.capture_weight_grad = True  # also record dL/dW to check the LoRA gradients against it
    tiny_llama.train()
    tiny_llama(**_lm_batch()).loss.backward()
    A, B, s = layer.lora.A.detach(), layer.lora.B.detach(), layer.scale
    gA, gB, gW = layer.lora.A.grad, layer.lora.B.grad, layer.weight_leaf.grad
    # the LoRA gradients are the chain rule of the true gradient of the merged weight
    torch.testing.assert_close(gA, s * B.t() @ gW, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gB, s * gW @ A.t(), rtol=1e-4, atol=1e-7)
    g_hat = gB @ A + B @ gA - gB @ gA  # by hand
    torch.testing.assert_close(lora_gradient_estimate(A, B, gA, gB), g_hat)
    expected = (g_hat * (layer.base.weight + s * B @ A)).abs()
    torch.testing.assert_close(get_importance("loraprune").element_importance(layer), expected)
    torch.testing.assert_close(get_importance("grad").element_importance(layer),
                               (gW * (layer.base.weight + s * B @ A)).abs())
    torch.testing.assert_close(get_importance("magnitude").element_importance(layer),
                               (layer.base.weight + s * B @ A).abs())


def test_loraprune_criterion_needs_no_weight_gradient(tiny_llama):
    _setup(tiny_llama, ratio=0.5)
    tiny_llama.train()
    tiny_llama(**_lm_batch()).loss.backward()
    for layer in _masked(tiny_llama).values():
        assert layer.base.weight.grad is None and layer.weight_leaf is None


# ------------------------------------------------------------------ groups and tying
def _merged_abs(layer):
    return (layer.base.weight + layer.scale * layer.lora.B @ layer.lora.A).abs().detach()


def _n(u):
    return u / (u.norm() + 1e-8)


def test_group_sums_and_tying_gqa_kv_group(tiny_llama):
    _, _, plan = _setup(tiny_llama, ratio=0.5)
    layers = _masked(tiny_llama)
    scores = tied_unit_scores(layers, _ctl(tiny_llama, plan).structure, get_importance("magnitude"))
    p = "model.layers.1."
    hd, n_kv, n_rep, hidden = 8, 2, 3, 48
    q = _merged_abs(layers[p + "self_attn.q_proj"]).view(n_kv, n_rep * hd, hidden).sum((1, 2))
    k = _merged_abs(layers[p + "self_attn.k_proj"]).view(n_kv, hd, hidden).sum((1, 2))
    v = _merged_abs(layers[p + "self_attn.v_proj"]).view(n_kv, hd, hidden).sum((1, 2))
    o = _merged_abs(layers[p + "self_attn.o_proj"]).view(hidden, n_kv, n_rep * hd).sum((0, 2))
    torch.testing.assert_close(scores["1.heads"], _n(q) + _n(k) + _n(v) + _n(o))
    gate = _merged_abs(layers[p + "mlp.gate_proj"]).sum(1)
    up = _merged_abs(layers[p + "mlp.up_proj"]).sum(1)
    down = _merged_abs(layers[p + "mlp.down_proj"]).sum(0)
    torch.testing.assert_close(scores["1.mlp"], _n(gate) + _n(up) + _n(down))
    assert "2.heads" not in scores  # last layer exempt


def test_group_sums_query_in_group_and_bert(tiny_llama, tiny_bert):
    _, _, plan = _setup(tiny_llama, ratio=1 / 3, gqa_mode="query_in_group")
    layers = _masked(tiny_llama)
    scores = tied_unit_scores(layers, _ctl(tiny_llama, plan).structure, get_importance("magnitude"))
    p = "model.layers.0.self_attn."
    q = _merged_abs(layers[p + "q_proj"]).view(6, 8, 48).sum((1, 2))
    o = _merged_abs(layers[p + "o_proj"]).view(48, 6, 8).sum((0, 2))
    torch.testing.assert_close(scores["0.heads"], _n(q) + _n(o))  # k/v are not pruned in this mode

    _, _, plan = _setup(tiny_bert, ratio=0.5, exempt_layers=[])
    layers = _masked(tiny_bert)
    scores = tied_unit_scores(layers, _ctl(tiny_bert, plan).structure, get_importance("magnitude"))
    p = "bert.encoder.layer.2."
    per = [_merged_abs(layers[p + f"attention.self.{r}"]).view(4, 8, 32).sum((1, 2)) for r in ("query", "key", "value")]
    o = _merged_abs(layers[p + "attention.output.dense"]).view(32, 4, 8).sum((0, 2))
    torch.testing.assert_close(scores["2.heads"], sum(_n(u) for u in per) + _n(o))
    up = _merged_abs(layers[p + "intermediate.dense"]).sum(1)
    down = _merged_abs(layers[p + "output.dense"]).sum(0)
    torch.testing.assert_close(scores["2.mlp"], _n(up) + _n(down))


def _ctl(model, plan, criterion="magnitude", **kw) -> LoRAPruneController:
    method = get_method("loraprune")
    ctx = MethodContext(adapter=AdapterConfig(rank=4, alpha=8),
                        params=method.params_model(**{**plan["params"], "criterion": criterion, **kw}))
    return method.controller(model, plan, ctx)


# ------------------------------------------------------------------ schedule
def test_schedule_sparsity_at_given_steps():
    s = PruneSchedule(total=100, warmup=0.1, cooldown=0.1, every=10, exact_final=True)
    assert s.sparsity(10, 0.5) == 0.0
    assert s.sparsity(50, 0.5) == pytest.approx(0.5 * (1 - 0.5 ** 3))
    assert s.sparsity(90, 0.5) == 0.5 and s.sparsity(100, 0.5) == 0.5
    assert s.count(20, 32, 16, 0.5, 0) == 5  # floor(32 * 0.5 * (1 - (70/80)^3))
    assert s.count(25, 32, 16, 0.5, 5) == 5  # not a mask-update step
    assert s.count(90, 32, 16, 0.5, 15) == 16  # first cool-down step: exactly the target
    official = PruneSchedule(total=100, warmup=0.1, cooldown=0.1, every=10, exact_final=False)
    counts, cur = [], 0
    for t in range(1, 101):
        cur = official.count(t, 32, 16, 0.5, cur)
        counts.append(cur)
    assert counts[-1] == 15  # the official under-pruning: 15 of 32 heads at target 0.5
    assert official.last_change_step(32, 16, 0.5) == 60  # 15 already reached at step 60
    assert s.last_change_step(32, 16, 0.5) == 90
    with pytest.raises(ValueError):
        PruneSchedule(total=10, warmup=0.6, cooldown=0.5)


# ------------------------------------------------------------------ final sparsity, equivalence, export
@pytest.mark.parametrize("gqa_mode,ratio", [("kv_group", 0.5), ("query_in_group", 2 / 3)])
def test_final_sparsity_is_target_and_pruned_equals_masked(tiny_llama, gqa_mode, ratio):
    method, ctx, plan = _setup(tiny_llama, ratio=ratio, gqa_mode=gqa_mode, prune_every=3, exempt_layers=[2])
    ctl = _train(tiny_llama, method, ctx, plan, _lm_batch)
    kept_channels = 96 - round(ratio * 96)
    assert ctl.sparsity() == {"heads": pytest.approx(ratio), "mlp": pytest.approx(1 - kept_channels / 96)}
    summary = ctl.summary()
    assert summary["plan"]["layers"]["2"]["exempt"] and "heads" not in summary["plan"]["layers"]["2"]
    batch = _lm_batch(seed=99)
    with torch.no_grad():
        masked = tiny_llama(input_ids=batch["input_ids"]).logits
    final = method.final_plan(tiny_llama, plan, ctx)
    assert final["layers"] == summary["plan"]["layers"]
    prune_model(tiny_llama, final, merge=True)
    assert not adapter_layers(tiny_llama)
    attn = tiny_llama.model.layers[0].self_attn
    if gqa_mode == "kv_group":
        assert attn.q_proj.out_features == 24 and attn.k_proj.out_features == 8
    else:
        assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 16 and attn.num_key_value_groups == 1
    assert tiny_llama.model.layers[0].mlp.down_proj.in_features == kept_channels
    assert tiny_llama.model.layers[2].mlp.down_proj.in_features == 96  # exempt layer keeps its width
    with torch.no_grad():
        pruned = tiny_llama(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


def test_official_flag_under_prunes(tiny_llama):
    method, ctx, plan = _setup(tiny_llama, ratio=0.5, exact_final=False, prune_every=2, exempt_layers=[2])
    ctl = _train(tiny_llama, method, ctx, plan, _lm_batch)
    assert ctl.sparsity()["mlp"] < 0.5


def test_export_uniform_reloads_with_stock_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    method, ctx, plan = _setup(tiny_llama, ratio=0.5, exempt_layers=[], prune_every=3)
    _train(tiny_llama, method, ctx, plan, _lm_batch)
    ids = _lm_batch(seed=5)["input_ids"]
    with torch.no_grad():
        masked = tiny_llama(input_ids=ids).logits
    info = method.export_model(tiny_llama, plan, ctx, tmp_path / "pruned")
    assert info["stock_loadable"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_attention_heads == 3 and reloaded.config.num_key_value_heads == 1
    assert reloaded.config.intermediate_size == 48
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < 0.8 * sum(
        p.numel() for p in type(reloaded)(type(reloaded.config)(**{
            **reloaded.config.to_dict(), "num_attention_heads": 6, "num_key_value_heads": 2,
            "intermediate_size": 96})).parameters())


def test_export_per_layer_widths_uses_documented_loader(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    method, ctx, plan = _setup(tiny_llama, ratio=0.5, prune_every=3)  # default: last layer exempt
    _train(tiny_llama, method, ctx, plan, _lm_batch)
    ids = _lm_batch(seed=5)["input_ids"]
    with torch.no_grad():
        masked = tiny_llama(input_ids=ids).logits
    info = method.export_model(tiny_llama, plan, ctx, tmp_path / "pruned")
    assert not info["stock_loadable"] and info["layers"]["2"]["intermediate"] == 96
    with pytest.raises(Exception, match="(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # fails loudly, never silently random
    reloaded = load_pruned_model(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_bert_mlp_only_stock_and_heads_via_loader(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    method, ctx, plan = _setup(tiny_bert, ratio=0.5, exempt_layers=[], prune_heads=False, prune_every=3)
    _train(tiny_bert, method, ctx, plan, _cls_batch)
    b = _cls_batch(seed=7)
    with torch.no_grad():
        masked = tiny_bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert method.export_model(tiny_bert, plan, ctx, tmp_path / "mlp")["stock_loadable"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlp").eval()
    with torch.no_grad():
        out = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


def test_bert_heads_pruned_equals_masked_and_loader(tiny_bert, tmp_path):
    method, ctx, plan = _setup(tiny_bert, ratio=0.5, exempt_layers=[0], prune_every=3)
    _train(tiny_bert, method, ctx, plan, _cls_batch)
    b = _cls_batch(seed=7)
    with torch.no_grad():
        masked = tiny_bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    info = method.export_model(tiny_bert, plan, ctx, tmp_path / "heads")
    assert not info["stock_loadable"]  # BERT derives head size from hidden_size / heads
    assert tiny_bert.bert.encoder.layer[1].attention.self.query.out_features == 16
    reloaded = load_pruned_model(tmp_path / "heads")
    with torch.no_grad():
        out = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ state, grad criterion
def test_controller_state_round_trip(tiny_llama):
    method, ctx, plan = _setup(tiny_llama, ratio=0.5, prune_every=3)
    ctl = _train(tiny_llama, method, ctx, plan, _lm_batch, steps=12)
    state = ctl.state_dict()
    for layer in _masked(tiny_llama).values():  # wipe the masks, then restore them from the state
        layer.set_masks(torch.ones(layer.out_features) if layer.out_mask is not None else None,
                        torch.ones(layer.in_features) if layer.in_mask is not None else None)
    fresh = method.controller(tiny_llama, plan, ctx)
    fresh.load_state_dict(state)
    assert fresh.plan() == ctl.plan()
    fresh.masks_from_layers()
    assert fresh.plan() == ctl.plan()


def test_grad_criterion_does_not_train_frozen_weights(tiny_llama):
    method, ctx, plan = _setup(tiny_llama, ratio=0.5, criterion="grad", prune_every=3)
    before = tiny_llama.model.layers[0].self_attn.q_proj.base.weight.clone()
    ctl = _train(tiny_llama, method, ctx, plan, _lm_batch, steps=8)
    torch.testing.assert_close(tiny_llama.model.layers[0].self_attn.q_proj.base.weight, before)
    assert ctl.ema and ctl.sparsity()["mlp"] == 0.5


# ------------------------------------------------------------------ errors before training
def test_bad_input_errors(tiny_llama, tiny_bert):
    method = get_method("loraprune")

    def plan(model, targets="all", **params):
        ctx = MethodContext(adapter=AdapterConfig(targets=targets), params=method.params_model(**params))
        return method.plan_model(model, find_targets(model, targets), ctx)

    with pytest.raises(ValueError, match="rounds to 0"):
        plan(tiny_bert, ratio=0.1)  # 4 heads: grid 1/4
    with pytest.raises(ValueError, match="not on the heads grid"):
        plan(tiny_llama, ratio=0.3, grid_rounding="strict")  # 2 KV groups: grid 1/2
    with pytest.raises(ValueError, match="rounds to all"):
        plan(tiny_llama, ratio=0.9, gqa_mode="kv_group")
    with pytest.raises(ValueError, match="needs LoRA on every module"):
        plan(tiny_llama, targets=["q", "v"])
    with pytest.raises(ValueError, match="every layer is exempt"):
        plan(tiny_llama, exempt_layers=[0, 1, 2])
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        method.params_model(ratio=1.0)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        method.calibrate(gpt2, [], None, MethodContext(adapter=AdapterConfig(), params=method.params_model()))
    grid = plan(tiny_llama, ratio=0.4)["grid"]  # nearest on the 1/2 grid
    assert grid["kinds"]["heads"]["achieved"] == 0.5 and grid["layers"]["0"]["heads"]["kv_heads"] == 1
    assert grid["layers"]["2"]["exempt"] and grid["kinds"]["mlp"]["achieved"] == pytest.approx(38 / 96)


# ------------------------------------------------------------------ accounting, PEFT export, perplexity
def test_parameter_counts_and_peft_export_use_pruned_shapes(tiny_llama):
    method, ctx, plan = _setup(tiny_llama, ratio=0.5, exempt_layers=[2], prune_every=3)
    _train(tiny_llama, method, ctx, plan, _lm_batch, steps=8)
    counts = method.parameter_counts(tiny_llama)
    dense = sum(p.numel() for n, p in tiny_llama.named_parameters() if ".lora." not in n)
    assert 0 < counts["active"] < dense and counts["trainable"] > 0
    exported = method.export_peft(tiny_llama, plan, ctx)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert exported.tensors[key].shape == (4, 48)  # re-keyed to the pruned width
    assert exported.tensors[key.replace("layers.0", "layers.2")].shape == (4, 96)
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, MaskedLoRALinear)  # model untouched


def test_perplexity_matches_model_loss(tiny_llama):
    from lora_ops.lm_eval import perplexity

    tokens = torch.randint(1, 128, (70,), generator=torch.Generator().manual_seed(0))
    res = perplexity(tiny_llama, tokens, window=16, windows=4, batch_size=3)
    ids = tokens[:64].view(4, 16)
    with torch.no_grad():
        loss = tiny_llama(input_ids=ids, labels=ids).loss
    assert res["windows"] == 4 and res["tokens"] == 60
    assert res["ppl"] == pytest.approx(torch.exp(loss).item(), rel=1e-4)
    # one mean NLL per window (batches of 3 and 1 here), each that window's own loss
    assert len(res["window_nll"]) == 4
    with torch.no_grad():
        last = tiny_llama(input_ids=ids[3:], labels=ids[3:]).loss.item()
    assert res["window_nll"][3] == pytest.approx(last, rel=1e-5)
    assert sum(res["window_nll"]) / 4 == pytest.approx(res["nll"], rel=1e-5)
    with pytest.raises(ValueError, match="windows"):
        perplexity(tiny_llama, tokens, window=16, windows=5)


def test_merged_model_applies_the_masks(tiny_llama):
    method, ctx, plan = _setup(tiny_llama, ratio=0.5, prune_every=3, exempt_layers=[2])
    _train(tiny_llama, method, ctx, plan, _lm_batch)
    batch = _lm_batch(seed=7)
    with torch.no_grad():
        masked = tiny_llama(input_ids=batch["input_ids"]).logits
        merged = method.merged_model(tiny_llama, plan, ctx)
        assert not adapter_layers(merged) and merged.model.layers[0].mlp.down_proj.in_features < 96
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, masked, rtol=1e-4, atol=1e-5)
