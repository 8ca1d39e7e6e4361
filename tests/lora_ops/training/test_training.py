import pytest
import torch
from support.tiny_training import (
    InterruptAtStep,
    loss_and_accuracy,
    random_batch,
    train_batches,
    with_lora,
)

from lora_ops.data import BatchSource, stratified_indices
from lora_ops.schedules import cubic_decay, cubic_rise, warmup_linear_decay
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state


def test_resume_after_kill_gives_identical_result(tiny_bert):
    import copy

    cfg = TrainConfig(epochs=3, lr=1e-2, checkpoint_every=3, progress=False, select_metric="accuracy")
    torch.manual_seed(7)
    model_a = with_lora(copy.deepcopy(tiny_bert))
    full = train(model_a, train_batches(), cfg, evaluate=loss_and_accuracy)

    kill = InterruptAtStep(7)
    torch.manual_seed(7)
    model_b = with_lora(copy.deepcopy(tiny_bert))
    with pytest.raises(TrainingInterrupted):
        train(model_b, train_batches(), cfg, evaluate=loss_and_accuracy, on_checkpoint=kill)
    assert kill.state["step"] == 9  # killed mid-epoch (5 steps per epoch)
    # a fresh process: new model object, state only from the checkpoint
    model_c = with_lora(copy.deepcopy(tiny_bert))
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    resumed = train(model_c, train_batches(), cfg, evaluate=loss_and_accuracy, resume=kill.state)
    sa, sc = trainable_state(model_a), trainable_state(model_c)
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.best["step"] == full.best["step"]


def test_training_reduces_loss_and_freezes_backbone(tiny_bert):
    model = with_lora(tiny_bert, dropout=0.0)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, train_batches(), TrainConfig(epochs=8, lr=2e-2, progress=False))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lr_schedule_at_given_steps():
    assert warmup_linear_decay(0, 10, 100) == pytest.approx(0.1)
    assert warmup_linear_decay(9, 10, 100) == pytest.approx(1.0)
    assert warmup_linear_decay(10, 10, 100) == pytest.approx(1.0)
    assert warmup_linear_decay(55, 10, 100) == pytest.approx(0.5)
    assert warmup_linear_decay(100, 10, 100) == 0.0


def test_cubic_schedules_endpoints():
    assert cubic_decay(0, 10, 10, 100, 12, 8) == 12
    assert cubic_decay(91, 10, 10, 100, 12, 8) == 8
    assert cubic_decay(50, 10, 10, 100, 12, 8) == pytest.approx(8 + 4 * 0.5**3)
    assert cubic_rise(15, 15, 50, 0.3) == 0.0
    assert cubic_rise(50, 15, 50, 0.3) == pytest.approx(0.3)


def test_stratified_sampling_keeps_label_shares():
    labels = torch.tensor([0] * 80 + [1] * 20)
    idx = stratified_indices(labels, 0.1, seed=0)
    assert len(idx) == 10 and int((labels[idx] == 1).sum()) == 2
    assert torch.equal(idx, stratified_indices(labels, 0.1, seed=0))
    assert len(stratified_indices(labels, 25, seed=1)) == 25


def test_batches_are_sharded_into_the_same_global_batch():
    feats = random_batch(n=16, seed=2)
    one = list(BatchSource(feats, 8, seed=3).batches(0))
    two = [list(BatchSource(feats, 8, seed=3, rank=r, world_size=2).batches(0)) for r in range(2)]
    for b, (p0, p1) in zip(one, zip(*two)):
        assert torch.equal(torch.cat([p0["labels"], p1["labels"]]), b["labels"])
