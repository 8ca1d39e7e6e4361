"""Dynamic padding and length-grouped batches: coverage, determinism, inert padding, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from support.method_cases import features
from support.tiny_training import InterruptAtStep, with_lora

from lora_ops.data import BatchSource
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state


def _lengths(feats, idx):
    return feats["attention_mask"][idx].sum(1)


def test_grouped_epoch_sees_every_example_once_and_batches_are_length_homogeneous():
    feats = features(n=203, seq=40, seed=2)
    src = BatchSource(feats, 8, seed=4, group_by_length=True, bucket_batches=5)
    for epoch in range(3):
        idx = src.batch_indices(epoch)
        assert len(idx) == len(src) == 26
        assert torch.equal(torch.sort(torch.cat(idx)).values, torch.arange(203))
        # batches cut from a length-sorted bucket: lengths inside one batch are close together
        spread = sum(float(_lengths(feats, i).max() - _lengths(feats, i).min()) for i in idx) / len(idx)
        rand = BatchSource(feats, 8, seed=4).batch_indices(epoch)
        rand_spread = sum(float(_lengths(feats, i).max() - _lengths(feats, i).min()) for i in rand) / len(rand)
        assert spread < 0.5 * rand_spread
    # padding actually saved: grouped batches are narrower than random ones on average
    random = BatchSource(feats, 8, seed=4)
    width = lambda s: sum(b["input_ids"].shape[1] for b in s.batches(0)) / len(s)  # noqa: E731
    assert width(src) < 0.8 * width(random)


def test_grouped_order_is_seeded_and_changes_per_epoch():
    feats = features(n=100, seq=30, seed=3)
    a = BatchSource(feats, 8, seed=4, group_by_length=True, bucket_batches=3)
    b = BatchSource(feats, 8, seed=4, group_by_length=True, bucket_batches=3)
    assert all(torch.equal(x, y) for x, y in zip(a.batch_indices(1), b.batch_indices(1)))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), BatchSource(feats, 8, seed=5, group_by_length=True).order(0))


def test_pad_to_multiple_of_rounds_widths_up_and_never_past_the_stored_width():
    feats = features(n=40, seq=30, seed=1)
    for batch in BatchSource(feats, 8, seed=0, group_by_length=True, pad_to_multiple_of=8).batches(0):
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 or width == 30
        assert width >= int(batch["attention_mask"].sum(1).max())
    fixed = BatchSource(feats, 8, seed=0, dynamic_padding=False)
    assert {b["input_ids"].shape[1] for b in fixed.batches(0)} == {30}


def test_shards_of_a_grouped_batch_make_up_the_one_process_batch():
    feats = features(n=50, seq=20, seed=6)
    one = BatchSource(feats, 8, seed=9, group_by_length=True)
    ranks = [BatchSource(feats, 8, seed=9, group_by_length=True, rank=r, world_size=2) for r in range(2)]
    for glob, r0, r1 in zip(one.batch_indices(0), ranks[0].batch_indices(0), ranks[1].batch_indices(0)):
        assert torch.equal(glob, torch.cat([r0, r1]))


def test_dynamic_padding_leaves_outputs_unchanged(tiny_bert):
    """Attention masks make padding inert: logits and loss equal fixed padding up to float rounding."""
    from stages.common.evaluation import predict

    model = with_lora(tiny_bert)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(0, 0.1)
    feats = features(n=37, seq=24, seed=8)
    grouped = predict(model, feats, 8, "cpu", group_by_length=True)
    with torch.no_grad():
        fixed = model(**{k: v for k, v in feats.items() if k != "labels"}).logits
    torch.testing.assert_close(grouped, fixed, rtol=1e-5, atol=1e-5)
    assert not torch.equal(grouped[:-1], grouped[1:])  # order restored, not a constant


def test_resume_with_length_grouping_continues_the_same_batch_sequence(tiny_bert):
    feats = features(n=44, seq=16, seed=5)
    cfg = TrainConfig(epochs=3, lr=1e-2, checkpoint_every=4, progress=False)
    data = lambda: BatchSource(feats, 8, seed=1, group_by_length=True, bucket_batches=2)  # noqa: E731
    torch.manual_seed(7)
    ref = with_lora(copy.deepcopy(tiny_bert), dropout=0.1)
    full = train(ref, data(), cfg)
    kill_mid_epoch = InterruptAtStep(8)
    torch.manual_seed(7)
    with pytest.raises(TrainingInterrupted):
        train(with_lora(copy.deepcopy(tiny_bert), dropout=0.1), data(), cfg, on_checkpoint=kill_mid_epoch)
    assert kill_mid_epoch.state["batch_in_epoch"] == 2  # 6 batches per epoch: killed inside epoch 2
    resumed_model = with_lora(copy.deepcopy(tiny_bert), dropout=0.1)
    torch.manual_seed(999)
    resumed = train(resumed_model, data(), cfg, resume=kill_mid_epoch.state)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    a, b = trainable_state(ref), trainable_state(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
