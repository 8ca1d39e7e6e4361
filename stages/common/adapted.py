"""The base model of a run, and the adapted model rebuilt from a plan (same seeds in every stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lora_ops.methods import Method, MethodContext
from lora_ops.targets import Target, find_targets, freeze_all_but
from stages.common import runtime
from stages.common.context import method_context, task_of
from stages.common.io import read_json
from stages.common.models import (
    LoadedModel,
    ModelRef,
    init_head_at_prior,
    load_causal_lm,
    load_for_classification,
)
from stages.common.params import Params
from stages.common.paths import Paths
from stages.common.tasks import is_lm


def model_ref(params: Params) -> ModelRef:
    info = read_json(Paths.model_ref)
    if info["name"] != params.model.name:
        raise ValueError(f"{Paths.model_ref} is for model {info['name']!r}, params say {params.model.name!r}: "
                         "rerun the prepare stage")
    return ModelRef(info["name"], info["path"], info["source"])


def load_base(params: Params) -> LoadedModel:
    """The base model for the task. A new head is initialised from the run's ``head`` seed stream,
    so every stage that loads the base (calibrate, decide, finetune, evaluate) gets the same head."""
    task = task_of(params)
    runtime.seed_everything(runtime.derive_seed(params.seed, "head"))
    if is_lm(task):
        return load_causal_lm(model_ref(params))
    loaded = load_for_classification(model_ref(params), task.num_labels)
    init_head_at_prior(loaded.model, loaded.head_modules, read_json(Paths.model_ref).get("label_prior"))
    return loaded


@dataclass
class Adapted:
    loaded: LoadedModel
    method: Method
    ctx: MethodContext
    targets: list[Target]
    plan: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


def build_adapted(params: Params, plan: dict[str, Any] | None = None, loaded: LoadedModel | None = None
                  ) -> Adapted:
    """Base model (``loaded``, or loaded here) + the plan's adapters, backbone frozen, head trainable."""
    method, ctx = method_context(params)
    loaded = loaded or load_base(params)
    targets = find_targets(loaded.model, params.adapter.targets)
    if plan is None:
        plan = read_json(Paths.plan)
    if plan.get("method") != method.name:
        raise ValueError(f"plan was made for {plan.get('method')!r}, params select {method.name!r}: rerun decide")
    runtime.seed_everything(runtime.derive_seed(params.seed, "adapter"))  # adapter initialisation
    method.build(loaded.model, targets, plan, ctx)
    freeze_all_but(loaded.model, loaded.head_modules)
    loaded.model.to(ctx.device)
    return Adapted(loaded, method, ctx, targets, plan)
