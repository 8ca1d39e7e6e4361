"""PEFT's own data-driven alternatives as lora-sieve methods: ``eva`` (EVA initialisation and rank
redistribution) and ``svd_trim`` (post-hoc SVD energy trimming, PEFT ``convert_to_lora``), each
checked against PEFT itself on the same weights and activations."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from support.dense_reference import truncated_factors
from support.tiny_training import reload_with_peft

from lora_ops.adapters.base import adapter_layers
from lora_ops.data import BatchSource
from lora_ops.lowrank import energy_rank
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training.loop import TrainConfig, train

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def padded_features(n: int = 48, seq: int = 12, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 120, (n, seq), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=gen)}


def context(name: str, **settings) -> tuple:
    method = get_method(name)
    params = method.params_model(**settings)
    ctx = MethodContext(adapter=AdapterConfig(rank=RANK, alpha=ALPHA), params=params, seed=0)
    ctx.train.progress = False
    return method, ctx


def peft_module_ranks(peft_model) -> dict[str, int]:
    """module name (as in the base model) -> rank of its PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
            for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------------------------- eva
def test_eva_plan_and_init_equal_peft_eva_on_the_same_activations():
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    from lora_ops.methods.eva import token_positions

    feats = padded_features()
    sample = BatchSource(feats, 8, shuffle=False)
    batches = list(sample.batches(0))

    ours = tiny_bert()
    method, ctx = context("eva", rho=2.0, tau=0.99)
    targets = find_targets(ours, "all")
    rows = method.calibrate(ours, targets, sample, ctx)
    plan = method.decide(method.score(rows, targets, ctx), targets, ctx)
    method.build(ours, targets, plan, ctx)

    theirs = tiny_bert()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[t.name for t in targets],
                        init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    theirs = get_peft_model(theirs, config)
    initialize_lora_eva_weights(
        theirs, dataloader=batches,
        forward_fn=lambda m, inputs: m(**{k: v for k, v in inputs.items() if k != "labels"}),
        prepare_model_inputs_fn=lambda inputs, _cfg: token_positions(inputs),
        prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling, show_progress_bar=False)

    their_ranks = peft_module_ranks(theirs)
    our_ranks = {n: layer.lora.rank for n, layer in adapter_layers(ours).items()}
    assert our_ranks == their_ranks  # same modules kept (rank-0 ones dropped by both), same ranks
    assert {n for n, k in plan["ranks"].items() if k > 0} == set(their_ranks)
    assert sum(plan["ranks"].values()) == RANK * len(targets)  # the budget is redistributed, not changed
    assert len(set(plan["ranks"].values())) > 1, "ranks were not redistributed: the case does not test EVA"
    layers = adapter_layers(ours)
    for name, m in theirs.named_modules():
        if isinstance(m, LoraLayer):
            base_name = name.removeprefix("base_model.model.")
            torch.testing.assert_close(layers[base_name].lora.A.detach(), m.lora_A["default"].weight.detach(),
                                       rtol=0, atol=0)
            assert layers[base_name].scale == pytest.approx(m.scaling["default"])
            assert torch.count_nonzero(layers[base_name].lora.B) == 0


def test_eva_plan_round_trips_through_json_and_rebuilds_identically():
    feats = padded_features()
    model = tiny_bert()
    method, ctx = context("eva")
    targets = find_targets(model, "all")
    rows = method.calibrate(model, targets, BatchSource(feats, 8, shuffle=False), ctx)
    plan = json.loads(json.dumps(method.decide(method.score(rows, targets, ctx), targets, ctx)))
    first, second = tiny_bert(), tiny_bert()
    method.build(first, find_targets(first, "all"), plan, ctx)
    method.build(second, find_targets(second, "all"), plan, ctx)
    for (n1, l1), (n2, l2) in zip(adapter_layers(first).items(), adapter_layers(second).items()):
        assert n1 == n2 and torch.equal(l1.lora.A, l2.lora.A)
    # the calibration leaves the model as it was: no hooks, same outputs
    assert not any(m._forward_hooks for m in model.modules())


def test_eva_without_peft_is_one_clear_config_error(monkeypatch, tmp_path):
    import importlib.util

    from stages.common.params import ConfigError, load_params

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", overrides={"method.name": "eva"})
    message = str(err.value)
    assert "\n" not in message and "pip install 'lora-sieve[eva]'" in message
    load_params("params.yaml", overrides={"method.name": "lora"})  # only the method that needs it fails


# ------------------------------------------------------------------------------------------ svd_trim
def test_energy_rank_matches_peft_cutoff():
    from peft.tuners.lora.conversion import _find_cutoff_index

    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        s = torch.rand(8, generator=gen).sort(descending=True).values
        if trial % 5 == 0:
            s[3:] = 0.0  # exact zeros in the tail
        for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
            assert energy_rank(s, energy) == min(_find_cutoff_index(s, energy), 8)
    assert energy_rank(torch.zeros(4), 0.9) == 0  # an exactly zero update carries nothing: dropped
    with pytest.raises(ValueError, match="energy"):
        energy_rank(torch.ones(3), 0.0)


def test_truncated_factors_are_the_best_rank_k_approximation():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 6, generator=gen) @ torch.randn(6, 30, generator=gen)
    a, b, k = truncated_factors(delta, 1.0 - 1e-9)  # 1.0 would also keep float32 rounding noise (as PEFT's)
    assert k == 6
    torch.testing.assert_close((b @ a).float(), delta, rtol=1e-5, atol=1e-5)
    a, b, k = truncated_factors(delta, 0.5)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :k] * s[:k]) @ vh[:k])
    # canonical signs: the same update through another LAPACK path (transposed) gives the same factors
    at, bt, kt = truncated_factors(delta.t().contiguous(), 0.5)
    torch.testing.assert_close(bt @ at, (b @ a).t())


def _trained_pair_values(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            # a decaying spectrum, as trained LoRA updates have, steeper in some modules than in others,
            # so one threshold picks different ranks
            decay = torch.rand(layer.lora.rank, generator=gen).sort(descending=True).values
            layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=gen))
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=gen) * decay)


@pytest.mark.parametrize("energy", [0.6, 0.9])
def test_svd_trim_equals_peft_convert_to_lora(energy):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora

    ours = tiny_bert()
    method, ctx = context("svd_trim", energy=energy)
    targets = find_targets(ours, "all")
    plan = method.decide([], targets, ctx)
    method.build(ours, targets, plan, ctx)
    _trained_pair_values(ours)

    theirs = get_peft_model(tiny_bert(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[t.name for t in targets]))
    from peft.tuners.lora import LoraLayer

    layers = adapter_layers(ours)
    with torch.no_grad():
        for name, m in theirs.named_modules():
            if isinstance(m, LoraLayer):
                layer = layers[name.removeprefix("base_model.model.")]
                m.lora_A["default"].weight.copy_(layer.lora.A)
                m.lora_B["default"].weight.copy_(layer.lora.B)
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        config, state = convert_to_lora(theirs, energy)

    ctl = method.controller(ours, plan, ctx)
    ctl.on_train_end()
    ranks = ctl.summary()["ranks"]
    assert len(set(ranks.values())) > 1, "one rank everywhere: the threshold is not exercised"
    for t in targets:
        key = t.name
        their_rank = config.rank_pattern.get(key, config.r)
        assert ranks[key] == their_rank, key
        a = state[f"base_model.model.{key}.lora_A.weight"]
        b = state[f"base_model.model.{key}.lora_B.weight"]
        their_scale = config.alpha_pattern.get(key, config.lora_alpha) / their_rank  # 1: scaling baked in
        layer = layers[key]
        torch.testing.assert_close(layer.delta_weight(), their_scale * (b @ a), rtol=1e-4, atol=1e-5)
        assert layer.trimmed_rank() == their_rank
    counts = method.parameter_counts(ours)
    expected = sum(ranks[t.name] * (layers[t.name].in_features + layers[t.name].out_features) for t in targets)
    assert counts["stored"] == counts["active"] == expected < counts["trainable"]


def test_svd_trim_trains_as_lora_then_exports_and_merges_its_trimmed_update(tmp_path):
    feats = padded_features()

    def run(name: str, **settings):
        model = tiny_bert()
        method, ctx = context(name, **settings)
        targets = find_targets(model, "all")
        plan = method.decide([], targets, ctx)
        torch.manual_seed(1)
        method.build(model, targets, plan, ctx)
        freeze_all_but(model, ["classifier"])
        cfg = TrainConfig(epochs=2, lr=2e-2, progress=False)
        train(model, BatchSource(feats, 8, seed=0), cfg, controller=method.controller(model, plan, ctx))
        return model, method, plan, ctx

    lora_model, *_ = run("lora")
    model, method, plan, ctx = run("svd_trim", energy=0.8)
    lora_layers, layers = adapter_layers(lora_model), adapter_layers(model)
    for name, layer in layers.items():
        # training was LoRA's bit for bit; the trim keeps the leading singular directions of that update
        delta = lora_layers[name].delta_weight().detach().double()
        a, b, k = truncated_factors(delta, 0.8)
        assert layer.trimmed_rank() == k
        torch.testing.assert_close(layer.delta_weight().detach().double(), b @ a, rtol=1e-5, atol=1e-7)

    batch = {k: v[:8] for k, v in feats.items() if k != "labels"}
    export = method.export_peft(model, plan, ctx)
    for name, layer in layers.items():
        k = layer.trimmed_rank()
        key = f"base_model.model.{name}.lora_A.weight"
        if k == 0:
            assert key not in export.tensors
        else:
            assert export.tensors[key].shape[0] == k
            pattern = export.config["rank_pattern"].get(re.escape(name), export.config["r"])
            assert pattern == k
    with torch.no_grad():
        ours = model(**batch).logits
        merged = method.merged_model(copy.deepcopy(model), plan, ctx)
        torch.testing.assert_close(merged(**batch).logits, ours, rtol=1e-5, atol=1e-6)
    fresh = tiny_bert()
    fresh.classifier.load_state_dict(model.classifier.state_dict())
    loaded = reload_with_peft(export, fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours, rtol=1e-5, atol=1e-5)
