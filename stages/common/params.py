"""The schema of params.yaml. Every stage validates the whole file before doing any work.

Method-specific sections are top-level keys named after the method id (``lora_drop:``,
``dora_dr:`` ...); each is validated by that method's own pydantic model, so a new method
brings its section without editing this file.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_ops.methods import AdapterConfig, available_methods, get_method
from lora_ops.methods.base import MissingDependency
from lora_ops.methods.recipe import check_groups
from lora_ops.training.loop import TrainConfig
from stages.common.tasks import TASKS
from stages.common.workspace import origin_root


class ConfigError(ValueError):
    """params.yaml is invalid; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelParams(_Strict):
    name: str = Field("minilm", description="built-in name (minilm, smollm2-135m), local folder, or hub id")
    max_length: int = Field(64, ge=8, le=4096, description="tokens per example (longer is truncated)")


class TaskParams(_Strict):
    name: str = "sst2"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; choose one of {', '.join(sorted(TASKS))}")
        return v


def _size(v: float | int | None, what: str) -> float | int | None:
    if v is None:
        return v
    if isinstance(v, float) and not 0.0 < v <= 1.0:
        raise ValueError(f"{what} as a ratio must lie in (0, 1], got {v}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"{what} as a count must be >= 1, got {v}")
    return v


class DataParams(_Strict):
    mirror: str | None = Field("../shared/data", description="local GLUE mirror; null = Hugging Face hub only")
    train_size: float | int | None = Field(None, description="ratio in (0,1] or count; null = all")
    dev_size: float | int | None = None
    validation_size: float | int = Field(
        400, description="selection split carved (stratified, seeded) from the training split before "
                         "train_size is drawn from the rest: ratio in (0,1] or count")

    @field_validator("train_size", "dev_size", "validation_size")
    @classmethod
    def _sizes(cls, v: Any, info: Any) -> Any:
        return _size(v, info.field_name)


class MethodParams(_Strict):
    name: str = "lora_drop"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in available_methods():
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(available_methods())}")
        return v


class AdapterParams(AdapterConfig):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class CalibrateParams(_Strict):
    ratio: float = Field(0.1, description="stratified calibration sample as a share of the training set")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {v}")
        return v


#: the loop's config holds the training defaults; the fields below that it shares take theirs from it
_LOOP = TrainConfig()


class TrainParams(_Strict):
    """The ``train`` section. :func:`stages.common.context.train_config` turns it into the loop's
    :class:`TrainConfig` (every field they share, by name)."""

    epochs: int = Field(_LOOP.epochs, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(_LOOP.lr, gt=0)
    head_lr: float | None = Field(_LOOP.head_lr, gt=0)
    weight_decay: float = Field(_LOOP.weight_decay, ge=0)
    warmup_ratio: float = Field(_LOOP.warmup_ratio, ge=0, lt=1)
    grad_clip: float | None = Field(_LOOP.grad_clip, gt=0)
    max_steps: int | None = Field(_LOOP.max_steps, ge=1)
    checkpoint_every: int = Field(_LOOP.checkpoint_every, ge=0,
                                  description="steps between resumable checkpoints; 0 = epoch ends")
    # a stage-level choice (the loop only knows metric names): resolved per task by context.select_metric
    select_metric: str = Field("main", description="'main' = the task's official metric, or 'loss'; "
                                                   "measured on the validation split, never on dev")
    group_by_length: bool = Field(True, description="length-grouped batches (seeded buckets), each padded to "
                                                    "its own longest example")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="round each batch's width up to a multiple "
                                                                   "(8 suits tensor cores); null = exact")
    # the pipeline's default is the fastest exact-enough precision of the machine it runs on (issue 24:
    # bf16 matches fp32 within seed noise, paired, on SST-2 and STS-B); the loop's own default stays fp32, so
    # a library caller gets the same bytes on every machine unless it asks otherwise
    precision: str = Field("auto", description="fp32 | bf16 | fp16 | auto: autocast for the forward pass "
                                               "(fp16 with a loss scaler; auto = bf16 where the device has it "
                                               "natively, else fp32, logged); adapters and optimizer state "
                                               "stay fp32")
    gradient_checkpointing: bool = Field(_LOOP.gradient_checkpointing, description="recompute block activations in backward (causal "
                                                            "LMs): less memory, about one extra forward")
    # the loop's fast paths, each exact to float rounding (tests/lora_ops/training; the [CLS]-only layer for
    # every registered method): on in the pipeline, where they make training 0.75x the anchor's time instead
    # of 0.88x (docs/benchmarks.md); the loop's own defaults stay off, as with precision
    fused_adamw: bool = Field(True, description="AdamW's fused multi-tensor kernel instead of the per-parameter loop")
    cls_only_last_layer: bool = Field(True, description="a BERT-style classifier's last layer computes the [CLS] "
                                                        "row only (~14 % fewer linear FLOPs on MiniLM; other models "
                                                        "ignore it)")
    lm_loss_chunk: int = Field(_LOOP.lm_loss_chunk, ge=0, description="> 0: a causal LM's loss in chunks of this "
                               "many target rows, no full logits tensor; 0 = the model's own loss")

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        from lora_ops.training.precision import PRECISION_CHOICES, precision_choice_error

        if v not in PRECISION_CHOICES:
            raise ValueError(precision_choice_error(v))
        return v


class EvaluateParams(_Strict):
    batch_size: int = Field(64, ge=1)
    latency_batches: int = Field(5, ge=1, description="timed batches for the latency metric")


class CompressParams(_Strict):
    """The ``compress`` stage: rank trimming and low-bit factors of the trained adapter (``rank: none`` and
    ``bits: none`` pass the adapter through byte for byte). See lora_ops/compress and shared/spec/compress.md."""

    rank: str = Field("output", description="trimming criterion: none | svd (singular values of ΔW, PEFT "
                                            "convert_to_lora) | output (‖ΔW X‖ on the calibration inputs)")
    budget: str = Field("search", description="search (smallest global component budget within tolerance, on "
                                              "validation) | energy (per-module share, PEFT) | threshold (one "
                                              "global score) | components (a global count)")
    normalisation: str = Field("adapter", description="global scores relative to the module's adapter output "
                                                      "energy (adapter) or its base layer's (base)")
    energy: float = Field(0.9, gt=0.0, le=1.0, description="budget energy: share of each module's energy kept")
    threshold: float = Field(0.01, gt=0.0, description="budget threshold: keep components scoring at least this")
    components: int = Field(16, ge=0, description="budget components: components kept over all modules")
    bits: int | str = Field("search", description="none | 8 | 4 | search (the smallest within tolerance)")
    group_size: int | None = Field(None, ge=1, description="columns per quantisation scale; null = one per row")
    tolerance: float = Field(0.5, ge=0.0, description="validation main-metric drop allowed by a search, in points "
                                                      "(percent for a loss)")
    ridge: float = Field(1e-6, ge=0.0, description="ridge of G = Σ(Ax)(Ax)ᵀ relative to tr(G)/r (output criterion)")
    confidence: float | None = Field(0.95, gt=0.5, lt=1.0, description="a candidate is within tolerance when a "
                                     "one-sided bound at this confidence (paired bootstrap over the validation "
                                     "examples, against the uncompressed adapter) is; null = the point estimate")
    recovery_steps: int = Field(0, ge=0, description="optimizer steps re-tuning the trimmed factors and the head on "
                                "the training split before quantisation, kept only where validation shows it "
                                "pays; 0 = no recovery")
    recovery_lr: float | None = Field(None, gt=0.0, description="recovery learning rate; null = the method's "
                                      "adapter learning rate")

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, v: Any) -> str:
        from lora_ops.compress import CRITERIA

        if v is None:
            return "none"
        if v not in ("none", *CRITERIA):
            raise ValueError(f"rank must be none or a criterion ({', '.join(CRITERIA)}), got {v!r}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        if v not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {v!r}")
        return v

    @field_validator("normalisation")
    @classmethod
    def _normalisation(cls, v: str) -> str:
        from lora_ops.compress import NORMALISATIONS

        if v not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {v!r}")
        return v

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> int | str:
        from lora_ops.compress import SUPPORTED_BITS

        if v is None:
            return "none"
        if v in ("none", "search") or (isinstance(v, int) and not isinstance(v, bool) and v in SUPPORTED_BITS):
            return v
        raise ValueError(f"bits must be none, search or one of {', '.join(map(str, SUPPORTED_BITS))}, got {v!r}")

    @property
    def off(self) -> bool:
        """Nothing to do: the trained adapter is the product, byte for byte."""
        return self.rank == "none" and self.bits == "none"

    @property
    def searches(self) -> bool:
        return self.budget == "search" or self.bits == "search"


#: how the compress stage picks the kept components (CompressParams.budget)
BUDGETS = ("search", "energy", "threshold", "components")


class DistributedParams(_Strict):
    processes: int = Field(1, ge=1, description="data-parallel processes for finetune (torchrun when > 1)")
    backend: str = Field("auto", description="auto (nccl on GPU, gloo on CPU) | gloo | nccl")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {v!r}")
        return v


class LMEvalParams(_Strict):
    """Causal-LM evaluation protocol (recorded with the metrics)."""

    window: int = Field(256, ge=16, description="tokens per perplexity window (non-overlapping)")
    windows: int = Field(8, ge=1, description="windows scored from the start of each test text")
    dense_baseline: bool = Field(True, description="also measure the unadapted base model")


class TrackingParams(_Strict):
    experiment: str = "lora-sieve"


class RegistryParams(_Strict):
    """Champion/challenger promotion of the merged model (stage ``promote``)."""

    enabled: bool = Field(True, description="register the merged model and decide on promotion")
    name: str | None = Field(None, description="registered model name; null = <task>-<model>")
    margin: float = Field(0.0, ge=0.0, description="the challenger must beat the champion's score by more than this")
    max_adapter_params: int | None = Field(None, ge=1, description="efficiency limit on stored adapter params")
    max_latency_ms: float | None = Field(None, gt=0, description="efficiency limit on merged-model batch latency")
    max_stored_bytes: int | None = Field(None, ge=1, description="efficiency limit on the stored adapter file's "
                                                                 "payload (codes + scales + head)")
    min_gain_over_trivial: float | None = Field(
        0.01, ge=0.0, description="a champion must beat the trivial predictor (majority class, training mean, "
                                  "unadapted base LM) by at least this, in main-metric units; null = only "
                                  "constant predictions are refused")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"registry name {v!r} may hold only letters, digits, '.', '_' and '-'")
        return v


class ScheduleParams(_Strict):
    """The nightly deployment registered by ``python -m flows.serve``."""

    cron: str = Field("0 2 * * *", description="5-field cron expression")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression")
    deployment: str = Field("nightly", description="Prefect deployment name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted param overrides for the run")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from cronsim import CronSim, CronSimError  # Prefect's own cron parser

        if len(v.split()) != 5:
            raise ValueError(f"cron {v!r} must have 5 fields (minute hour day month weekday)")
        try:
            CronSim(v, datetime.now())
        except CronSimError as exc:
            raise ValueError(f"cron {v!r} is invalid: {exc}") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as UTC or Europe/Berlin)") from None
        return v


class Params(BaseModel):
    model_config = ConfigDict(extra="allow")
    seed: int = 42
    model: ModelParams = ModelParams()
    task: TaskParams = TaskParams()
    data: DataParams = DataParams()
    method: MethodParams = MethodParams()
    adapter: AdapterParams = AdapterParams()
    calibrate: CalibrateParams = CalibrateParams()
    train: TrainParams = TrainParams()
    compress: CompressParams = CompressParams()
    evaluate: EvaluateParams = EvaluateParams()
    distributed: DistributedParams = DistributedParams()
    lm_eval: LMEvalParams = LMEvalParams()
    tracking: TrackingParams = TrackingParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()

    @model_validator(mode="after")
    def _checkpointing_needs_causal_lm(self) -> Params:
        from stages.common.tasks import get_task, is_lm

        if self.train.gradient_checkpointing and not is_lm(get_task(self.task.name)):
            raise ValueError(f"train.gradient_checkpointing is for causal LMs; task {self.task.name!r} trains "
                             "an encoder classifier (set it to false)")
        return self

    @model_validator(mode="after")
    def _method_sections(self) -> Params:
        for key in self.model_extra or {}:
            if key not in available_methods():
                raise ValueError(f"unknown section {key!r}; method sections are named after a method "
                                 f"({', '.join(available_methods())})")
        return self

    def method_params(self, name: str | None = None) -> BaseModel:
        """The validated section of ``name`` (default: the selected method)."""
        name = name or self.method.name
        raw = (self.model_extra or {}).get(name) or {}
        return get_method(name).params_model.model_validate(raw)  # a non-mapping section is a ValidationError


def _format(err: ValidationError, source: str, section: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join([section] * bool(section) + [str(p) for p in e["loc"]]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                root: str | Path | None = None) -> Params:
    """Read and validate params (plus dotted ``overrides``); raise :class:`ConfigError` with a one-line message.
    Relative paths in them (``data.mirror``) are checked from ``root``, by default the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the document must be a mapping of sections, not a {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        params = Params.model_validate(raw)  # not Params(**raw): a list or scalar document is a ValidationError
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from None
    for name in available_methods():  # validate every method section present, not only the selected one
        if name in (params.model_extra or {}):
            try:
                settings = params.method_params(name)
            except ValidationError as exc:
                raise ConfigError(_format(exc, str(path), name)) from None
            try:
                check_groups(settings.recipe, get_method(name).parameter_groups, name)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    try:
        get_method(params.method.name).check_environment()
    except MissingDependency as exc:
        raise ConfigError(str(exc)) from None
    _check_data_reachable(params, Path(root) if root is not None else path.parent)
    _check_model(params)
    _check_precision(params)
    return params


def _check_precision(params: Params) -> None:
    """bf16 or fp16 on a device that cannot run it stops here, before any stage works."""
    from lora_ops.training.precision import check_precision
    from stages.common.device import device

    try:
        check_precision(params.train.precision, device())
    except ValueError as exc:
        raise ConfigError(f"train.{exc}") from None  # "train.precision bf16: <why>; use ..."


def _check_model(params: Params) -> None:
    from stages.common.models import ModelUnavailable, resolve_model

    try:
        resolve_model(params.model.name, convert=False)
    except ModelUnavailable as exc:
        raise ConfigError(f"model.name: {exc}") from None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"] = value`` for ``key`` ``a.b``; a missing or empty (null) section is created. ``raw`` may
    be any mapping that keeps its own node types (flows pass a round-trip YAML document)."""
    node = raw
    *parents, leaf = key.split(".")
    for i, p in enumerate(parents):
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):  # e.g. "seed.x": the parent is a scalar, not a section
            raise ConfigError(f"override {key!r}: {'.'.join(parents[:i + 1])} is not a section")
    node[leaf] = value


def _check_data_reachable(params: Params, root: Path) -> None:
    from stages.common.glue import mirror_has_task
    from stages.common.tasks import get_task, is_lm

    mirror = mirror_path(params, root)
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    task = get_task(params.task.name)
    present = mirror is not None and (
        (mirror / task.mirror_file).is_file() if is_lm(task) else mirror_has_task(mirror, task))
    if not present and offline:
        where = f"{mirror}" if mirror is not None else "(no mirror set)"
        raise ConfigError(
            f"data mirror {where} has no {'GLUE ' * (not is_lm(task))}{task.name} and the hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): "
            "set data.mirror to a folder laid out like ../shared/data, or go online"
        )


def mirror_path(params: Params, root: Path | str = ".") -> Path | None:
    if params.data.mirror is None:
        return None
    p = Path(params.data.mirror)
    # relative to the repository, also when DVC runs this experiment in a copy under .dvc/tmp/exps
    return p if p.is_absolute() else (origin_root(root) / p).resolve()
