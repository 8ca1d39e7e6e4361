"""score: per-module importance from the calibration measurements (normalised within groups)."""

from __future__ import annotations

import pandas as pd

from lora_ops.targets import find_targets
from stages.common import runtime
from stages.common.io import read_parquet, write_parquet
from stages.common.params import load_params
from stages.common.pipeline import Paths, load_base, method_context
from stages.common.tracking import StageRun


def main() -> None:
    params = load_params()
    method, ctx = method_context(params)
    with StageRun("score", params.model_dump()) as run:
        rows = read_parquet(Paths.measurements).to_dict("records")
        targets = find_targets(load_base(params).model, params.adapter.targets) if rows else []
        scores = method.score(rows, targets, ctx) if rows else []
        df = pd.DataFrame(scores) if scores else pd.DataFrame(columns=["module", "group", "importance"])
        write_parquet(Paths.importance, df)
        if scores:
            run.log_metrics({f"importance.{s['module']}": s["importance"] for s in scores})
            print(f"score: {len(scores)} modules scored in {df['group'].nunique()} groups")
        else:
            print(f"score: {method.name} has no importance to score")
        run.log_artifact(Paths.importance)


if __name__ == "__main__":
    runtime.run_stage(main, "score")
