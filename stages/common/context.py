"""The selected method and its validated context: settings, training config (from the ``train`` section
plus the method's recipe), seed and device."""

from __future__ import annotations

import dataclasses

from lora_ops.methods import Method, MethodContext, get_method
from lora_ops.methods.recipe import apply_recipe
from lora_ops.training import TrainConfig
from stages.common import runtime
from stages.common.params import Params, TrainParams
from stages.common.tasks import Task, get_task, is_lm

#: the fields of the ``train`` section the loop's config has too (the rest: batching, read by the stages)
SHARED_TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) & frozenset(TrainParams.model_fields)


def train_config(params: Params) -> TrainConfig:
    """The loop's config from the validated ``train`` section: every field they share, by name, with
    ``select_metric`` resolved for the task."""
    return TrainConfig(**{**params.train.model_dump(include=set(SHARED_TRAIN_FIELDS)),
                          "select_metric": select_metric(params)})


def method_context(params: Params) -> tuple[Method, MethodContext]:
    method = get_method(params.method.name)
    settings = params.method_params()
    ctx = MethodContext(
        adapter=params.adapter,
        params=settings,
        # the method's recipe (its learning rates per parameter group, warm-up) over the train section
        train=apply_recipe(train_config(params), settings.recipe),
        seed=params.seed,
        device=runtime.device(),
        batch_size=params.train.batch_size,
    )
    return method, ctx


def task_of(params: Params) -> Task:
    return get_task(params.task.name)


def select_metric(params: Params) -> str:
    """The metric that picks the best epoch: the task's main metric, or dev loss for causal LMs."""
    if params.train.select_metric != "main":
        return params.train.select_metric
    task = task_of(params)
    return "loss" if is_lm(task) else task.main_metric
