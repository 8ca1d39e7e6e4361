"""resolve: the selected method's settings, one small file per stage that reads them.

DVC tracks these files instead of every method's params section, so editing a method that is
not selected reruns nothing, and editing the selected one reruns only the stages whose file
changed (a stage whose content is unchanged is skipped by DVC). ``calibrate.json`` also carries
the general settings the calibration pass reads, and nothing for methods that do not calibrate.
"""

from __future__ import annotations

from typing import Any

from lora_ops.methods import get_method
from stages.common import runtime
from stages.common.io import write_json
from stages.common.params import Params, load_params
from stages.common.paths import Paths

#: the stages that read a method's own params section
METHOD_STAGES = ("calibrate", "decide", "finetune")
#: stages that train, and so read the recipe when the method does not list its keys per stage
RECIPE_STAGES = ("calibrate", "finetune")


def stage_settings(params: Params) -> dict[str, dict[str, Any]]:
    """stage -> exactly what that stage reads of the method's settings (JSON-able)."""
    method = get_method(params.method.name)
    section = params.method_params().model_dump(mode="json")
    out: dict[str, dict[str, Any]] = {}
    for stage in METHOD_STAGES:
        keys = method.stage_settings.get(stage)
        if keys is None:
            # the recipe (learning rates) only matters where something trains: finetune, and the
            # calibration pass of a method that probes; a plan never depends on it
            keys = tuple(k for k in section if k != "recipe" or stage in RECIPE_STAGES)
        chosen = {k: section[k] for k in keys}
        out[stage] = {"method": method.name, "settings": chosen}
    if method.needs_calibration:
        out["calibrate"]["general"] = {
            "seed": params.seed, "max_length": params.model.max_length,
            "adapter": params.adapter.model_dump(mode="json"), "calibrate": params.calibrate.model_dump(mode="json"),
            "train": params.train.model_dump(mode="json"),
        }
    else:  # nothing to calibrate: no setting can change the (empty) result
        out["calibrate"] = {"method": method.name, "needed": False}
    return out


def main() -> None:
    params = load_params()
    for stage, content in stage_settings(params).items():
        write_json(Paths.resolve / f"{stage}.json", content)
    print(f"resolve: {params.method.name} settings for {', '.join(METHOD_STAGES)}")


if __name__ == "__main__":
    runtime.run_stage(main, "resolve")
