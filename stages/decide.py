"""decide: the plan (which adapter each module gets) and its parameter counts."""

from __future__ import annotations

from stages.common import runtime, shapes
from stages.common.adapted import build_adapted, load_base
from stages.common.context import method_context
from stages.common.evaluation import plain_lora_parameters
from stages.common.io import read_records, write_json
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.tracking import StageRun


def main() -> None:
    params = load_params()
    shapes.check_model_shapes(params)  # impossible for this model (rank > width...): fail before training
    method, ctx = method_context(params)
    scores = read_records(Paths.importance)  # a damaged input: one line, before any run is opened
    with StageRun("decide", params.model_dump()) as run:
        from lora_ops.targets import find_targets

        loaded = load_base(params)
        targets = find_targets(loaded.model, params.adapter.targets)
        plan = method.decide(scores, targets, ctx)
        # count what the plan trains by building it once, on the model already loaded
        adapted = build_adapted(params, plan, loaded=loaded)
        counts = method.parameter_counts(adapted.model)
        reference = plain_lora_parameters(targets, params.adapter.rank)
        plan["parameters"] = {**counts, "plain_lora": reference,
                              "trainable_ratio_to_lora": counts["trainable"] / reference}
        plan["adapter"] = params.adapter.model_dump()
        write_json(Paths.plan, plan)
        run.log_metrics({f"params.{k}": v for k, v in plan["parameters"].items()}, parent=True)
        run.log_artifact(Paths.plan)
        print(f"decide: {method.name} trains {counts['trainable']:,} adapter parameters "
              f"({plan['parameters']['trainable_ratio_to_lora']:.1%} of plain LoRA r={params.adapter.rank})")


if __name__ == "__main__":
    runtime.run_stage(main, "decide")
