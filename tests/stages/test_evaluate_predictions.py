"""evaluate's per-example predictions file: what task_metrics scored, in dev order, the same bytes every time."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from lora_ops.stats import task_metric
from stages.common.io import write_parquet
from stages.evaluate import no_predictions, prediction_frame


def test_classification_predictions_round_trip_with_the_same_bytes(tmp_path):
    task = SimpleNamespace(is_regression=False)
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-1.0, 1.0]])
    labels = torch.tensor([1, 0, 1, 1])
    write_parquet(tmp_path / "a.parquet", prediction_frame(task, logits, labels))
    write_parquet(tmp_path / "b.parquet", prediction_frame(task, logits.clone(), labels.clone()))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    df = pd.read_parquet(tmp_path / "a.parquet")
    assert list(df.columns) == ["example", "prediction", "label"]
    assert df["example"].tolist() == [0, 1, 2, 3] and df["prediction"].tolist() == [1, 0, 0, 1]
    # the study's bootstrap recomputes the reported metric from the file
    assert task_metric("accuracy")(df["prediction"].to_numpy(), df["label"].to_numpy()) == 0.75


def test_regression_predictions_keep_the_value_as_scored(tmp_path):
    task = SimpleNamespace(is_regression=True)
    logits = torch.tensor([[0.5], [3.25], [4.0]])
    write_parquet(tmp_path / "r.parquet", prediction_frame(task, logits, torch.tensor([1.0, 3.0, 4.5])))
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert df["prediction"].dtype == np.float32 and df["prediction"].tolist() == [0.5, 3.25, 4.0]
    assert no_predictions().empty and list(no_predictions().columns) == ["example", "prediction", "label"]
