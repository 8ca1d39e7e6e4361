"""What the compare and study reports share: number formatting and the MLflow run that holds a report."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from stages.common.tracking import experiment_id, tracking_uri


def fmt_int(v: Any) -> str:
    """A count with thousands separators; "–" for a missing value."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(round(v)):,}"


def fmt(v: Any, digits: int = 1) -> str:
    """A number to ``digits`` decimals; "–" for a missing value."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def log_report_run(root: Path, experiment: str, files: list[Path], df: pd.DataFrame, tags: dict[str, str],
                   kind: str = "compare") -> str:
    """One MLflow run holding the report files (under ``<kind>/``) and the mean metrics per task and method."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    exp_id = experiment_id(client, experiment, root)
    run_id = client.create_run(exp_id, tags={"mlflow.runName": f"{kind} {time.strftime('%Y-%m-%d %H:%M')}",
                                             kind: "true", **tags}).info.run_id
    ts = int(time.time() * 1000)
    items = []
    for (task, method), g in df.groupby(["task", "method"], sort=False):
        for col in ("score", "trainable_params", "stored_params", "bops_ratio_adapter", "train_seconds",
                    "peak_rss_mb", "latency_merged_ms"):
            if col not in g:
                continue
            value = g[col].astype(float).mean()
            if not math.isnan(value):
                # MLflow metric names allow letters, digits, _ - . space : / (a variant's [k=v] does not pass)
                key = re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", f"{task}.{method}.{col}")
                items.append(Metric(key, float(value), ts, 0))
    client.log_batch(run_id, metrics=items)
    for f in files:
        client.log_artifact(run_id, str(f), kind)
    client.set_terminated(run_id, "FINISHED")
    return run_id
