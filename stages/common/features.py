"""Tokenised features of a task's examples (classification pairs or causal-LM text)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from stages.common.lm import tokenize_lm
from stages.common.tasks import Task, is_lm


def tokenize(df: pd.DataFrame, task: Task, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    if is_lm(task):
        return tokenize_lm(df["text"].tolist(), tokenizer, max_length)
    texts = [df[f].tolist() for f in task.fields]
    enc = tokenizer(*texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    features = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        features["token_type_ids"] = enc["token_type_ids"]
    dtype = torch.float32 if task.is_regression else torch.long
    features["labels"] = torch.tensor(df["label"].to_numpy(), dtype=dtype)
    return features
