"""A new head starts at the trivial predictor (log class shares / training mean), from prepare's prior."""

from __future__ import annotations

import math

import torch
from transformers import BertConfig, BertForSequenceClassification

from stages.common.models import init_head_at_prior


def _bert(num_labels: int):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def test_classification_head_predicts_the_class_shares_before_training():
    model = _bert(2)
    assert init_head_at_prior(model, ["classifier"], {"class_shares": [0.3, 0.7]})
    with torch.no_grad():
        model.classifier.weight.zero_()  # isolate the bias: the output is then the prior exactly
        probs = model(input_ids=torch.randint(1, 120, (3, 5))).logits.softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.7]] * 3))
    assert model.classifier.bias[0].item() == torch.tensor(math.log(0.3)).item()


def test_regression_head_starts_at_the_training_mean_and_mismatches_are_left_alone():
    model = _bert(1)
    assert init_head_at_prior(model, ["classifier"], {"mean": 2.7})
    assert model.classifier.bias.item() == torch.tensor(2.7).item()
    other = _bert(3)
    before = other.classifier.bias.clone()
    assert not init_head_at_prior(other, ["classifier"], {"class_shares": [0.5, 0.5]})  # 3 outputs, 2 shares
    assert not init_head_at_prior(other, ["classifier"], None)
    assert torch.equal(other.classifier.bias, before)
