"""calibrate: the method's calibration pass on a stratified sample (LoRA-drop: probe LoRA +
per-module output energy). Methods without one record that, cheaply."""

from __future__ import annotations

import time

from lora_ops.targets import find_targets, freeze_all_but
from stages.common import runtime, shapes
from stages.common.adapted import load_base
from stages.common.calibration import calibration_sample
from stages.common.context import method_context
from stages.common.io import write_json, write_records
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.tracking import StageRun

COLUMNS = ["module", "group", "role", "layer"]


def main() -> None:
    params = load_params()
    shapes.check_model_shapes(params)  # impossible for this model (rank > width...): fail before training
    method, ctx = method_context(params)
    with StageRun("calibrate", params.model_dump()) as run:
        summary = {"method": method.name, "needed": method.needs_calibration}
        rows = []
        if method.needs_calibration:
            runtime.seed_everything(params.seed)
            loaded = load_base(params)
            loaded.model.to(ctx.device)
            freeze_all_but(loaded.model, loaded.head_modules)
            sample, n_sample = calibration_sample(params, loaded.tokenizer)
            targets = find_targets(loaded.model, params.adapter.targets)
            start = time.perf_counter()
            rows = method.calibrate(loaded.model, targets, sample, ctx)
            summary.update(sample_rows=n_sample, ratio=params.calibrate.ratio, modules=len(rows),
                           seconds=time.perf_counter() - start)
            print(f"calibrate: {len(rows)} modules measured on {n_sample} examples "
                  f"in {summary['seconds']:.1f}s")
        else:
            summary["note"] = f"{method.name} has a fixed structure: nothing to calibrate"
            print(f"calibrate: {summary['note']}")
        write_records(Paths.measurements, rows, COLUMNS)
        write_json(Paths.calibrate_summary, summary)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifact(Paths.measurements)


if __name__ == "__main__":
    runtime.run_stage(main, "calibrate")
