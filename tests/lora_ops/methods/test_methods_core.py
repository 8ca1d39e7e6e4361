import copy
import json

import pytest
import torch
from support.tiny_training import fresh_copy, random_batch, reload_with_peft

from lora_ops.adapters.base import adapter_layers
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.data import BatchSource
from lora_ops.importance.output_energy import OutputEnergyRecorder, direct_output_energy
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.selection import cumulative_threshold
from lora_ops.targets import find_targets, freeze_all_but, unload


def _ctx(method="lora", **params):
    m = get_method(method)
    return m, MethodContext(adapter=AdapterConfig(rank=4, alpha=8, targets="all"), params=m.params_model(**params))


def _randomize(model):
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora.B, std=0.1)


def test_find_targets_bert_and_llama_roles(tiny_bert, tiny_llama):
    bert = find_targets(tiny_bert, "all")
    assert {t.role for t in bert} == {"q", "k", "v", "o", "up", "down"}
    assert len(bert) == 3 * 6
    llama = find_targets(tiny_llama, ["q_proj", "v"])
    assert [t.role for t in llama[:2]] == ["q", "v"]
    assert llama[1].out_features == 16  # GQA: 2 kv heads x head_dim 8
    with pytest.raises(ValueError, match="unknown target"):
        find_targets(tiny_bert, ["gate"])


def test_cumulative_threshold_selection():
    imp = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    assert cumulative_threshold(imp, 0.5) == ["a"]
    assert cumulative_threshold(imp, 0.8) == ["a", "b"]
    assert cumulative_threshold(imp, 0.81) == ["a", "b", "c"]
    assert cumulative_threshold(imp, 1.0) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        cumulative_threshold(imp, 0.0)


def test_recorded_importance_equals_direct_computation(tiny_bert):
    method, ctx = _ctx()
    targets = find_targets(tiny_bert, "all")
    plan = method.decide([], targets, ctx)
    layers = method.build(tiny_bert, targets, plan, ctx)
    _randomize(tiny_bert)
    batch = random_batch()
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach()))
             for n, layer in layers.items()]
    rec = OutputEnergyRecorder(layers)
    rec.set_token_mask(batch["attention_mask"])
    with torch.no_grad():
        tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        direct = direct_output_energy(layer, inputs[name], batch["attention_mask"].float())
        assert rec.energy[name] == pytest.approx(direct, rel=1e-4)
        assert rec.tokens[name] == int(batch["attention_mask"].sum())


def test_lora_drop_plan_shares_one_pair_per_group(tiny_bert):
    method, ctx = _ctx("lora_drop", threshold=0.6)
    targets = find_targets(tiny_bert, "all")
    unadapted = copy.deepcopy(tiny_bert)
    rows = [{"module": t.name, "group": t.group, "role": t.role, "layer": t.layer,
             "energy": float(t.layer + 1), "tokens": 10} for t in targets]
    scores = method.score(rows, targets, ctx)
    for g in {s["group"] for s in scores}:
        assert sum(s["importance"] for s in scores if s["group"] == g) == pytest.approx(1.0)
    plan = method.decide(scores, targets, ctx)
    json.dumps(plan)  # the plan is JSON
    # energies 1,2,3 -> shares 1/6, 2/6, 3/6: T=0.6 keeps layers 2 and 1 (5/6); layer 0 alone would be a
    # "shared" set of one module, which is its own adapter: the plan says so and counts it as retained
    for entry in plan["groups"].values():
        assert len(entry["retained"]) == 3 and entry["shared"] == []
    assert all(m["mode"] == "own" for m in plan["modules"].values())
    method.build(tiny_bert, targets, plan, ctx)
    counts = method.parameter_counts(tiny_bert)
    lora_counts = sum(4 * (t.in_features + t.out_features) for t in targets)
    assert counts["trainable"] == counts["active"] == lora_counts  # 3 own pairs per group, as LoRA
    assert all(isinstance(layer.lora, LoRAPair) for layer in adapter_layers(tiny_bert).values())
    assert len({id(layer.lora) for layer in adapter_layers(tiny_bert).values()}) == len(targets)  # none shared
    plan2 = method.decide(scores, targets, _ctx("lora_drop", threshold=0.4)[1])
    for entry in plan2["groups"].values():
        assert len(entry["retained"]) == 1 and len(entry["shared"]) == 2
    # 1 own + 1 shared pair of 3 modules per group: 2/3 of LoRA's parameters
    fresh = copy.deepcopy(unadapted)
    method.build(fresh, targets, plan2, ctx)
    assert method.parameter_counts(fresh)["trainable"] * 3 == lora_counts * 2


def test_lora_drop_calibration_leaves_model_untouched(tiny_bert):
    method, ctx = _ctx("lora_drop", threshold=0.9)
    ctx.train.progress = False
    targets = find_targets(tiny_bert, "all")
    freeze_all_but(tiny_bert, ["classifier"])
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    b = random_batch(n=16, seed=3)
    sample = BatchSource(b, 8, seed=0)
    rows = method.calibrate(tiny_bert, targets, sample, ctx)
    assert len(rows) == len(targets) and all(r["energy"] > 0 for r in rows)
    assert not adapter_layers(tiny_bert)
    after = tiny_bert.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peft_export_reloads_with_identical_outputs(tiny_bert, tmp_path):
    pytest.importorskip("peft")

    method, ctx = _ctx("lora_drop", threshold=0.5)
    targets = find_targets(tiny_bert, "all")
    rows = [{"module": t.name, "group": t.group, "role": t.role, "layer": t.layer, "energy": 1.0 + t.layer,
             "tokens": 1} for t in targets]
    plan = method.decide(method.score(rows, targets, ctx), targets, ctx)
    base_state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    method.build(tiny_bert, targets, plan, ctx)
    _randomize(tiny_bert)
    batch = random_batch()
    with torch.no_grad():
        ours = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    export = method.export_peft(tiny_bert, plan, ctx)
    # shared pairs are cloned per module: no aliasing in the file
    ptrs = [t.data_ptr() for t in export.tensors.values()]
    assert len(set(ptrs)) == len(ptrs)
    loaded = reload_with_peft(export, fresh_copy(tiny_bert, base_state), tmp_path)
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_unload_merge_matches_adapted_outputs(tiny_llama):
    method, ctx = _ctx()
    targets = find_targets(tiny_llama, "all")
    method.build(tiny_llama, targets, method.decide([], targets, ctx), ctx)
    _randomize(tiny_llama)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        adapted = tiny_llama(input_ids=ids).logits
        unload(tiny_llama, merge=True)
        merged = tiny_llama(input_ids=ids).logits
    assert not adapter_layers(tiny_llama)
    assert not any(isinstance(m, LoRALinear) for m in tiny_llama.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_freeze_all_but_keeps_head_and_adapters(tiny_bert):
    method, ctx = _ctx()
    targets = find_targets(tiny_bert, ["q", "v"])
    method.build(tiny_bert, targets, method.decide([], targets, ctx), ctx)
    freeze_all_but(tiny_bert, ["classifier"])
    names = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert names and all(".lora." in n or n.startswith("classifier.") for n in names)
    assert "classifier.weight" in names
