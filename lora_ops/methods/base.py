"""The method interface and its registry.

A method is one class with the pipeline's verbs:

=============  =================================================================
``calibrate``  measure something on a calibration sample (default: nothing)
``score``      turn measurements into per-module importance (default: nothing)
``decide``     the plan: which adapter each target gets (JSON-able dict)
``build``      inject adapter layers into a model according to the plan
``controller`` in-loop behaviour during fine-tuning (schedules, masks, regularisers)
``export_peft``  PEFT-format config and tensors
=============  =================================================================

Methods register themselves with :func:`register`; the stages look them up by id with
:func:`get_method`. Adding a method never edits a central if-chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.data import BatchSource
from lora_ops.export import PeftExport, export_lora_family
from lora_ops.methods.recipe import MethodParams
from lora_ops.targets import Target, unload
from lora_ops.training.controller import Controller
from lora_ops.training.loop import TrainConfig


class AdapterConfig(BaseModel):
    """Settings shared by the LoRA-family adapters."""

    model_config = ConfigDict(extra="forbid")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all"
    rslora: bool = False


NoParams = MethodParams  # a method with no settings of its own still has a recipe


class MissingDependency(ImportError):
    """An optional dependency of one method is not installed (the message says how to install it)."""


@dataclass
class MethodContext:
    """Everything a method verb may need beyond the model: validated settings and the seed."""

    adapter: AdapterConfig
    params: BaseModel
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32


class Method:
    """Base class with the defaults of a method that has a fixed structure (plain LoRA-like)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: pydantic model of the method's own section in params.yaml (``params[<name>]``)
    params_model: ClassVar[type[BaseModel]] = NoParams
    #: optimiser groups the method's layers create (see AdapterLayer.parameter_group); a recipe may
    #: give each its own learning rate. "head" is everything trainable outside the adapters.
    parameter_groups: ClassVar[tuple[str, ...]] = ("adapter", "head")
    needs_calibration: ClassVar[bool] = False
    #: which keys of the method's params section each pipeline stage reads (stage -> keys). A stage
    #: not listed reads the whole section. The resolve stage writes one settings file per stage from
    #: this, so DVC reruns only the stages whose settings a params edit really changes.
    stage_settings: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: why the merge stage writes no PEFT adapter for this method ("" = it writes one)
    no_peft_export_reason: ClassVar[str] = ""

    def check_environment(self) -> None:
        """Raise :class:`MissingDependency` (one line: what to install) when an optional dependency this
        method needs is absent. Called when params are loaded, so a run fails before any stage works."""

    # ---------------------------------------------------------------- stages
    def calibrate(
        self, model: nn.Module, targets: list[Target], sample: BatchSource, ctx: MethodContext
    ) -> list[dict[str, Any]]:
        """Rows of calibration measurements (one per module, typically). Default: none needed.

        ``model`` must be left as it was given (no adapters, same trainable flags)."""
        return []

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext) -> list[dict[str, Any]]:
        """Per-module importance rows. Default: none (fixed structure)."""
        return []

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext) -> dict[str, Any]:
        """The plan. Default: every target gets its own adapter."""
        return {
            "method": self.name,
            "modules": {t.name: {"group": t.group, "role": t.role, "layer": t.layer, "mode": "own"} for t in targets},
        }

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext
              ) -> dict[str, AdapterLayer]:
        raise NotImplementedError(f"method {self.name!r} does not implement build()")

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext) -> Controller:
        return Controller()

    # ------------------------------------------------------------ accounting
    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """trainable (during training), active (after training), stored (compact export)."""
        seen: set[int] = set()
        trainable = 0
        for layer in adapter_layers(model).values():
            for _, p in layer.adapter_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    trainable += p.numel()
        # layers that share one set of tensors (LoRA-drop) count once
        by_tensors = {tuple(sorted(id(p) for _, p in layer.adapter_parameters())): layer
                      for layer in adapter_layers(model).values()}
        active = sum(layer.num_active() for layer in by_tensors.values())
        return {"trainable": trainable, "active": active, "stored": trainable}

    # ---------------------------------------------------------------- export
    def merged_model(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext) -> nn.Module:
        """A plain model with the adapters folded in (LoRAPrune also slices pruned structure here)."""
        return unload(model, merge=True)

    def export_merged(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext) -> nn.Module:
        """The model to save as a plain HF folder (``save_pretrained``); may restructure it in place."""
        return self.merged_model(model, plan, ctx)

    def extra_exports(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext
                      ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Method-specific deployable forms written by the merge stage: name -> (tensors, JSON metadata)."""
        return {}

    def evaluation_extras(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext,
                          batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Method-specific metrics measured on the trained, unmerged model (e.g. BOPs, export gaps)."""
        return {}

    def export_peft(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext) -> PeftExport:
        return export_lora_family(model)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method id {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}")
    return _REGISTRY[name]()
