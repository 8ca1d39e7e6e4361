"""All tasks by name: GLUE classification/regression and causal-LM tasks."""

from __future__ import annotations

from stages.common.glue import TASKS as GLUE_TASKS
from stages.common.glue import GlueTask
from stages.common.lm import LM_TASKS, LMTask

Task = GlueTask | LMTask
TASKS: dict[str, Task] = {**GLUE_TASKS, **LM_TASKS}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def is_lm(task: Task) -> bool:
    return getattr(task, "kind", "classification") == "causal_lm"
