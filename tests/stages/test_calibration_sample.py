"""The calibration sample is batched as the run's training is: length-grouped, padded to the batch's longest
example (a probe that trains on it then costs per step what fine-tuning does)."""

from __future__ import annotations

import pytest
import torch
from support.helpers import REPO

from lora_ops.data import BatchSource
from stages.common import calibration
from stages.common.params import load_params


def _features(n: int = 96, width: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(1000, 2000, (n, width), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


def _widths(source: BatchSource) -> list[int]:
    return [b["input_ids"].shape[1] for b in source.batches(0)]


@pytest.mark.parametrize("group_by_length,multiple", [(True, None), (False, None), (True, 8)])
def test_calibration_batches_follow_the_training_batching(monkeypatch, group_by_length, multiple):
    features = _features()
    monkeypatch.setattr(calibration, "calibration_features", lambda params, tok: (features, 96))
    params = load_params(REPO / "params.yaml", {"train.group_by_length": group_by_length,
                                                "train.pad_to_multiple_of": multiple, "train.batch_size": 16})
    sample, n = calibration.calibration_sample(params, tokenizer=None)
    expected = BatchSource(features, 16, seed=params.seed, group_by_length=group_by_length,
                           pad_to_multiple_of=multiple)
    assert n == 96
    assert [list(i) for i in sample.batch_indices(0)] == [list(i) for i in expected.batch_indices(0)]
    assert _widths(sample) == _widths(expected)
    if multiple:
        assert all(w % multiple == 0 for w in _widths(sample))


def test_grouped_calibration_pads_fewer_tokens_than_random_batches(monkeypatch):
    features = _features()
    monkeypatch.setattr(calibration, "calibration_features", lambda params, tok: (features, 96))
    grouped = load_params(REPO / "params.yaml", {"train.group_by_length": True, "train.batch_size": 16})
    ungrouped = load_params(REPO / "params.yaml", {"train.group_by_length": False, "train.batch_size": 16})
    padded = {name: sum(_widths(calibration.calibration_sample(p, None)[0])) * 16
              for name, p in (("grouped", grouped), ("ungrouped", ungrouped))}
    assert padded["grouped"] < 0.8 * padded["ungrouped"]
