"""Mixed precision and activation checkpointing for the training loop, device-agnostic.

``precision`` is ``fp32``, ``bf16``, ``fp16`` or ``auto``. Reduced precision means *autocast*: the
parameters (adapters included) and the optimizer state stay fp32, only the matrix products run
in the low dtype; the adapter layers keep one low-precision copy of their frozen base weight
(:meth:`~lora_ops.adapters.base.AdapterLayer.frozen_lowp`) instead of casting it on every call.
``auto`` resolves at run time (:func:`resolve_precision`): bf16 where the device has native bf16
(a CPU with ``avx512_bf16`` or AMX, a GPU of compute capability >= 8.0), else fp32. ``fp16`` adds a dynamic loss scaler (fp16's range is too small for raw
gradients); ``bf16`` has fp32's range and needs none.

Each check raises a one-line :class:`ValueError`, so a stage can report it as bad input.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what a config may say: a precision, or ``auto`` (resolved per device by :func:`resolve_precision`)
PRECISION_CHOICES: tuple[str, ...] = (*PRECISIONS, "auto")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` dot products or AMX tiles), detected
    at run time through torch's own CPU feature probe. Without either, oneDNN emulates bf16 GEMMs by
    conversion and they are no faster than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # pragma: no cover - a build without the probe's backend
            continue
    return False


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast really turns on for ``dtype`` on ``device_type``.

    Some torch builds accept ``torch.autocast("cpu", dtype=torch.float16)`` but only warn and run
    in fp32; a probe inside the context catches that instead of silently training in fp32."""
    if not torch.amp.is_autocast_available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
        except (RuntimeError, ValueError):
            return False


def _cuda_bf16(device: torch.device) -> bool:
    # torch >= 2.3 counts emulated bf16 (pre-Ampere) as supported by default; we want native support
    fn = torch.cuda.is_bf16_supported
    kwargs = {"including_emulation": False} if "including_emulation" in inspect.signature(fn).parameters else {}
    with torch.cuda.device(device):
        return bool(fn(**kwargs))


def precision_choice_error(value: object) -> str:
    """The one-line message for a precision that is not among :data:`PRECISION_CHOICES`."""
    return (f"precision must be one of {', '.join(PRECISIONS)}, got {value!r} "
            "(or auto: bf16 where the device has it natively, else fp32)")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` itself, or for ``auto`` the fastest exact-enough choice on ``device``: ``bf16``
    where it is native (CPU: ``avx512_bf16`` or AMX; CUDA: compute capability >= 8.0) and torch has
    autocast for it, else ``fp32``. Deterministic for one machine, so same params still give the
    same bytes there; a different machine may resolve differently (the loop reports the choice)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cpu":
        native = cpu_native_bf16()
    elif device.type == "cuda":
        native = torch.cuda.is_available() and _cuda_bf16(device)
    else:
        native = False
    return "bf16" if native and _autocast_works(device.type, torch.bfloat16) else "fp32"


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise a one-line ``ValueError`` when ``precision`` is unknown or ``device`` cannot run it."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(precision_choice_error(precision))
    if precision in ("fp32", "auto"):  # auto falls back to fp32 wherever bf16 is not native
        return
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"precision {precision}: device {device} is not available (no CUDA GPU here)")
        if precision == "bf16" and not _cuda_bf16(device):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"precision bf16: {name} has no native bf16 (needs compute capability >= 8.0); "
                             "use precision fp16 or fp32")
    if not _autocast_works(device.type, PRECISIONS[precision]):
        raise ValueError(f"precision {precision}: torch {torch.__version__} has no {precision} autocast on "
                         f"{device.type}; use precision fp32")
    if precision == "fp16":
        try:
            torch.amp.GradScaler(device.type)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"precision fp16: no gradient scaler for {device.type} in torch "
                             f"{torch.__version__} ({exc}); use precision bf16 or fp32") from None


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16; ``None`` for fp32 and bf16 (fp32's exponent range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient is finite: an fp16 overflow step is skipped by the scaler, and
    controllers (EMAs, importance scores) must not see its inf/nan gradients either."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (non-reentrant checkpoints).

    Non-reentrant checkpointing works with a frozen embedding (no input that requires a gradient)
    and with the custom autograd kernels of the adapters, and it restores the RNG state, so
    dropout and stochastic gates draw the same samples in the recomputation."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it "
                         "(only Hugging Face models with supports_gradient_checkpointing, e.g. causal LMs)")
    kwargs = {"use_reentrant": False}
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    # newer transformers 5.x renamed the API (the old name warns); older releases only have the old one
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
