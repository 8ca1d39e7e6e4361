"""score: per-module importance from the calibration measurements (normalised within groups)."""

from __future__ import annotations

from lora_ops.targets import find_targets
from stages.common import runtime
from stages.common.adapted import load_base
from stages.common.context import method_context
from stages.common.io import read_records, write_records
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.tracking import StageRun


def main() -> None:
    params = load_params()
    method, ctx = method_context(params)
    rows = read_records(Paths.measurements)  # a damaged input: one line, before any run is opened
    with StageRun("score", params.model_dump()) as run:
        targets = find_targets(load_base(params).model, params.adapter.targets) if rows else []
        scores = method.score(rows, targets, ctx) if rows else []
        write_records(Paths.importance, scores, ["module", "group", "importance"])
        if scores and "importance" in scores[0]:
            run.log_metrics({f"importance.{s['module']}": s["importance"] for s in scores})
            print(f"score: {len(scores)} modules scored in {len({s['group'] for s in scores})} groups")
        elif scores:
            print(f"score: {len(scores)} calibration rows passed on to decide ({method.name})")
        else:
            print(f"score: {method.name} has no importance to score")
        run.log_artifact(Paths.importance)


if __name__ == "__main__":
    runtime.run_stage(main, "score")
