"""The calibration sample: a stratified share (``calibrate.ratio``) of the training split, drawn from the
run's seed. The calibrate stage (methods' calibration passes) and the compress stage (input statistics
of the trained adapter) draw the same examples."""

from __future__ import annotations

from typing import Any

import torch

from lora_ops.data import BatchSource, stratified_indices
from stages.common.context import task_of
from stages.common.features import tokenize
from stages.common.io import read_parquet
from stages.common.params import Params
from stages.common.paths import Paths


def calibration_features(params: Params, tokenizer: Any) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenised calibration examples and their count."""
    train = read_parquet(Paths.train)
    idx = stratified_indices(torch.tensor(train["label"].to_numpy()), params.calibrate.ratio, params.seed)
    sample_df = train.iloc[idx.numpy()].reset_index(drop=True)
    return tokenize(sample_df, task_of(params), tokenizer, params.model.max_length), len(sample_df)


def calibration_sample(params: Params, tokenizer: Any) -> tuple[BatchSource, int]:
    """The calibration sample as batches of ``train.batch_size`` (seeded order) and its size, batched as
    the run's own training is (``train.group_by_length``, ``train.pad_to_multiple_of``): a probe that
    trains on it (LoRA-drop) then costs per step what fine-tuning does, not the price of padding every
    batch to its longest random example (2.2x the step time on SST-2)."""
    features, n = calibration_features(params, tokenizer)
    return BatchSource(features, params.train.batch_size, seed=params.seed,
                       group_by_length=params.train.group_by_length,
                       pad_to_multiple_of=params.train.pad_to_multiple_of), n
