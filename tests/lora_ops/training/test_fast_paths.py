"""Per-step speed paths of the loop: fused AdamW, ``precision: auto``, bf16 with cached frozen weights.

Speed itself is measured by benchmarks (profile_step.py, bench_finetune.py, bench_optimizer.py);
these tests pin what must not change with it: exact resume, the named parameter groups, the
precision choice, determinism and the fp32 state of everything that is trained or saved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.adapter_cases import build, features

from lora_ops.adapters.base import adapter_layers
from lora_ops.data import BatchSource
from lora_ops.training import TrainConfig, TrainingInterrupted, loop, train, trainable_state
from lora_ops.training import precision as amp


def _data() -> BatchSource:
    return BatchSource(features(n=40, seed=5, labels=2), batch_size=8, seed=1)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "lr": 5e-3, "warmup_ratio": 0.0, "progress": False, **kw})


@pytest.mark.skipif(not loop.fused_adamw_supported("cpu"), reason="this torch has no fused AdamW on CPU")
def test_fused_adamw_keeps_groups_and_resumes_exactly():
    base = build("lora")
    cfg = _cfg(fused_adamw=True, checkpoint_every=3)
    full_model = copy.deepcopy(base.model)
    snaps: list[dict] = []
    full = train(full_model, _data(), cfg, on_checkpoint=snaps.append)
    groups = snaps[0]["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)
    assert {g["name"] for g in groups} == {"adapter", "head", "head.no_decay"}

    saved: dict = {}

    def kill(state):
        saved["state"] = state
        if state["step"] >= 6:
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        train(copy.deepcopy(base.model), _data(), cfg, on_checkpoint=kill)
    resumed_model = copy.deepcopy(base.model)
    resumed = train(resumed_model, _data(), cfg, resume=saved["state"])
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    sa, sb = trainable_state(full_model), trainable_state(resumed_model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fused_adamw_matches_the_loop_to_rounding():
    base = build("lora")
    a, b = copy.deepcopy(base.model), copy.deepcopy(base.model)
    train(a, _data(), _cfg())
    train(b, _data(), _cfg(fused_adamw=True))
    sa, sb = trainable_state(a), trainable_state(b)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_without_a_new_config_field_still_resumes():
    base = build("lora")
    cfg = _cfg(checkpoint_every=3)
    saved: dict = {}

    def kill(state):
        saved["state"] = state
        if state["step"] >= 3:
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        train(copy.deepcopy(base.model), _data(), cfg, on_checkpoint=kill)
    del saved["state"]["config"]["fused_adamw"]  # as written before the field existed
    train(copy.deepcopy(base.model), _data(), cfg, resume=saved["state"])


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_native_bf16(monkeypatch, native, want):
    monkeypatch.setattr(amp, "cpu_native_bf16", lambda: native)
    assert amp.resolve_precision("auto", "cpu") == want
    assert amp.resolve_precision("fp32", "cpu") == "fp32"
    amp.check_precision("auto", "cpu")  # always valid: it falls back to fp32
    result = train(copy.deepcopy(build("lora").model), _data(), _cfg(epochs=1, precision="auto"))
    assert result.precision == want


def test_bf16_training_is_deterministic_and_leaves_no_low_precision_copy():
    base = build("lora")
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base.model)
        torch.manual_seed(0)
        result = train(model, _data(), _cfg(precision="bf16"))
        assert result.precision == "bf16"
        assert all(layer._lowp is None for layer in adapter_layers(model).values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs.append((result.history, trainable_state(model)))
    assert [h["loss"] for h in runs[0][0]] == [h["loss"] for h in runs[1][0]]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
