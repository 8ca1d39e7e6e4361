"""Per-method optimisation recipes.

Every method's params section carries a ``recipe``: the learning rate of its adapter factors, of
the task head, of each further parameter group it declares (gates, quantiser ranges) and the
warm-up share. ``None`` means "as in the ``train`` section", so ``train.*`` stays the one place to
set a budget-wide value and a recipe only says where its paper departs from it.

Why groups: one AdamW learning rate cannot serve tensors that must travel very different
distances. Adam moves a parameter by at most about ``lr`` per step, so over ``T`` steps of
warm-up + linear decay by about ``lr * T / 2``: at ``lr = 1e-3`` and 500 steps that is 0.25,
while a Bayesian-LoRA gate must move its log-alpha by ~3 to close.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_ops.training.loop import TrainConfig


class Recipe(BaseModel):
    """Learning rates and warm-up of one method (``None``: take the ``train`` section's value)."""

    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(None, gt=0, description="adapter factors (group 'adapter'); null = train.lr")
    head_lr: float | None = Field(None, gt=0, description="task head (group 'head'); null = train.head_lr")
    group_lr: dict[str, float] = Field(default_factory=dict,
                                       description="further groups the method declares, e.g. {gates: 5e-2}")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="null = train.warmup_ratio")

    @field_validator("group_lr")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"group learning rates must be > 0, got {bad}")
        return v


class MethodParams(BaseModel):
    """Base of every method's params section: its own settings plus its recipe."""

    model_config = ConfigDict(extra="forbid")
    recipe: Recipe = Field(default_factory=Recipe)


def check_groups(recipe: Recipe, groups: Iterable[str], method: str) -> None:
    """ValueError naming the groups ``method`` has when the recipe sets one it does not have."""
    known = set(groups)
    unknown = sorted(set(recipe.group_lr) - known)
    if unknown:
        raise ValueError(f"{method}.recipe.group_lr sets {unknown}, which {method} does not have; its parameter "
                         f"groups are {', '.join(sorted(known))} (adapter and head also via lr and head_lr)")


def apply_recipe(train: TrainConfig, recipe: Recipe) -> TrainConfig:
    """``train`` with the recipe's values laid over it (a new config; ``train`` is left alone)."""
    group_lr = dict(recipe.group_lr)
    lr = recipe.lr if recipe.lr is not None else train.lr
    head_lr = recipe.head_lr if recipe.head_lr is not None else train.head_lr
    return dataclasses.replace(
        train, lr=lr, head_lr=head_lr, group_lr=group_lr,
        warmup_ratio=recipe.warmup_ratio if recipe.warmup_ratio is not None else train.warmup_ratio)
