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

and what the rest of the project must know about it, so that nothing outside ``lora_ops/methods``
branches on a method's id:

=================  =============================================================
``check_shapes``   settings impossible on the model's shapes (rank > width...)
``report_figures`` method-specific figures of a run (gates closed...) and ``figure_labels``
``paper_targets``  the trends its paper reports, as paired claims the study gives verdicts on
``reference``      the study's baseline (plain LoRA); ``study_peer``: a peer baseline
``compress_skip_reason``  why ``compress`` does not apply (block adapters, a pruned base)
=================  =============================================================

Methods register themselves with :func:`register`; the stages look them up by id with
:func:`get_method`. Adding a method never edits a central if-chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

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
#: the type of a method's own params section (its ``params_model``)
P = TypeVar("P", bound=MethodParams)


class MissingDependency(ImportError):
    """An optional dependency of one method is not installed (the message says how to install it)."""


class ShapeMismatch(ValueError):
    """Settings that are valid types but impossible on the model's shapes; ``key`` is the params key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class PaperTarget:
    """One trend of a method's paper, as a **paired claim** the study tests on per-example predictions:
    ``method − against > threshold`` points of the task's dev metric, paired by seed (``"within 1 pt of
    LoRA"`` is ``threshold=-1``; ``"at least as good as bone"`` is ``against="bone", threshold=0``).

    ``against``: the id of the method compared with (None: the study's reference method). ``condition``: an
    optional deterministic side-condition, measured on the study's means and said in words (``"55.0 % of
    LoRA's stored params (<= 60 %)"``); ``condition_met`` False makes the target *not met*, whatever the
    interval says. The study gives the verdict (met / not met / inconclusive, Holm-corrected across all
    targets of its report); the method only states the claim."""

    what: str
    threshold: float
    against: str | None = None
    condition: str = ""
    condition_met: bool = True


@dataclass
class MethodContext(Generic[P]):
    """Everything a method verb may need beyond the model: validated settings and the seed."""

    adapter: AdapterConfig
    params: P
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32


class Method(Generic[P]):
    """Base class with the defaults of a method that has a fixed structure (plain LoRA-like).

    Generic in its params type: ``class LoRADrop(Method[LoRADropParams])`` sees ``ctx.params`` typed."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: pydantic model of the method's own section in params.yaml (``params[<name>]``)
    params_model: ClassVar[type[MethodParams]] = NoParams
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
    #: why the compress stage passes this method's trained adapter through unchanged ("" = it compresses
    #: it: every adapter layer has a LoRA form ``as_lora()`` whose trimmed, quantised pair is the product)
    compress_skip_reason: ClassVar[str] = ""
    #: why the evaluate stage reports this method's unmerged model, its own layers as trained, instead of the
    #: float merge ("" = the merge is what is stored and scored). The float merge is then reported beside it.
    scored_unmerged_reason: ClassVar[str] = ""
    #: the study's baseline: "% of LoRA" and the other methods' paper targets are measured against it
    reference: ClassVar[bool] = False
    #: a peer baseline (PEFT's own alternatives): the study compares every other method against it
    study_peer: ClassVar[bool] = False
    #: figures this method adds to a study's rows and report: column -> header in the report's table.
    #: A figure comes from :meth:`report_figures` or, failing that, from the run's metrics.json.
    figure_labels: ClassVar[dict[str, str]] = {}

    def check_environment(self) -> None:
        """Raise :class:`MissingDependency` (one line: what to install) when an optional dependency this
        method needs is absent. Called when params are loaded, so a run fails before any stage works."""

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[P]) -> None:
        """Raise :class:`ShapeMismatch` when the settings cannot work on these targets' shapes (a rank above
        a module's width...). ``model`` may be a shapes-only skeleton on the ``meta`` device. Default: none."""

    # ---------------------------------------------------------------- stages
    def calibrate(
        self, model: nn.Module, targets: list[Target], sample: BatchSource, ctx: MethodContext[P]
    ) -> list[dict[str, Any]]:
        """Rows of calibration measurements (one per module, typically). Default: none needed.

        ``model`` must be left as it was given (no adapters, same trainable flags)."""
        return []

    def score(self, rows: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[P]) -> list[dict[str, Any]]:
        """Per-module importance rows. Default: none (fixed structure)."""
        return []

    def decide(self, scores: list[dict[str, Any]], targets: list[Target], ctx: MethodContext[P]) -> dict[str, Any]:
        """The plan. Default: every target gets its own adapter."""
        return {
            "method": self.name,
            "modules": {t.name: {"group": t.group, "role": t.role, "layer": t.layer, "mode": "own"} for t in targets},
        }

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[P]
              ) -> dict[str, AdapterLayer]:
        raise NotImplementedError(f"method {self.name!r} does not implement build()")

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P]) -> Controller:
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
    def merged_model(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P]) -> nn.Module:
        """A plain model with the adapters folded in (LoRAPrune also slices pruned structure here)."""
        return unload(model, merge=True)

    def export_merged(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P]) -> nn.Module:
        """The model to save as a plain HF folder (``save_pretrained``); may restructure it in place."""
        return self.merged_model(model, plan, ctx)

    def extra_exports(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P]
                      ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Method-specific deployable forms written by the merge stage: name -> (tensors, JSON metadata)."""
        return {}

    def evaluation_extras(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P],
                          batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Method-specific metrics measured on the trained, unmerged model (e.g. BOPs, export gaps)."""
        return {}

    def export_peft(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[P]) -> PeftExport:
        return export_lora_family(model)

    # ----------------------------------------------------------------- study
    def report_figures(self, controller_summary: Mapping[str, Any] | None, params: P
                       ) -> dict[str, float | None]:
        """Figures of one finished run that only the method knows how to read (keys of
        :attr:`figure_labels`), from its controller's summary in finetune's summary.json. Default: none."""
        return {}

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        """The trends the method's paper reports for ``task``, as paired claims (:class:`PaperTarget`): ``rows``
        maps each method present (by id) to its mean row (``method`` label, ``score_mean``, ``stored_mean``,
        figures), ``reference`` is the reference method's row; the means serve deterministic side-conditions
        (stored share, BOPs) only: the quality claim is the study's paired interval. Default: none."""
        return []


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method id {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a method (a test's toy method, once the test is done)."""
    _REGISTRY.pop(name, None)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method] | None:
    """The registered class of ``name`` (a study label such as ``lora_drop[threshold=0.6]`` counts as its
    method), or None when no such method is registered."""
    return _REGISTRY.get(name.split("[", 1)[0])


def reference_method() -> str | None:
    """The id of the study's reference method (plain LoRA), None when none is registered."""
    return next((name for name, cls in _REGISTRY.items() if cls.reference), None)


def points_gap(row: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """``row``'s mean score minus the reference's, in points on a 0-100 scale."""
    return 100 * (float(row["score_mean"]) - float(reference["score_mean"]))


def narrowest_targets(targets: list[Target]) -> tuple[int, list[Target]]:
    """The smallest ``min(in, out)`` over the targets and the targets that have it."""
    narrowest = min(min(t.in_features, t.out_features) for t in targets)
    return narrowest, [t for t in targets if min(t.in_features, t.out_features) == narrowest]


def shape_examples(targets: list[Target]) -> str:
    return ", ".join(f"{t.name} ({t.out_features}x{t.in_features})" for t in targets[:2])


def check_rank_fits(rank: int, targets: list[Target]) -> None:
    """A LoRA-family rank above ``min(in, out)`` of a target adds parameters but no expressiveness
    (PEFT refuses it too): :class:`ShapeMismatch` on ``adapter.rank``."""
    narrowest, tight = narrowest_targets(targets)
    if rank > narrowest:
        raise ShapeMismatch("adapter.rank", f"{rank} is above min(in, out) = {narrowest} of {len(tight)} target "
                                            f"module(s), e.g. {shape_examples(tight)}: choose adapter.rank <= "
                                            f"{narrowest}")


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}")
    return _REGISTRY[name]()
