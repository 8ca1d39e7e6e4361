"""The [CLS]-only last layer (lora_ops/training/cls_only.py): the same logits and gradients as the full
layer, for plain and adapted classifiers, in eager and SDPA attention, with padding; untouched elsewhere."""

from __future__ import annotations

import pytest
import torch
from support.adapter_cases import METHODS, build, features, tiny_bert, tiny_llama

from lora_ops.data import BatchSource
from lora_ops.training import TrainConfig, train, trainable_state
from lora_ops.training.cls_only import cls_only_last_layer, supports_cls_only


def _logits_and_grads(model, batch, cls_only: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # train mode: methods with stochastic gates (B-LoRA) draw the same noise in both
    with cls_only_last_layer(model, cls_only) as active:
        assert active == cls_only
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("method", METHODS)  # every registered method: the pipeline turns it on for all
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_same_logits_and_gradients_as_the_full_layer(method: str, attention: str) -> None:
    model = tiny_bert()
    model.config._attn_implementation = attention
    case = build(method, model=model)
    feats = features(n=16, seed=3)  # every fourth row padded to half its length
    batch = {k: v[:16] for k, v in feats.items()}
    for p in case.model.parameters():
        p.requires_grad_(True)  # every weight, frozen ones included: their gradients must agree too
    full_logits, full_grads = _logits_and_grads(case.model, batch, cls_only=False)
    logits, grads = _logits_and_grads(case.model, batch, cls_only=True)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # row 0 only: the last layer's query saw one row per example
    seen = []
    hook = case.model.bert.encoder.layer[-1].attention.self.query.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[1]))
    with cls_only_last_layer(case.model):
        case.model(**batch)
    hook.remove()
    assert seen == [1]


def test_forward_is_restored_and_parameters_keep_their_names() -> None:
    model = tiny_bert()
    names = [n for n, _ in model.named_parameters()]
    layer = model.bert.encoder.layer[-1]
    with cls_only_last_layer(model):
        assert "forward" in vars(layer)
        assert [n for n, _ in model.named_parameters()] == names
    assert "forward" not in vars(layer)
    with pytest.raises(RuntimeError), cls_only_last_layer(model):
        raise RuntimeError("a failing step")
    assert "forward" not in vars(layer)  # restored on the way out of an error too


def test_models_it_does_not_know_are_left_alone() -> None:
    llama = tiny_llama()
    assert not supports_cls_only(llama)
    with cls_only_last_layer(llama) as active:
        assert not active
    assert supports_cls_only(tiny_bert())


def test_training_with_it_matches_the_full_layer_to_rounding() -> None:
    def run(cls_only: bool):
        case = build("lora", randomise=False)
        data = BatchSource(features(n=40, seed=5), batch_size=8, seed=1)
        cfg = TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.0, progress=False, cls_only_last_layer=cls_only)
        train(case.model, data, cfg)
        return trainable_state(case.model)

    full, fast = run(False), run(True)
    assert full.keys() == fast.keys()
    for name in full:
        torch.testing.assert_close(fast[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    again = run(True)
    assert all(torch.equal(again[n], fast[n]) for n in fast)  # deterministic: same config, same bytes
