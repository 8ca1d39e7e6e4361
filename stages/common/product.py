"""The product adapter of a run (``data/compress/adapter.safetensors``) rebuilt as a model.

The compress stage writes either the finetuned adapter's exact bytes (compress off, or a method it does
not apply to) or a compressed adapter (trimmed, possibly quantised LoRA pairs + head). Merge, evaluate
and the exports load it through :func:`load_product`, so what they merge, measure and ship is what is
stored: the compressed form as plain LoRA layers at the stored ranks (dequantised factors), the
uncompressed one through the method's own layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lora_ops.compress.adapter import CompressedAdapter, inject_compressed, is_compressed
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training import load_trainable_state
from stages.common.adapted import Adapted, build_adapted, load_base
from stages.common.context import method_context
from stages.common.io import BadArtifact, read_safetensors, rerun_hint
from stages.common.params import Params
from stages.common.paths import Paths


def read_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of an adapter file (truncated or foreign: one-line BadArtifact)."""
    tensors = read_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:  # pragma: no cover - read_safetensors already parsed it
        raise BadArtifact(f"{path} is not a readable safetensors file ({exc}): {rerun_hint(path)}") from None
    return tensors, metadata


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Product:
    adapted: Adapted
    compressed: CompressedAdapter | None
    stored_bytes: int  # the adapter file's payload: codes + scales (or float factors) + head

    @property
    def model(self) -> torch.nn.Module:
        return self.adapted.model

    def parameter_counts(self) -> dict[str, int]:
        """trainable (as trained), active and stored (what the product holds)."""
        counts = self.adapted.method.parameter_counts(self.model)
        if self.compressed is None:
            return counts
        trainable = int(self.adapted.plan.get("parameters", {}).get("trainable", counts["trainable"]))
        stored = self.compressed.stored_params
        return {"trainable": trainable, "active": stored, "stored": stored}


def load_product(params: Params, plan: dict[str, Any], path: Path = Paths.compressed) -> Product:
    tensors, metadata = read_adapter_file(path)
    if not is_compressed(metadata):
        adapted = build_adapted(params, plan)
        try:
            load_trainable_state(adapted.model, tensors)
        except ValueError as exc:  # tensors of another plan/method: name the file
            raise ValueError(f"{path} does not fit this plan ({exc}): rerun the finetune and compress "
                             "stages") from None
        return Product(adapted, None, tensor_bytes(tensors))
    try:
        adapter = CompressedAdapter.from_tensors(tensors, metadata)
    except (KeyError, ValueError) as exc:
        raise BadArtifact(f"{path} is not a valid compressed adapter ({exc}): {rerun_hint(path)}") from None
    method, ctx = method_context(params)
    loaded = load_base(params)
    try:
        inject_compressed(loaded.model, adapter, params.adapter.targets)
    except ValueError as exc:
        raise ValueError(f"{path} does not fit this model ({exc}): rerun the compress stage") from None
    freeze_all_but(loaded.model, loaded.head_modules)
    loaded.model.to(ctx.device)
    adapted = Adapted(loaded, method, ctx, find_targets(loaded.model, params.adapter.targets), plan)
    return Product(adapted, adapter, adapter.stored_bytes())
