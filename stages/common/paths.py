"""Where every stage output lives (dvc.yaml mirrors these), and readers of the outputs the flows report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common.io import read_json


class Paths:
    """Every stage output, in one place (dvc.yaml mirrors these)."""

    root = Path("data")
    resolve = root / "resolve"  # the selected method's settings per stage (DVC dependencies)
    prepare = root / "prepare"
    train = prepare / "train.parquet"
    dev = prepare / "dev.parquet"
    validation = prepare / "validation.parquet"  # carved from the training split: model selection only
    model_ref = prepare / "model.json"
    calibrate = root / "calibrate"
    measurements = calibrate / "measurements.parquet"
    calibrate_summary = calibrate / "summary.json"
    score = root / "score"
    importance = score / "importance.parquet"
    decide = root / "decide"
    plan = decide / "plan.json"
    finetune = root / "finetune"
    adapter = finetune / "adapter.safetensors"
    finetune_summary = finetune / "summary.json"
    history = finetune / "history.csv"
    # resumable state lives outside DVC's outputs: DVC deletes a stage's outs before rerunning it
    checkpoints = Path(".lora_sieve") / "checkpoints"
    checkpoint = checkpoints / "finetune.json"  # + finetune.<token>.safetensors (stages/common/checkpoint.py)
    # the product adapter: the finetuned one compressed (or, compress off / not applicable, its exact bytes)
    compress = root / "compress"
    compressed = compress / "adapter.safetensors"
    compress_summary = compress / "summary.json"
    compress_curve = compress / "curve.csv"  # the walked search: stored bytes vs validation metric
    merge = root / "merge"
    merged_model = merge / "model"
    compact = merge / "adapter"
    peft = merge / "peft"
    evaluate = root / "evaluate"
    metrics = evaluate / "metrics.json"  # deterministic: quality, sizes, trivial baseline
    timings = evaluate / "timings.json"  # wall time, latency, memory (differ run to run)
    predictions = evaluate / "predictions.parquet"  # per dev example: prediction and label (paired statistics)
    plots = evaluate / "plots"
    promote = root / "promote"
    decision = promote / "decision.json"  # written only once the registry calls succeeded


def read_metrics(root: Path | str = ".") -> dict[str, Any]:
    """metrics.json with timings.json merged in (what promote and the flows report)."""
    root = Path(root)
    metrics = read_json(root / Paths.metrics)
    if (root / Paths.timings).is_file():
        metrics.update(read_json(root / Paths.timings))
    return metrics


def read_output(root: Path | str, path: Path) -> dict[str, Any]:
    """A stage's JSON output under ``root`` ({} when that stage has not written it, or not whole)."""
    try:
        return json.loads((Path(root) / path).read_text())
    except (OSError, json.JSONDecodeError):  # not written (yet), or cut short: nothing to report
        return {}
